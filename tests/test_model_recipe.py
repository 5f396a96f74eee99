"""The `make model` recipe (configs/model.yaml) and loss options earlier recipes relied on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniembed.configs import config_path
from uniembed.models.losses import SimilarityDistillLoss, build_loss, loss_config
from uniembed.train import TrainConfig


def test_model_yaml_is_a_valid_training_config() -> None:
    cfg = TrainConfig.from_yaml(config_path("model"))
    cfg.features = ["unused"]
    cfg.validate()
    loss = loss_config(cfg.loss)
    assert cfg.head["init"] == "pca" and cfg.head["out_dim"] == 64
    assert "+" in cfg.backbone  # a backbone ensemble (issue #11)
    assert loss["rank_weight"] > 0 and cfg.sampler == "neighbours"
    assert cfg.finetune.enabled is False  # the backbone stays frozen


def test_centers_init_std_sets_small_centres() -> None:
    default = build_loss({"type": "arcface"}, num_classes=50, embedding_dim=64)
    small = build_loss({"type": "arcface", "centers_init_std": 0.01}, num_classes=50, embedding_dim=64)
    n_default = default.margin.centers().norm(dim=1).mean().item()
    n_small = small.margin.centers().norm(dim=1).mean().item()
    assert n_default > 4.0  # PML's N(0, 1) init in 64-d
    assert n_small == pytest.approx(0.08, rel=0.3)  # 0.01 * sqrt(64)
    with pytest.raises(ValueError, match="centers_init_std"):
        loss_config({"centers_init_std": -1})


def test_distill_center_removes_the_common_offset() -> None:
    """All-positive features share a large common direction; the centred teacher matches a student that
    reproduces only the centred geometry, the uncentred one does not."""
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(32, 16, generator=g)
    feats = torch.cat([signal, torch.zeros(32, 48)], dim=1) + 5.0  # ReLU-like positive offset
    centred = F.normalize(feats, dim=1)
    student = F.normalize(centred - centred.mean(0), dim=1)  # what a centred head can express
    plain = SimilarityDistillLoss(center=False)(student, feats).item()
    with_center = SimilarityDistillLoss(center=True)(student, feats).item()
    assert with_center < 1e-6 < plain
    assert loss_config({"distill_weight": 1.0, "distill_center": True})["distill_center"] is True
