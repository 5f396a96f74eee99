"""One registry of backbones and a ``create_backbone(name)`` factory, in the style of timm.

A backbone here is a frozen network *plus pooling*: a module that maps a normalised float batch
[B,3,S,S] to pooled features [B,D]. Its config (preprocessing, feature width, weights source) lives
beside the builder, so extraction, export and search all agree on it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from uniembed.models.colour import ColourHistogram, WithColour, split_colour
from uniembed.models.ensemble import (
    ENSEMBLE_SEP,
    EnsembleNet,
    Member,
    MemberInput,
    combined_hash,
    ensemble_preprocess,
    split_members,
)
from uniembed.models.preprocess import ImagePreprocessor, PreprocessConfig


@dataclass
class Backbone:
    """A ready-to-use frozen feature extractor."""

    name: str
    module: nn.Module  # normalised float [B,3,S,S] -> [B, dim]
    preprocess: PreprocessConfig
    dim: int
    pooling: str = "avg"
    weights: str = ""  # where the weights came from (file path, hub tag, or "random")
    weights_hash: str = ""  # content hash of the weights, part of every cache key
    info: dict[str, Any] = field(default_factory=dict)

    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor(self.preprocess)

    def fingerprint(self) -> str:
        """Identity of the feature function: name, pooling, weights and preprocessing."""
        key = f"{self.name}|{self.pooling}|{self.weights_hash}|{sorted(self.preprocess.to_dict().items())}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]


#: Seed for ``pretrained=False`` backbones (see create_backbone).
RANDOM_INIT_SEED = 0

BackboneBuilder = Callable[..., Backbone]
_REGISTRY: dict[str, BackboneBuilder] = {}
_PREFIX_REGISTRY: dict[str, BackboneBuilder] = {}


def register_backbone(name: str, *, prefix: bool = False) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: register a builder under ``name`` (or under ``name:`` for hub prefixes like ``timm:``)."""

    def deco(fn: BackboneBuilder) -> BackboneBuilder:
        (_PREFIX_REGISTRY if prefix else _REGISTRY)[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY) + [f"{p}:<name>" for p in sorted(_PREFIX_REGISTRY)] + ["<a>+<b> (ensemble)"]


def create_backbone(name: str, *, pretrained: bool = True, pooling: str = "avg", **kwargs: Any) -> Backbone:
    """Build a registered backbone, e.g. ``mobilenetv2``, ``efficientnet_lite2``,
    ``timm:vit_base_patch16_224``, ``open_clip:ViT-H-14/laion2b_s32b_b79k``, or an ensemble of them joined
    with ``+`` (``mobilenetv2+efficientnet_lite2``: members L2-normalised, then concatenated).
    ``pretrained=False`` gives random weights from a fixed seed (offline tests)."""
    _ensure_loaded()
    full_pooling = pooling
    pooling, colour = split_colour(pooling)
    if ENSEMBLE_SEP in name and name not in _REGISTRY:
        bb = _ensemble(split_members(name), pretrained=pretrained, pooling=pooling, **kwargs)
        return _finish(bb, full_pooling, colour)
    if name in _REGISTRY:
        build = functools.partial(_REGISTRY[name], pretrained=pretrained, pooling=pooling, **kwargs)
    elif ":" in name and name.split(":", 1)[0] in _PREFIX_REGISTRY:
        prefix, rest = name.split(":", 1)
        if not rest:
            raise KeyError(f"backbone {name!r} names no model after {prefix + ':'!r}")
        build = functools.partial(
            _PREFIX_REGISTRY[prefix], rest, pretrained=pretrained, pooling=pooling, **kwargs
        )
    else:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    if pretrained:
        bb = build()
    else:
        # Random weights are drawn from a fixed seed, so weights_hash="random" names one reproducible
        # function (cache keys stay honest) without touching the caller's RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            bb = build()
    return _finish(bb, full_pooling, colour)


def _finish(bb: Backbone, full_pooling: str, colour: bool) -> Backbone:
    """Optional colour block, then eval mode and frozen parameters."""
    if colour:
        bb = _add_colour(bb, full_pooling)
    bb.module.eval()
    for p in bb.module.parameters():
        p.requires_grad_(False)
    return bb


def _ensemble(names: list[str], *, pretrained: bool, pooling: str, **kwargs: Any) -> Backbone:
    """``a+b``: every member built with the same pooling and its own preprocessing (models/ensemble.py)."""
    members = [create_backbone(n, pretrained=pretrained, pooling=pooling, **kwargs) for n in names]
    pre = ensemble_preprocess([m.preprocess for m in members])
    net = EnsembleNet([Member(MemberInput(m.preprocess), m.module) for m in members])
    info = {
        "members": [
            {
                "name": m.name,
                "dim": m.dim,
                "pooling": m.pooling,
                "preprocess": m.preprocess.to_dict(),
                "weights": m.weights,
            }
            for m in members
        ]
    }
    return Backbone(
        ENSEMBLE_SEP.join(m.name for m in members),
        net,
        pre,
        sum(m.dim for m in members),
        members[0].pooling,
        " | ".join(m.weights for m in members),
        combined_hash([m.weights_hash for m in members]),
        info,
    )


def _add_colour(bb: Backbone, pooling: str) -> Backbone:
    """``<pooling>+colour``: append the joint RGB histogram block (models/colour.py) to the CNN features."""
    pre = bb.preprocess
    # The block reads the normalised input back as [0,1] RGB: x * scale = x_n * std + mean, so
    # x / 255 = x_n * std / k + mean / k with k = 255 * scale.
    k = pre.scale * 255.0
    hist = ColourHistogram(
        tuple(m / k for m in pre.mean),
        tuple(s / k for s in pre.std),  # type: ignore[arg-type]
    )
    bb.module = WithColour(bb.module, hist)
    bb.dim += hist.dim
    bb.pooling = pooling
    bb.info = {**bb.info, "colour": {"bins": hist.bins, "weight": hist.weight, "dim": hist.dim}}
    return bb


def _ensure_loaded() -> None:
    # Importing the modules runs their @register_backbone decorators.
    import uniembed.models.backbones  # noqa: F401
    import uniembed.models.hub_backbones  # noqa: F401
