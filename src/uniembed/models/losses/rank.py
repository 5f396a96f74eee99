"""``loss.rank_weight``: neighbour-ranking distillation, listwise KL between each row's in-batch similarity
distributions of the input features (teacher) and of the embedding (student)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uniembed.models.losses.batch_term import BatchTerm
from uniembed.models.losses.margin import check_non_negative
from uniembed.models.losses.registry import register_batch_term


@register_batch_term("rank")
class NeighbourRankDistillLoss(BatchTerm):
    """KL(teacher || student) between each row's softmax over its in-batch cosine similarities (self
    excluded), teacher = the L2-normalised input features (uncentred: the raw features are searched that
    way), student = the embedding, both divided by ``temperature``.

    Unlike the MSE of similarity distillation, which spends the 64 dimensions on reproducing *all*
    similarities (the large, global ones first, as PCA does), the softmax at a low temperature weighs each
    row's *nearest* items: exactly what top-5 retrieval keeps. Works with labels or without; best with
    ``sampler: neighbours`` (batches of anchors with their nearest rows)."""

    defaults = {"rank_weight": 0.0, "rank_temperature": 0.05}  # weight 0 = off
    weight_key = "rank_weight"

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    @classmethod
    def check_config(cls, c: dict) -> None:
        check_non_negative(c, "rank_weight", "rank_temperature")
        if c["rank_temperature"] <= 0:
            raise ValueError(f"loss rank_temperature must be > 0, got {c['rank_temperature']}")

    @classmethod
    def from_config(cls, c: dict) -> NeighbourRankDistillLoss:
        return cls(c["rank_temperature"])

    def forward(self, emb: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        e = F.normalize(emb.float(), dim=1)
        f = F.normalize(feats.float(), dim=1)
        n = e.shape[0]
        if n < 3:
            return e.sum() * 0.0
        eye = torch.eye(n, dtype=torch.bool, device=e.device)
        t = (f @ f.T / self.temperature).masked_fill(eye, float("-inf"))
        s = (e @ e.T / self.temperature).masked_fill(eye, float("-inf"))
        log_t = F.log_softmax(t, dim=1).masked_fill(eye, 0.0)
        log_s = F.log_softmax(s, dim=1).masked_fill(eye, 0.0)
        return (log_t.exp() * (log_t - log_s)).sum(1).mean()
