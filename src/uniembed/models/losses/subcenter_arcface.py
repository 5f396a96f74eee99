"""``loss.type: subcenter_arcface``: pytorch-metric-learning ``SubCenterArcFaceLoss`` (k centres per class,
the nearest one counts; Deng et al. 2020)."""

from __future__ import annotations

import numpy as np
from torch import nn

from uniembed.models.losses.margin import MarginLoss, margin_degrees
from uniembed.models.losses.registry import register_margin_loss


@register_margin_loss("subcenter_arcface")
class SubCenterArcFaceLoss(MarginLoss):
    """ArcFace against the nearest of ``sub_centers`` centres per class (3 unless the config sets it)."""

    defaults = {**MarginLoss.defaults, "sub_centers": 3}
    centers_transposed = True

    def build(
        self, cfg: dict, num_classes: int, embedding_dim: int, class_counts: np.ndarray | None
    ) -> nn.Module:
        from pytorch_metric_learning import losses as pml

        return pml.SubCenterArcFaceLoss(
            num_classes=num_classes,
            embedding_size=embedding_dim,
            margin=margin_degrees(cfg),
            scale=cfg["scale"],
            sub_centers=cfg["sub_centers"],
        )
