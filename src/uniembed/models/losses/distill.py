"""``loss.distill_weight``: similarity distillation, MSE between the batch cosine-similarity matrices of the
embedding and of the input features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uniembed.models.losses.batch_term import BatchTerm
from uniembed.models.losses.margin import check_non_negative
from uniembed.models.losses.registry import register_batch_term


@register_batch_term("distill")
class SimilarityDistillLoss(BatchTerm):
    """MSE between the batch cosine-similarity matrix of the embeddings and that of the (L2-normalised) input
    features, off the diagonal (the diagonal is 1 in both). Keeps the head close to the backbone's geometry,
    which is one way to stay 'universal' on domains absent from the training labels."""

    defaults = {
        "distill_weight": 0.0,  # 0 = off
        # Centre the teacher by the batch mean before the cosine similarities. Backbone features after ReLU
        # are all-positive, so their raw cosines sit near +0.6 for any pair, while a centred head
        # (``center: true``) outputs near-zero-mean similarities: the uncentred target drags the whole
        # embedding towards one direction and costs the domains left out of training.
        "distill_center": False,
    }
    weight_key = "distill_weight"

    def __init__(self, center: bool = False):
        super().__init__()
        self.center = bool(center)

    @classmethod
    def check_config(cls, c: dict) -> None:
        check_non_negative(c, "distill_weight")
        c["distill_center"] = bool(c["distill_center"])

    @classmethod
    def from_config(cls, c: dict) -> SimilarityDistillLoss:
        return cls(c["distill_center"])

    def forward(self, emb: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        e = F.normalize(emb.float(), dim=1)
        f = F.normalize(feats.float(), dim=1)
        if self.center:
            f = F.normalize(f - f.mean(0, keepdim=True), dim=1)
        n = e.shape[0]
        if n < 2:
            return e.sum() * 0.0
        off = ~torch.eye(n, dtype=torch.bool, device=e.device)
        return F.mse_loss((e @ e.T)[off], (f @ f.T)[off])
