"""The training loss: the one place that combines the margin term with the in-batch similarity terms.

    total = margin_weight * margin_loss(emb, labels)
            + distill_weight * distill_loss(emb, feats) + rank_weight * rank_loss(emb, feats)

Any term may be absent (weight 0). The in-batch terms may see a larger batch than the margin term: under DDP
each rank computes the margin term on its shard and the similarity terms on the batch gathered from every
rank (``gather``), so their similarity matrices are those of one process on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from uniembed.models.losses.batch_term import BatchTerm
from uniembed.models.losses.config import loss_config
from uniembed.models.losses.margin import MarginLoss
from uniembed.models.losses.registry import BATCH_TERMS, MARGIN_LOSSES

#: ``(this process's embeddings, input features) -> (the whole batch's)``, for the in-batch terms.
BatchGather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def loss_terms() -> tuple[str, ...]:
    """Every term's name, in the order terms are added to the total: ``margin``, then the in-batch terms."""
    return ("margin", *BATCH_TERMS)


class EmbeddingLoss(nn.Module):
    """``margin_weight * margin + distill_weight * distill + rank_weight * rank`` (any term may be absent).

    Each term is an attribute named after it (``self.margin``, ``self.distill``, ``self.rank``), None when its
    weight is 0, so the class centres keep their state-dict names (``margin.fn.W``).
    """

    margin: MarginLoss | None

    def __init__(
        self, cfg: dict | None, num_classes: int, embedding_dim: int, class_counts: np.ndarray | None = None
    ):
        super().__init__()
        self.cfg = loss_config(cfg)
        c = self.cfg
        self.weights: dict[str, float] = {"margin": c[MarginLoss.weight_key]}
        self.weights.update({name: c[term.weight_key] for name, term in BATCH_TERMS.items()})
        self.margin = (
            MARGIN_LOSSES[c["type"]](c, num_classes, embedding_dim, class_counts)
            if self.weights["margin"] > 0
            else None
        )
        for name, term in BATCH_TERMS.items():
            setattr(self, name, term.from_config(c) if self.weights[name] > 0 else None)

    @property
    def batch_terms(self) -> list[tuple[str, BatchTerm]]:
        """The active in-batch terms as ``(name, module)``, in order."""
        return [(n, t) for n in BATCH_TERMS if (t := getattr(self, n)) is not None]

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the active terms, in the order they are added."""
        return (*(["margin"] if self.margin is not None else []), *(n for n, _ in self.batch_terms))

    def weighted_total(self, values: dict[str, float]) -> float:
        """The total loss from per-term values (e.g. epoch means); a missing term counts as 0."""
        parts = [self.weights[n] * values.get(n, 0.0) for n in loss_terms()]
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total

    def forward(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor,
        feats: torch.Tensor | None = None,
        margin_scale: float = 1.0,
        gather: BatchGather | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns ``{"loss": total, "margin": ..., "distill": ..., "rank": ...}`` (absent terms omitted).

        ``margin_scale`` multiplies the margin term (DDP: a rank's share of the global batch mean);
        ``gather`` gives the in-batch terms the whole batch when this process holds only a shard.
        """
        out: dict[str, torch.Tensor] = {}
        total = emb.new_zeros(())
        if self.margin is not None:
            out["margin"] = self.margin(emb, labels)
            total = total + self.weights["margin"] * out["margin"] * margin_scale
        batch_terms = self.batch_terms
        if batch_terms:
            if feats is None:
                raise ValueError(f"{batch_terms[0][1].weight_key} > 0 needs the input features")
            e_all, x_all = gather(emb, feats) if gather is not None else (emb, feats)
            for name, term in batch_terms:
                out[name] = term(e_all, x_all)
                total = total + self.weights[name] * out[name]
        out["loss"] = total
        return out


def build_loss(
    cfg: dict | None, num_classes: int, embedding_dim: int = 64, class_counts: np.ndarray | None = None
) -> EmbeddingLoss:
    """The training loss from its config (see :func:`loss_defaults`)."""
    return EmbeddingLoss(cfg, num_classes, embedding_dim, class_counts)
