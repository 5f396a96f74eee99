"""The margin-loss interface every ``loss.type`` implements, and the config checks they share.

All margin losses here are "margin-modified cosine logits, times a scale s, then softmax cross-entropy" (what
the GUIE 2022 solutions called "ArcFace before softmax + cross-entropy"). Margins are read in ``margin_unit``
(``rad`` by default: 0.5 rad = 28.6 deg as in the ArcFace paper); pytorch-metric-learning wants degrees, so
the conversion happens in one place, :func:`margin_degrees`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


def to_radians(value: float, unit: str) -> float:
    return float(value) if unit == "rad" else math.radians(float(value))


def margin_degrees(cfg: dict) -> float:
    """The config's margin in degrees (what pytorch-metric-learning expects)."""
    return math.degrees(to_radians(cfg["margin"], cfg["margin_unit"]))


def check_non_negative(c: dict, *keys: str) -> None:
    """Coerce ``keys`` of the loss config ``c`` to float in place; negative values are config errors."""
    for k in keys:
        c[k] = float(c[k])
        if c[k] < 0:
            raise ValueError(f"loss {k} must be >= 0, got {c[k]}")


class MarginLoss(nn.Module):
    """One margin loss, one interface: ``forward(emb, labels) -> scalar`` and ``centers() -> [C*k, E]``.

    A subclass per ``loss.type`` (registered with ``register_margin_loss``) declares the config keys it reads
    in ``defaults`` and builds the underlying criterion ``fn`` in :meth:`build`; its class centres are
    ``fn.W`` (a parameter, trained with the head).
    """

    name: ClassVar[str] = ""
    #: Config keys of the margin family with their defaults; subclasses add theirs or override a default
    #: (applied when the user config leaves the key out).
    defaults: ClassVar[dict[str, Any]] = {
        "scale": 30.0,  # s: logits = s * cos(...)
        "margin": 0.5,  # m, in margin_unit
        "margin_unit": "rad",  # rad | deg
        "sub_centers": 1,  # k centres per class, for the losses that have sub-centres
        "margin_weight": 1.0,  # weight of the margin term in the total loss
        # > 0: initialise the class centres N(0, std) instead of the library default (PML: N(0, 1)). With
        # Adam every step moves a centre by about lr whatever its norm, so small centres turn to their
        # classes within a few steps, while unit-scale ones barely move and drag a PCA-initialised head
        # off its geometry (docs/experiments-archive.md).
        "centers_init_std": 0.0,
    }
    #: Key of this term's weight in the loss config.
    weight_key: ClassVar[str] = "margin_weight"
    #: True when the criterion stores its centres transposed, as [E, C*k] (pytorch-metric-learning).
    centers_transposed: ClassVar[bool] = False

    def __init__(
        self, cfg: dict, num_classes: int, embedding_dim: int, class_counts: np.ndarray | None = None
    ):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.fn = self.build(cfg, num_classes, embedding_dim, class_counts)
        std = float(cfg.get("centers_init_std", 0.0))
        if std > 0:
            with torch.no_grad():
                self.fn.W.normal_(0.0, std)

    def build(
        self, cfg: dict, num_classes: int, embedding_dim: int, class_counts: np.ndarray | None
    ) -> nn.Module:
        """The criterion ``fn(emb, labels) -> scalar`` with its centres in ``fn.W``."""
        raise NotImplementedError

    @staticmethod
    def check_shared_config(c: dict) -> None:
        """Validate and coerce (in place) the margin family's keys (``MarginLoss.defaults``) in the filled
        loss config ``c``."""
        if c["margin_unit"] not in ("rad", "deg"):
            raise ValueError(f"margin_unit must be 'rad' or 'deg', got {c['margin_unit']!r}")
        check_non_negative(c, "scale", "margin", "margin_weight", "centers_init_std")
        c["sub_centers"] = int(c["sub_centers"])
        if c["sub_centers"] < 1:
            raise ValueError("loss sub_centers must be >= 1")

    @classmethod
    def check_config(cls, c: dict) -> None:
        """Validate and coerce (in place) the keys this loss adds to the shared ones. Every registered loss
        checks its keys whatever ``loss.type`` is, so a bad value fails even where it is not used."""

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.fn(emb, labels)

    def centers(self) -> torch.Tensor:
        """Class centres as rows [C*k, E]."""
        w = self.fn.W
        return w.T if self.centers_transposed else w
