"""Second stage: fine-tune the last backbone block end-to-end on real images (8 images, 2 steps, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uniembed.configs import config_path
from uniembed.train import TrainConfig, load_head, train
from uniembed.train.finetune import backbone_blocks, unfreeze_last_blocks

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_features(small_labels_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uniembed.data.prepare import prepare
    from uniembed.features.extract import extract

    root = tmp_path_factory.mktemp("ft")
    prepare([str(small_labels_csv)], root / "ds", size=160, progress=False, workers=1)
    return extract(root / "ds", "mobilenetv2", out_root=root / "feats", progress=False, workers=0, threads=2)


def test_unfreeze_last_blocks_of_mobilenetv2() -> None:
    from uniembed.models.registry import create_backbone

    bb = create_backbone("mobilenetv2", pretrained=False)
    blocks = backbone_blocks(bb.module)
    assert len(blocks) == 19  # torchvision mobilenet_v2().features
    params = unfreeze_last_blocks(bb.module, 2)
    trainable = {id(p) for p in bb.module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params} == {id(p) for b in blocks[-2:] for p in b.parameters()}
    with pytest.raises(ValueError, match="1..19"):
        unfreeze_last_blocks(bb.module, 20)


@pytest.mark.shared_data
def test_finetune_stage_saves_backbone_and_updates_head(small_features: Path, tmp_path: Path) -> None:
    from uniembed.models.registry import create_backbone

    cfg = TrainConfig.from_yaml(config_path("smoke")).with_overrides(
        [
            "epochs=2",
            "finetune.enabled=true",
            "finetune.blocks=1",
            "finetune.max_images=8",
            "finetune.batch_size=4",
            "finetune.max_steps=2",
            "finetune.lr=1e-3",
            "finetune.max_val_images=24",
        ]
    )
    # Input given as dataset + backbone: train finds (here: reuses) the extracted features itself.
    cfg.dataset, cfg.features_root, cfg.out = (
        str(small_features.parent.parent / "ds"),
        str(small_features.parent),
        str(tmp_path / "run"),
    )
    run = train(cfg)
    head, rec = load_head(run)
    assert rec.backbone_state == "backbone_finetuned.pt" and rec.backbone == "mobilenetv2"
    assert rec.feature_dirs() == [small_features]
    ft = rec.finetune
    assert ft["steps"] == 2 and ft["images"] == 8 and ft["blocks"] == 1
    assert 0.0 <= ft["val"]["mP@5"] <= 1.0 and ft["val_images"] == 24
    # The saved state loads onto a freshly created backbone; only the last block moved.
    fresh = create_backbone("mobilenetv2", pretrained=True)
    state = torch.load(run / rec.backbone_state, weights_only=True)
    before = {k: v.clone() for k, v in fresh.module.state_dict().items()}
    fresh.module.load_state_dict(state)
    changed = {k.split(".")[1] for k in state if not torch.equal(state[k], before[k])}
    assert changed == {"18"}, changed  # body.18 = last block of mobilenet_v2().features
    # The fine-tuned head differs from stage 1's (saved in the checkpoint) and is in head.pt.
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert not torch.equal(ck["model"]["head.linear.weight"], rec.state_dict["linear.weight"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["kind"] == "finetune"
    assert json.loads((run / "summary.json").read_text())["finetune"]["steps"] == 2
