"""The loss registries: ``loss.type`` name -> margin-loss class, and the in-batch similarity terms.

A loss is one class in one file that registers itself here with its config keys (``defaults``) and their
checks (``check_config``); the flat loss config, its validation and :class:`EmbeddingLoss` are assembled from
these registries, so adding a loss is that file plus the import line in ``losses/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from uniembed.models.losses.batch_term import BatchTerm
    from uniembed.models.losses.margin import MarginLoss

#: ``loss.type`` -> margin loss class, in registration order (the order of the "known:" list in errors).
MARGIN_LOSSES: dict[str, type[MarginLoss]] = {}
#: In-batch similarity terms (they compare the embedding's batch similarities with the input features'),
#: in the order they are added to the total loss.
BATCH_TERMS: dict[str, type[BatchTerm]] = {}
#: ``loss.type`` value meaning "no margin term" (pure distillation).
NO_MARGIN = "none"

M = TypeVar("M", bound="type[MarginLoss]")
T = TypeVar("T", bound="type[BatchTerm]")


def register_margin_loss(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`MarginLoss` subclass selectable as ``loss.type: <name>``."""

    def add(cls: M) -> M:
        if name in MARGIN_LOSSES or name == NO_MARGIN:
            raise ValueError(f"margin loss {name!r} is already registered")
        cls.name = name
        MARGIN_LOSSES[name] = cls
        return cls

    return add


def register_batch_term(name: str) -> Callable[[T], T]:
    """Class decorator: add an in-batch similarity term, weighted by its ``weight_key`` (0 = off)."""

    def add(cls: T) -> T:
        if name in BATCH_TERMS or name == "margin":
            raise ValueError(f"loss term {name!r} is already registered")
        cls.name = name
        BATCH_TERMS[name] = cls
        return cls

    return add


def loss_types() -> tuple[str, ...]:
    """Every accepted ``loss.type``."""
    return (*MARGIN_LOSSES, NO_MARGIN)


def margin_loss_class(name: str) -> type[MarginLoss]:
    if name not in MARGIN_LOSSES:
        raise ValueError(f"unknown loss type {name!r}; known: {', '.join(loss_types())}")
    return MARGIN_LOSSES[name]
