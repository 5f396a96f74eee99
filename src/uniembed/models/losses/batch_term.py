"""The interface of the in-batch similarity terms (distillation from the input features).

They compare the embedding's similarities inside a batch with those of the full-width input features, so
they see the whole batch at once; under DDP the trainer hands them the batch gathered from every rank.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class BatchTerm(nn.Module):
    """``forward(emb [N, E], feats [N, D]) -> scalar``, weighted by the loss config's ``weight_key``."""

    name: ClassVar[str] = ""
    #: This term's config keys with their defaults (its weight among them: 0 = off).
    defaults: ClassVar[dict[str, Any]] = {}
    weight_key: ClassVar[str] = ""

    @classmethod
    def check_config(cls, c: dict) -> None:
        """Validate and coerce (in place) this term's keys in the filled loss config ``c``."""

    @classmethod
    def from_config(cls, c: dict) -> BatchTerm:
        """The term as configured by the (checked) loss config ``c``."""
        raise NotImplementedError

    def forward(self, emb: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
