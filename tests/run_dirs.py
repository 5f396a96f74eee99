"""Test helper (not a test module): a minimal training-run folder as `uniembed train` writes it, for the
tests of the stages that come after training (evaluate, export) without running a training."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from uniembed.core.run_record import HeadRecord


def write_head_run(run: Path, head: nn.Module, head_cfg: dict, feature_dir: Path, info: dict) -> Path:
    """``run/head.pt`` (docs/design.md layout) + ``run/config.yaml`` for a head trained on ``feature_dir``;
    ``info`` is the feature set's info.json (backbone, pooling, preprocess, fingerprint)."""
    from uniembed.train import TrainConfig

    run.mkdir(parents=True, exist_ok=True)
    HeadRecord(
        head_config=head_cfg,
        state_dict=head.state_dict(),
        backbone=info["backbone"],
        pooling=info.get("pooling", "avg"),
        preprocess=info.get("preprocess"),
        fingerprint=info["fingerprint"],
        feature_dir=str(feature_dir),
        embedding_dim=int(head_cfg["out_dim"]),
    ).save(run / "head.pt")
    TrainConfig(features=[str(feature_dir)]).to_yaml(run / "config.yaml")
    return run
