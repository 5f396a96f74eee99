"""Training losses for projection heads: margin softmax losses + optional distillation terms.

    total = margin_weight * margin_loss(emb, labels) + distill_weight * distill_loss(emb, input_features)
            + rank_weight * rank_loss(emb, input_features)

Margin losses (all are "margin-modified cosine logits, times a scale s, then softmax cross-entropy", which is
what the GUIE 2022 solutions called "ArcFace before softmax + cross-entropy"):

- ``arcface``: pytorch-metric-learning ``ArcFaceLoss`` (additive angular margin; Deng et al. 2019).
- ``subcenter_arcface``: PML ``SubCenterArcFaceLoss`` (k centres per class, max over them; Deng et al. 2020).
- ``dynamic_arcface``: our own ArcFace with a per-class margin m_c = a * n_c^(-p) + b (p = 1/4 by default), a
  and b chosen so the rarest class gets ``margin_max`` and the most frequent ``margin_min`` (as in the Google
  Landmark Retrieval 2020 winners). PML has no per-class margin, hence our own small class; it also supports
  sub-centres so it composes with ``sub_centers``.
- ``softmax``: PML ``NormalizedSoftmaxLoss`` (cosine logits / temperature, no margin), the no-margin baseline.
- ``none``: no margin term (pure distillation; needs ``distill_weight`` > 0).

Margin units: ``margin`` is read in ``margin_unit`` (``rad`` by default, 0.5 rad = 28.6 deg as in the ArcFace
paper). PML wants DEGREES; the conversion happens here, in one place (``margin_degrees``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOSS_TYPES = ("arcface", "subcenter_arcface", "dynamic_arcface", "softmax", "none")

LOSS_DEFAULTS: dict[str, Any] = {
    "type": "arcface",
    "scale": 30.0,  # s: logits = s * cos(...)
    "margin": 0.5,  # m, in margin_unit
    "margin_unit": "rad",  # rad | deg
    "sub_centers": 1,  # k (subcenter_arcface defaults to 3 when left at 1; dynamic_arcface uses it as given)
    "margin_min": 0.05,  # dynamic_arcface: margin of the most frequent class (margin_unit)
    "margin_max": 0.5,  # dynamic_arcface: margin of the rarest class (margin_unit)
    "margin_power": 0.25,  # dynamic_arcface: p in n_c^(-p)
    "margin_weight": 1.0,
    "distill_weight": 0.0,  # similarity-distillation term (0 = off)
    # > 0: initialise the class centres N(0, std) instead of the library default (PML: N(0, 1)).
    # docs/experiments-archive.md: with Adam, steps are ~lr whatever the norm, so small centres turn to
    # their classes within a few steps, while unit-scale ones stay put and drag a PCA-initialised head off its
    # geometry (left-out-domain mP@5 packaged_goods 0.663 with N(0,1) centres vs 0.682 with std 0.01).
    "centers_init_std": 0.0,
    # Distillation teacher centred by the batch mean before the cosine similarities (issue #6). Backbone
    # features after ReLU are all-positive, so their raw cosines sit near +0.6 for any pair, while a centred
    # head (``center: true``) outputs near-zero-mean similarities: the uncentred target drags the whole
    # embedding towards one direction and costs the left-out domains (docs/experiments-archive.md).
    "distill_center": False,
    # Neighbour-ranking distillation (0 = off): listwise KL between the in-batch similarity distributions of
    # the full-width features (teacher) and of the embedding, both at ``rank_temperature``. Unlike the MSE
    # of ``distill_weight``, which spends the 64 dimensions on reproducing *all* similarities (the large,
    # global ones first, as PCA does), the softmax at a low temperature weighs each row's *nearest* items:
    # exactly what top-5 retrieval keeps. Works with labels or without; best with ``sampler: neighbours``.
    "rank_weight": 0.0,
    "rank_temperature": 0.05,
}


def loss_config(cfg: dict | None) -> dict:
    """Validate a loss config and fill defaults."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(LOSS_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown loss config keys {sorted(unknown)}; known: {', '.join(LOSS_DEFAULTS)}")
    c = dict(LOSS_DEFAULTS, **cfg)
    if c["type"] not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {c['type']!r}; known: {', '.join(LOSS_TYPES)}")
    if c["margin_unit"] not in ("rad", "deg"):
        raise ValueError(f"margin_unit must be 'rad' or 'deg', got {c['margin_unit']!r}")
    for k in (
        "scale",
        "margin",
        "margin_min",
        "margin_max",
        "margin_power",
        "margin_weight",
        "distill_weight",
        "centers_init_std",
        "rank_weight",
        "rank_temperature",
    ):
        c[k] = float(c[k])
        if c[k] < 0:
            raise ValueError(f"loss {k} must be >= 0, got {c[k]}")
    c["distill_center"] = bool(c["distill_center"])
    c["sub_centers"] = int(c["sub_centers"])
    if c["sub_centers"] < 1:
        raise ValueError("loss sub_centers must be >= 1")
    if c["type"] == "subcenter_arcface" and "sub_centers" not in cfg:
        c["sub_centers"] = 3
    if c["margin_min"] > c["margin_max"]:
        raise ValueError(f"margin_min ({c['margin_min']}) > margin_max ({c['margin_max']})")
    if c["type"] == "none":
        c["margin_weight"] = 0.0
    if c["rank_temperature"] <= 0:
        raise ValueError(f"loss rank_temperature must be > 0, got {c['rank_temperature']}")
    if c["margin_weight"] == 0 and c["distill_weight"] == 0 and c["rank_weight"] == 0:
        raise ValueError(
            "loss has nothing to optimise: margin_weight, distill_weight and rank_weight are all 0"
        )
    return c


