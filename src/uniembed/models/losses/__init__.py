"""Training losses for projection heads: margin softmax losses + optional in-batch distillation terms.

    total = margin_weight * margin_loss(emb, labels) + distill_weight * distill_loss(emb, input_features)
            + rank_weight * rank_loss(emb, input_features)

Margin losses (``loss.type``; one file each, registered by name in :mod:`.registry`):

- ``arcface``: pytorch-metric-learning ``ArcFaceLoss`` (additive angular margin).
- ``subcenter_arcface``: PML ``SubCenterArcFaceLoss`` (k centres per class, max over them).
- ``dynamic_arcface``: our own ArcFace with a per-class margin from the class counts.
- ``softmax``: PML ``NormalizedSoftmaxLoss`` (no margin), the no-margin baseline.
- ``none``: no margin term (pure distillation; needs ``distill_weight`` or ``rank_weight`` > 0).

In-batch terms: ``distill`` (similarity MSE, :mod:`.distill`) and ``rank`` (neighbour-ranking KL,
:mod:`.rank`). :class:`EmbeddingLoss` (:mod:`.embedding`) is the one place that combines them; the flat config
(:func:`loss_config`) is assembled from the registered classes' ``defaults``.

To add a loss: a new file with a ``MarginLoss`` (or ``BatchTerm``) subclass decorated with
``register_margin_loss("name")`` (or ``register_batch_term``), and its import below.
"""

from __future__ import annotations

# The built-in terms register themselves on import, in this order: the order of the "known:" lists in
# config errors and of the in-batch terms in the total loss (so also of its float additions).
# isort: off
from uniembed.models.losses import arcface, subcenter_arcface, dynamic_arcface, softmax  # noqa: F401
from uniembed.models.losses import distill, rank  # noqa: F401

# isort: on
from uniembed.models.losses.arcface import ArcFaceLoss
from uniembed.models.losses.batch_term import BatchTerm
from uniembed.models.losses.config import loss_config, loss_defaults, weight_keys
from uniembed.models.losses.distill import SimilarityDistillLoss
from uniembed.models.losses.dynamic_arcface import DynamicArcFaceLoss, DynamicMarginArcFace, dynamic_margins
from uniembed.models.losses.embedding import BatchGather, EmbeddingLoss, build_loss, loss_terms
from uniembed.models.losses.margin import MarginLoss, margin_degrees, to_radians
from uniembed.models.losses.rank import NeighbourRankDistillLoss
from uniembed.models.losses.registry import (
    BATCH_TERMS,
    MARGIN_LOSSES,
    loss_types,
    register_batch_term,
    register_margin_loss,
)
from uniembed.models.losses.softmax import NormalizedSoftmaxLoss
from uniembed.models.losses.subcenter_arcface import SubCenterArcFaceLoss

__all__ = [
    "BATCH_TERMS",
    "MARGIN_LOSSES",
    "ArcFaceLoss",
    "BatchGather",
    "BatchTerm",
    "DynamicArcFaceLoss",
    "DynamicMarginArcFace",
    "EmbeddingLoss",
    "MarginLoss",
    "NeighbourRankDistillLoss",
    "NormalizedSoftmaxLoss",
    "SimilarityDistillLoss",
    "SubCenterArcFaceLoss",
    "build_loss",
    "dynamic_margins",
    "loss_config",
    "loss_defaults",
    "loss_terms",
    "loss_types",
    "margin_degrees",
    "register_batch_term",
    "register_margin_loss",
    "to_radians",
    "weight_keys",
]
