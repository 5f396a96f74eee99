"""The `make model` recipe (configs/model.yaml) and loss options earlier recipes relied on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniembed.configs import config_path
from uniembed.models.heads import build_head, head_config, init_head_from_features, pca_fit
from uniembed.models.losses import SimilarityDistillLoss, build_loss, loss_config
from uniembed.train import TrainConfig


def test_model_yaml_is_a_valid_training_config() -> None:
    cfg = TrainConfig.from_yaml(config_path("model"))
    cfg.features = ["unused"]
    cfg.validate()
    assert "+" in cfg.backbone  # a backbone ensemble
    assert cfg.sampler == "neighbours" and cfg.finetune.enabled is False  # the backbone stays frozen
    # The untrained head is the PCA-64 projection of its training features.
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(300, 96, generator=g)
    head = build_head(head_config(dict(cfg.head, in_dim=96)))
    init_head_from_features(head, feats, cfg.head["init"])
    xn = F.normalize(feats, dim=1)
    mean, comps, _ = pca_fit(xn, 64)
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(feats), F.normalize((xn - mean) @ comps.T, dim=1))
    # Its loss trains both a margin term and the neighbour-ranking term, added with the configured weights.
    loss = build_loss(cfg.loss, num_classes=5, embedding_dim=64)
    assert loss.terms == ("margin", "rank")
    emb = F.normalize(torch.randn(16, 64, generator=g), dim=1)
    out = loss(emb, torch.arange(16) % 5, feats[:16])
    w = loss_config(cfg.loss)
    torch.testing.assert_close(
        out["loss"], w["margin_weight"] * out["margin"] + w["rank_weight"] * out["rank"]
    )
    assert out["rank"] > 0 and out["margin"] > 0


def test_centers_init_std_sets_small_centres() -> None:
    default = build_loss({"type": "arcface"}, num_classes=50, embedding_dim=64)
    small = build_loss({"type": "arcface", "centers_init_std": 0.01}, num_classes=50, embedding_dim=64)
    n_default = default.margin.centers().norm(dim=1).mean().item()
    n_small = small.margin.centers().norm(dim=1).mean().item()
    assert n_default > 4.0  # PML's N(0, 1) init in 64-d
    assert n_small == pytest.approx(0.08, rel=0.3)  # 0.01 * sqrt(64)
    with pytest.raises(ValueError, match="centers_init_std"):
        loss_config({"centers_init_std": -1})


def _offset_teacher_and_centred_student() -> tuple[torch.Tensor, torch.Tensor]:
    """All-positive features sharing a large common direction, and a student that reproduces only their
    centred geometry (what a centred head can express)."""
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(32, 16, generator=g)
    feats = torch.cat([signal, torch.zeros(32, 48)], dim=1) + 5.0  # ReLU-like positive offset
    centred = F.normalize(feats, dim=1)
    return feats, F.normalize(centred - centred.mean(0), dim=1)


def test_distill_center_removes_the_common_offset() -> None:
    """The centred teacher matches the centred student, the uncentred one does not."""
    feats, student = _offset_teacher_and_centred_student()
    plain = SimilarityDistillLoss(center=False)(student, feats).item()
    with_center = SimilarityDistillLoss(center=True)(student, feats).item()
    assert with_center < 1e-6 < plain


def test_distill_center_config_key_centres_the_built_loss() -> None:
    """``loss.distill_center`` reaches the distillation term the trainer builds: the centred student costs
    nothing with it and a clear amount without it, however the teacher's common offset moves."""
    feats, student = _offset_teacher_and_centred_student()
    y = torch.zeros(len(feats), dtype=torch.long)
    centred = build_loss({"type": "none", "distill_weight": 1.0, "distill_center": True}, 1, 64)
    plain = build_loss({"type": "none", "distill_weight": 1.0}, 1, 64)
    assert centred(student, y, feats)["loss"].item() < 1e-6 < plain(student, y, feats)["loss"].item()
    shifted = feats + 3.0  # a larger common offset: the uncentred target moves, the centred one hardly
    assert abs(plain(student, y, shifted)["loss"].item() - plain(student, y, feats)["loss"].item()) > 1e-4
    assert centred(student, y, shifted)["loss"].item() < 1e-5
