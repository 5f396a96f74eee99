"""The loss config: one flat mapping (``type`` plus every registered term's keys), validated and filled.

The keys, their defaults and their checks live with the terms that read them (``defaults`` and
``check_config`` of each registered class); this module only assembles them. Every key is checked whatever
``type`` is, so a bad value fails even where the chosen loss does not read it.
"""

from __future__ import annotations

from typing import Any

from uniembed.models.losses.margin import MarginLoss
from uniembed.models.losses.registry import BATCH_TERMS, MARGIN_LOSSES, NO_MARGIN, loss_types

DEFAULT_TYPE = "arcface"


def loss_defaults() -> dict[str, Any]:
    """Every loss config key with its default: ``type``, the margin family's keys, the keys individual
    margin losses add, then the in-batch terms' keys."""
    d: dict[str, Any] = {"type": DEFAULT_TYPE, **MarginLoss.defaults}
    for cls in (*MARGIN_LOSSES.values(), *BATCH_TERMS.values()):
        for k, v in cls.defaults.items():
            d.setdefault(k, v)
    return d


def weight_keys() -> list[str]:
    """The config keys weighting each term of the total loss, in the order the terms are added."""
    return [MarginLoss.weight_key, *(t.weight_key for t in BATCH_TERMS.values())]


def loss_config(cfg: dict | None) -> dict:
    """Validate a loss config and fill defaults (the chosen margin loss's own defaults first)."""
    cfg = dict(cfg or {})
    defaults = loss_defaults()
    unknown = set(cfg) - set(defaults)
    if unknown:
        raise ValueError(f"unknown loss config keys {sorted(unknown)}; known: {', '.join(defaults)}")
    c = dict(defaults, **cfg)
    if c["type"] not in loss_types():
        raise ValueError(f"unknown loss type {c['type']!r}; known: {', '.join(loss_types())}")
    if c["type"] in MARGIN_LOSSES:
        c = {**defaults, **MARGIN_LOSSES[c["type"]].defaults, **cfg}
    MarginLoss.check_shared_config(c)
    for cls in (*MARGIN_LOSSES.values(), *BATCH_TERMS.values()):
        cls.check_config(c)
    if c["type"] == NO_MARGIN:
        c[MarginLoss.weight_key] = 0.0
    keys = weight_keys()
    if all(c[k] == 0 for k in keys):
        raise ValueError(f"loss has nothing to optimise: {', '.join(keys[:-1])} and {keys[-1]} are all 0")
    return c
