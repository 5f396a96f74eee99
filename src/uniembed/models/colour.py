"""A colour block beside the CNN features: ``<pooling>+colour``.

Why: ImageNet CNN features are trained to *ignore* much of an object's exact colour (a red and a green apple
are both "Granny Smith"-ish to a classifier), yet for instance retrieval colour is one of the most stable
cues of *which* object it is — a product's packaging, a toy, a fruit variety. A 64-d projection of the CNN
features alone loses it further. The universality research (docs/experiments-archive.md) measured a joint RGB
histogram, 8 bins a channel, square-rooted (Hellinger), as the single block that lifts unseen domains most:
alone it retrieves packaged goods better than MobileNetV2's 1,280-d features (left-out mP@5 0.815 vs 0.765).

Own code rather than a library: no trusted library computes a batched joint colour histogram as a
TorchScript/ONNX-exportable module; it is a scatter-add over quantised pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from uniembed.models.pooling import COLOUR_SUFFIX

__all__ = ["COLOUR_BINS", "COLOUR_SUFFIX", "COLOUR_WEIGHT", "ColourHistogram", "WithColour", "split_colour"]

#: Bins per RGB channel (8 -> 512 joint bins) and the block's weight relative to one L2-normalised stage
#: (sqrt(2): it counts as much as two stages in cosine similarity; best of 1/2/3, experiments-archive.md).
COLOUR_BINS = 8
COLOUR_WEIGHT = math.sqrt(2.0)


def split_colour(pooling: str) -> tuple[str, bool]:
    """``avg+stages_l2+colour`` -> (``avg+stages_l2``, True); other names -> (name, False).

    Tolerant on purpose: the rest is returned as written (stripped, case kept) and not validated, because
    ``create_backbone`` hands it to the backbone builders, which validate it and keep it as the backbone's
    identity. To know what a name means, use ``PoolingSpec.parse(name)`` (``.colour``) instead."""
    name = pooling.strip()
    if name.lower().endswith(COLOUR_SUFFIX):
        return name[: -len(COLOUR_SUFFIX)], True
    return name, False


class ColourHistogram(nn.Module):
    """Normalised model input [B,3,S,S] -> [B, bins^3] joint RGB histogram, square-rooted, L2-normalised and
    scaled by ``weight``.

    The input is the backbone's normalised tensor, so the pixels are first mapped back to [0,1] with the
    backbone's own ``scale``/``mean``/``std``; then average-pooled by ``pool`` (a 224 input -> 56x56 = 3,136
    pixels: enough for a stable histogram, cheap, and less sensitive to JPEG noise).
    """

    def __init__(
        self,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        *,
        bins: int = COLOUR_BINS,
        weight: float = COLOUR_WEIGHT,
        pool: int = 4,
        eps: float = 1e-8,
    ):
        super().__init__()
        if bins < 2:
            raise ValueError(f"colour histogram needs at least 2 bins a channel, got {bins}")
        self.bins = int(bins)
        self.dim = int(bins) ** 3  # joint bins: the block's width
        self.weight = float(weight)
        self.pool = int(pool)
        self.eps = float(eps)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # Joint bin index = r * bins^2 + g * bins + b, as a weighted sum over channels.
        self.register_buffer(
            "radix", torch.tensor([bins * bins, bins, 1], dtype=torch.float32).view(1, 3, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x.float() * self.std + self.mean).clamp(0.0, 1.0)
        if self.pool > 1 and rgb.shape[-1] >= 2 * self.pool and rgb.shape[-2] >= 2 * self.pool:
            rgb = F.avg_pool2d(rgb, self.pool)
        q = torch.clamp(torch.floor(rgb * self.bins), 0.0, float(self.bins - 1))
        idx = (q * self.radix).sum(dim=1).flatten(1).long()  # [B, P]
        counts = torch.zeros(x.shape[0], self.dim, dtype=torch.float32, device=x.device)
        counts = counts.scatter_add(1, idx, torch.ones_like(idx, dtype=torch.float32))
        hist = counts / float(idx.shape[1])
        return F.normalize(hist.sqrt(), p=2.0, dim=1, eps=self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"bins={self.bins}, weight={self.weight:.4g}, pool={self.pool}"


class WithColour(nn.Module):
    """``[net(x), colour(x)]``: the CNN's pooled features followed by the colour block. ``net`` stays the
    first child so code that reaches into the CNN (fine-tuning) finds it as ``.net``."""

    def __init__(self, net: nn.Module, colour: ColourHistogram):
        super().__init__()
        self.net = net
        self.colour = colour

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(x)
        return torch.cat([f, self.colour(x).to(f.dtype)], dim=1)
