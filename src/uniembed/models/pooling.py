"""Global pooling of CNN feature maps [B,C,H,W] -> [B,C] (and a multi-stage variant).

Written here rather than taken from timm because the pooled feature is part of the frozen backbone's
identity (it goes into the cache fingerprint and into the exported TorchScript model), so it must be a tiny,
scriptable module with a fixed, documented formula: plain average, or GeM with a *fixed* exponent (the
backbone is frozen, so there is nothing to learn ``p`` from at extraction time).
"""

from __future__ import annotations

import torch
from torch import nn

#: Pooling names accepted by ``create_backbone(..., pooling=...)``.
POOLINGS = ("avg", "gem")


class AvgPool(nn.Module):
    """Global average pooling: [B,C,H,W] -> [B,C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GeMPool(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018), ``(mean(clamp(x, eps)^p))^(1/p)``.

    p=1 is average pooling, p->inf approaches max pooling; p=3 is the usual retrieval default and favours
    the strongest activations (the object) over background. ``p`` is a fixed buffer, not a parameter.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent p must be > 0, got {p}")
        self.register_buffer("p", torch.tensor(float(p)))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pool in float32: x^3 of bf16/fp16 activations loses too much precision.
        xf = x.float().clamp(min=self.eps)
        return xf.pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={float(self.p):g}, eps={self.eps:g}"


def parse_pooling(pooling: str) -> tuple[str, bool, float]:
    """``avg`` | ``gem`` | ``gem3.5`` (explicit p) | ``<either>+stages`` -> (kind, multi_stage, p)."""
    name = pooling.strip().lower()
    multi = name.endswith("+stages")
    if multi:
        name = name[: -len("+stages")]
    if name == "avg":
        return "avg", multi, 1.0
    if name.startswith("gem"):
        rest = name[3:]
        try:
            p = float(rest) if rest else 3.0
        except ValueError:
            p = -1.0
        if p > 0:
            return "gem", multi, p
    raise ValueError(
        f"unknown pooling {pooling!r}; use one of: avg, gem, gem<p> (e.g. gem4), and optionally '+stages' "
        "(e.g. avg+stages) to concatenate pooled features from several network stages"
    )


def make_pool(pooling: str) -> nn.Module:
    """A single-map pooling module for a pooling name (the ``+stages`` suffix is handled by the backbone)."""
    kind, _, p = parse_pooling(pooling)
    return AvgPool() if kind == "avg" else GeMPool(p=p)


class MultiStagePool(nn.Module):
    """Pool several feature maps (one per stage) and concatenate: [B, sum(C_i)].

    Lower stages carry texture/colour cues that the last stage has abstracted away; concatenating them is a
    cheap way to test how "universal" the frozen features are across domains.
    """

    def __init__(self, pooling: str, n_maps: int):
        super().__init__()
        self.pools = nn.ModuleList([make_pool(pooling) for _ in range(n_maps)])

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        out: list[torch.Tensor] = []
        for i, pool in enumerate(self.pools):
            out.append(pool(maps[i]))
        return torch.cat(out, dim=1)
