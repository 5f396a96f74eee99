"""``loss.type: dynamic_arcface``: ArcFace with a per-class margin m_c = a * n_c^(-p) + b (p = 1/4 by
default), a and b chosen so the rarest class gets ``margin_max`` and the most frequent ``margin_min`` (as in
the Google Landmark Retrieval 2020 winners). pytorch-metric-learning has no per-class margin, hence our own
small criterion; it also supports sub-centres, so it composes with ``sub_centers``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniembed.models.losses.margin import MarginLoss, check_non_negative, to_radians
from uniembed.models.losses.registry import register_margin_loss


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

    The margin vector is a buffer (from training class counts), the centres ``W`` [C*k, E] a parameter.
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


@register_margin_loss("dynamic_arcface")
class DynamicArcFaceLoss(MarginLoss):
    """Per-class margins from the training class counts: rare classes get a larger margin."""

    defaults = {
        **MarginLoss.defaults,
        "margin_min": 0.05,  # margin of the most frequent class (margin_unit)
        "margin_max": 0.5,  # margin of the rarest class (margin_unit)
        "margin_power": 0.25,  # p in n_c^(-p)
    }

    @classmethod
    def check_config(cls, c: dict) -> None:
        check_non_negative(c, "margin_min", "margin_max", "margin_power")
        if c["margin_min"] > c["margin_max"]:
            raise ValueError(f"margin_min ({c['margin_min']}) > margin_max ({c['margin_max']})")

    def build(
        self, cfg: dict, num_classes: int, embedding_dim: int, class_counts: np.ndarray | None
    ) -> nn.Module:
        if class_counts is None:
            raise ValueError("dynamic_arcface needs the training class counts")
        unit = cfg["margin_unit"]
        margins = dynamic_margins(
            class_counts,
            to_radians(cfg["margin_min"], unit),
            to_radians(cfg["margin_max"], unit),
            cfg["margin_power"],
        )
        return DynamicMarginArcFace(num_classes, embedding_dim, margins, cfg["scale"], cfg["sub_centers"])