def to_radians(value: float, unit: str) -> float:
    return float(value) if unit == "rad" else math.radians(float(value))


def margin_degrees(cfg: dict) -> float:
    """The config's margin in degrees (what pytorch-metric-learning expects)."""
    return math.degrees(to_radians(cfg["margin"], cfg["margin_unit"]))


def dynamic_margins(
    class_counts: np.ndarray | torch.Tensor, m_min: float, m_max: float, power: float = 0.25
) -> torch.Tensor:
    """Per-class margins m_c = a * n_c^(-power) + b, with a, b set so the rarest class gets ``m_max`` and the
    most frequent ``m_min`` (radians in, radians out). Equal counts give ``m_max`` to every class (= ArcFace).
    """
    n = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
    if n.ndim != 1 or n.numel() == 0:
        raise ValueError("class_counts must be a non-empty 1-d array")
    if (n <= 0).any():
        raise ValueError("every class needs a positive training count for dynamic margins")
    raw = n.pow(-power)
    lo, hi = raw.min(), raw.max()
    if float(hi - lo) < 1e-12:
        return torch.full_like(raw, m_max).float()
    a = (m_max - m_min) / (hi - lo)
    b = m_min - a * lo
    return (a * raw + b).float()


class DynamicMarginArcFace(nn.Module):
    """ArcFace with one margin per class (and optional sub-centres).

    Written here because pytorch-metric-learning's ArcFaceLoss has a single scalar margin. The margin
    vector is a buffer (from training class counts), the centres ``W`` [C*k, E] a parameter.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margins: torch.Tensor,
        scale: float = 30.0,
        sub_centers: int = 1,
    ):
        super().__init__()
        if margins.shape != (num_classes,):
            raise ValueError(f"margins must have shape ({num_classes},), got {tuple(margins.shape)}")
        self.num_classes = num_classes
        self.sub_centers = sub_centers
        self.scale = float(scale)
        self.W = nn.Parameter(torch.randn(num_classes * sub_centers, embedding_dim))
        self.register_buffer("margins", margins.float().clone())

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """[B, C] cosine to the nearest sub-centre of each class."""
        cos = F.normalize(emb, dim=1) @ F.normalize(self.W, dim=1).T
        return cos.view(emb.shape[0], self.num_classes, self.sub_centers).amax(2)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(emb)
        cos_t = cos.gather(1, labels[:, None]).squeeze(1)
        m = self.margins[labels]
        # Clamp inside (-1, 1): acos has an infinite gradient at +-1.
        theta = torch.acos(cos_t.clamp(-1 + 1e-7, 1 - 1e-7))
        # Past theta + m > pi cos(theta + m) stops decreasing; use the usual linear fallback there.
        target = torch.where(theta + m <= math.pi, torch.cos(theta + m), cos_t - m * torch.sin(m))
        logits = cos.scatter(1, labels[:, None], target[:, None]) * self.scale
        return F.cross_entropy(logits, labels)


class MarginLoss(nn.Module):
    """One margin loss, one interface: ``forward(emb, labels) -> scalar`` and ``centers() -> [C, E]``."""

    def __init__(
        self, cfg: dict, num_classes: int, embedding_dim: int, class_counts: np.ndarray | None = None
    ):
        super().__init__()
        from pytorch_metric_learning import losses as pml

        self.cfg = cfg
        self.num_classes = num_classes
        t = cfg["type"]
        if t == "arcface":
            self.fn: nn.Module = pml.ArcFaceLoss(
                num_classes=num_classes,
                embedding_size=embedding_dim,
                margin=margin_degrees(cfg),
                scale=cfg["scale"],
            )
        elif t == "subcenter_arcface":
            self.fn = pml.SubCenterArcFaceLoss(
                num_classes=num_classes,
                embedding_size=embedding_dim,
                margin=margin_degrees(cfg),
                scale=cfg["scale"],
                sub_centers=cfg["sub_centers"],
            )
        elif t == "softmax":
            self.fn = pml.NormalizedSoftmaxLoss(
                num_classes=num_classes,
                embedding_size=embedding_dim,
                temperature=1.0 / max(cfg["scale"], 1e-6),
            )
        elif t == "dynamic_arcface":
            if class_counts is None:
                raise ValueError("dynamic_arcface needs the training class counts")
            unit = cfg["margin_unit"]
            margins = dynamic_margins(
                class_counts,
                to_radians(cfg["margin_min"], unit),
                to_radians(cfg["margin_max"], unit),
                cfg["margin_power"],
            )
            self.fn = DynamicMarginArcFace(
                num_classes, embedding_dim, margins, cfg["scale"], cfg["sub_centers"]
            )
        else:
            raise ValueError(f"MarginLoss cannot build loss type {t!r}")
        std = float(cfg.get("centers_init_std", 0.0))
        if std > 0:  # see LOSS_DEFAULTS["centers_init_std"]
            with torch.no_grad():
                self.fn.W.normal_(0.0, std)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.fn(emb, labels)

    def centers(self) -> torch.Tensor:
        """Class centres as rows [C*k, E] (PML stores them transposed as [E, C*k])."""
        w = self.fn.W
        return w.T if self.cfg["type"] in ("arcface", "subcenter_arcface", "softmax") else w


class SimilarityDistillLoss(nn.Module):
    """MSE between the batch cosine-similarity matrix of the embeddings and that of the (L2-normalised) input
    features, off the diagonal (the diagonal is 1 in both). Keeps the head close to the backbone's geometry,
    which is one way to stay 'universal' on domains absent from the training labels."""

    def __init__(self, center: bool = False):
        super().__init__()
        self.center = bool(center)  # see LOSS_DEFAULTS["distill_center"]

    def forward(self, emb: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        e = F.normalize(emb.float(), dim=1)
        f = F.normalize(feats.float(), dim=1)
        if self.center:
            f = F.normalize(f - f.mean(0, keepdim=True), dim=1)
        n = e.shape[0]
        if n < 2:
            return e.sum() * 0.0
        off = ~torch.eye(n, dtype=torch.bool, device=e.device)
        return F.mse_loss((e @ e.T)[off], (f @ f.T)[off])


class NeighbourRankDistillLoss(nn.Module):
    """KL(teacher || student) between each row's softmax over its in-batch cosine similarities (self
    excluded), teacher = the L2-normalised input features (uncentred: the raw features are searched that
    way), student = the embedding, both divided by ``temperature``. A low temperature makes each row's
    distribution peak on its nearest neighbours, so the loss is about keeping neighbour *rankings*, not
    reproducing every similarity. See LOSS_DEFAULTS["rank_weight"]."""

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

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


class EmbeddingLoss(nn.Module):
    """``margin_weight * margin + distill_weight * distill + rank_weight * rank`` (any term may be absent)."""

    def __init__(
        self, cfg: dict | None, num_classes: int, embedding_dim: int, class_counts: np.ndarray | None = None
    ):
        super().__init__()
        self.cfg = loss_config(cfg)
        self.margin_weight = self.cfg["margin_weight"]
        self.distill_weight = self.cfg["distill_weight"]
        self.margin = (
            MarginLoss(self.cfg, num_classes, embedding_dim, class_counts) if self.margin_weight > 0 else None
        )
        self.distill = SimilarityDistillLoss(self.cfg["distill_center"]) if self.distill_weight > 0 else None
        self.rank_weight = self.cfg["rank_weight"]
        self.rank = NeighbourRankDistillLoss(self.cfg["rank_temperature"]) if self.rank_weight > 0 else None

    def forward(
        self, emb: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Returns ``{"loss": total, "margin": ..., "distill": ...}`` (absent terms omitted)."""
        out: dict[str, torch.Tensor] = {}
        total = emb.new_zeros(())
        if self.margin is not None:
            out["margin"] = self.margin(emb, labels)
            total = total + self.margin_weight * out["margin"]
        if self.distill is not None:
            if feats is None:
                raise ValueError("distill_weight > 0 needs the input features")
            out["distill"] = self.distill(emb, feats)
            total = total + self.distill_weight * out["distill"]
        if self.rank is not None:
            if feats is None:
                raise ValueError("rank_weight > 0 needs the input features")
            out["rank"] = self.rank(emb, feats)
            total = total + self.rank_weight * out["rank"]
        out["loss"] = total
        return out


def build_loss(
    cfg: dict | None, num_classes: int, embedding_dim: int = 64, class_counts: np.ndarray | None = None
) -> EmbeddingLoss:
    """The training loss from its config (see ``LOSS_DEFAULTS``)."""
    return EmbeddingLoss(cfg, num_classes, embedding_dim, class_counts)
