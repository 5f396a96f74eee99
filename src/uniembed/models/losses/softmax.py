"""``loss.type: softmax``: pytorch-metric-learning ``NormalizedSoftmaxLoss`` (cosine logits / temperature, no
margin): the no-margin baseline."""

from __future__ import annotations

import numpy as np
from torch import nn

from uniembed.models.losses.margin import MarginLoss
from uniembed.models.losses.registry import register_margin_loss


@register_margin_loss("softmax")
class NormalizedSoftmaxLoss(MarginLoss):
    """Softmax cross-entropy over ``scale`` x cosine to the class centres (temperature = 1 / scale)."""

    centers_transposed = True

    def build(
        self, cfg: dict, num_classes: int, embedding_dim: int, class_counts: np.ndarray | None
    ) -> nn.Module:
        from pytorch_metric_learning import losses as pml

        return pml.NormalizedSoftmaxLoss(
            num_classes=num_classes,
            embedding_size=embedding_dim,
            temperature=1.0 / max(cfg["scale"], 1e-6),
        )
