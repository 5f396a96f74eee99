"""Global pooling of CNN feature maps [B,C,H,W] -> [B,C] (and multi-stage variants).

Written here rather than taken from timm because the pooled feature is part of the frozen backbone's
identity (it goes into the cache fingerprint and into the exported TorchScript model), so it must be a tiny,
scriptable module with a fixed, documented formula: plain average, or GeM with a *fixed* exponent (the
backbone is frozen, so there is nothing to learn ``p`` from at extraction time).

Multi-stage names: ``<pool>+stages`` concatenates the pooled maps of several stages as they are;
``<pool>+stages_l2`` L2-normalises each stage's pooled vector first ("block-normed"). The final 1280-d map
of MobileNetV2 has ~10x the norm of earlier stages, so without per-block normalisation it drowns them and
the concatenation behaves like plain ``avg`` (docs/experiments-archive.md: PCA-64 left-out mean 0.797 plain
concatenation vs 0.815 block-normed vs 0.796 plain avg).

A final ``+colour`` appends the colour-histogram block (models/colour.py). ``PoolingSpec.parse`` reads the
whole grammar once into typed fields, so no caller needs to match suffixes itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

#: Pooling names accepted by ``create_backbone(..., pooling=...)`` (``gem`` also takes ``gem<p>``).
POOLINGS = ("avg", "gem", "avg+stages", "gem+stages", "avg+stages_l2", "gem+stages_l2")

STAGES_SUFFIX = "+stages"
STAGES_L2_SUFFIX = "+stages_l2"
#: Appends the colour-histogram block (models/colour.py) to whatever the rest of the name gives.
COLOUR_SUFFIX = "+colour"
#: The model's own pooling (timm / open_clip: e.g. a ViT's class token); no stages.
NATIVE = "native"


@dataclass(frozen=True)
class PoolingSpec:
    """A pooling name parsed once: ``<base>[+stages|+stages_l2][+colour]``.

    ``base`` is the single-map pooling as written (lower case): ``avg``, ``gem`` / ``gem<p>`` or ``native``.
    ``str(spec)`` gives the name back (``PoolingSpec.parse("avg+stages_l2+colour")`` prints as
    ``avg+stages_l2+colour``); a name in another case or with spaces comes back lower case and stripped.
    The name as the caller wrote it stays the backbone's identity (``Backbone.pooling``, the fingerprint).
    """

    kind: str  # "avg" | "gem" | "native"
    multi: bool  # pool several stages and concatenate
    p: float  # GeM exponent (1.0 otherwise)
    block_l2: bool = False  # L2-normalise each stage's pooled vector before concatenating
    colour: bool = False  # append the colour-histogram block
    base: str = ""  # the single-map name as written: "avg", "gem", "gem4", "native"

    @classmethod
    def parse(cls, pooling: str) -> PoolingSpec:
        """Any pooling name a backbone accepts; ValueError for anything else."""
        spec = _parse(pooling)
        if spec is None:
            raise ValueError(
                _unknown(pooling)
                + f"; '{NATIVE}' (timm, open_clip) is the model's own pooling, and any name "
                f"may end with '{COLOUR_SUFFIX}' to append the colour-histogram block"
            )
        return spec

    @property
    def stages_suffix(self) -> str:
        """``+stages_l2``, ``+stages`` or ``""``."""
        return STAGES_L2_SUFFIX if self.block_l2 else STAGES_SUFFIX if self.multi else ""

    def without_colour(self) -> PoolingSpec:
        """The CNN part alone (what the backbone builders see)."""
        return replace(self, colour=False)

    def __str__(self) -> str:
        return self.base + self.stages_suffix + (COLOUR_SUFFIX if self.colour else "")


def _unknown(pooling: str) -> str:
    return (
        f"unknown pooling {pooling!r}; use one of: avg, gem, gem<p> (e.g. gem4), optionally followed by "
        "'+stages' (e.g. avg+stages) to concatenate pooled features from several network stages, or "
        "'+stages_l2' (e.g. avg+stages_l2) to L2-normalise each stage's pooled vector before concatenating"
    )


def _parse(pooling: str) -> PoolingSpec | None:
    """The grammar of pooling names, in one place; None when ``pooling`` is not one."""
    name = pooling.strip().lower()
    colour = name.endswith(COLOUR_SUFFIX)
    if colour:
        name = name[: -len(COLOUR_SUFFIX)]
    block_l2 = name.endswith(STAGES_L2_SUFFIX)
    multi = block_l2 or name.endswith(STAGES_SUFFIX)
    if multi:
        name = name[: -len(STAGES_L2_SUFFIX if block_l2 else STAGES_SUFFIX)]
    if name == "avg":
        return PoolingSpec("avg", multi, 1.0, block_l2, colour, name)
    if name == NATIVE and not multi:
        return PoolingSpec(NATIVE, False, 1.0, False, colour, name)
    if name.startswith("gem"):
        rest = name[3:]
        try:
            p = float(rest) if rest else 3.0
        except ValueError:
            p = -1.0
        if p > 0:
            return PoolingSpec("gem", multi, p, block_l2, colour, name)
    return None


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


def parse_pooling(pooling: str | PoolingSpec) -> PoolingSpec:
    """A CNN pooling name: ``avg`` | ``gem`` | ``gem3.5`` (explicit p), optionally + ``+stages`` /
    ``+stages_l2``. ``native`` and ``+colour`` are not pooling modules (the backbone builders handle them),
    so they are refused here; :meth:`PoolingSpec.parse` accepts every name."""
    spec = pooling if isinstance(pooling, PoolingSpec) else _parse(pooling)
    if spec is None or spec.colour or spec.kind == NATIVE:
        raise ValueError(_unknown(str(pooling)))
    return spec


def make_pool(pooling: str | PoolingSpec) -> nn.Module:
    """A single-map pooling module for a pooling name (the ``+stages*`` suffix is handled by the backbone)."""
    spec = parse_pooling(pooling)
    return AvgPool() if spec.kind == "avg" else GeMPool(p=spec.p)


class MultiStagePool(nn.Module):
    """Pool several feature maps (one per stage) and concatenate: [B, sum(C_i)].

    Lower stages carry texture/colour cues that the last stage has abstracted away. With ``block_l2``
    (pooling names ending in ``+stages_l2``) each pooled vector is L2-normalised before the concatenation,
    so every stage gets the same weight in cosine similarity whatever its width and activation scale; the
    result then has norm sqrt(n_maps).
    """

    def __init__(self, pooling: str | PoolingSpec, n_maps: int, eps: float = 1e-8):
        super().__init__()
        if n_maps < 1:
            raise ValueError(f"MultiStagePool needs at least one map, got {n_maps}")
        spec = parse_pooling(pooling)
        self.pools = nn.ModuleList([make_pool(spec) for _ in range(n_maps)])
        self.block_l2 = spec.block_l2
        self.eps = float(eps)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.pools):
            raise ValueError("MultiStagePool: number of feature maps does not match number of pools")
        out: list[torch.Tensor] = []
        for i, pool in enumerate(self.pools):
            v = pool(maps[i])
            if self.block_l2:
                # Normalise in float32: under bf16/fp16 autocast a tiny eps underflows to 0.
                v = F.normalize(v.float(), p=2.0, dim=1, eps=self.eps).to(v.dtype)
            out.append(v)
        return torch.cat(out, dim=1)

    def extra_repr(self) -> str:
        return f"block_l2={self.block_l2}"
