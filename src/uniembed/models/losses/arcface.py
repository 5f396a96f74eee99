"""``loss.type: arcface``: pytorch-metric-learning ``ArcFaceLoss`` (additive angular margin; Deng et al.
2019)."""

from __future__ import annotations

import numpy as np
from torch import nn

from uniembed.models.losses.margin import MarginLoss, margin_degrees
from uniembed.models.losses.registry import register_margin_loss


@register_margin_loss("arcface")
class ArcFaceLoss(MarginLoss):
    """cos(theta + m) for the true class, cos(theta) for the others, times ``scale``, then cross-entropy."""

    centers_transposed = True

    def build(
        self, cfg: dict, num_classes: int, embedding_dim: int, class_counts: np.ndarray | None
    ) -> nn.Module:
        from pytorch_metric_learning import losses as pml

        return pml.ArcFaceLoss(
            num_classes=num_classes,
            embedding_size=embedding_dim,
            margin=margin_degrees(cfg),
            scale=cfg["scale"],
        )
