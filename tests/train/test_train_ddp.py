"""DDP: `uniembed train` under torchrun with 2 CPU processes (gloo) matches one process.

Why they should match: every rank takes a contiguous shard of the same global batch (same seeded permutation),
the per-rank margin loss is rescaled by n_rank * world / n_global so DDP's gradient average equals the
gradient of the global-batch mean, and the distillation term all-gathers the batch so its similarity matrix is
the global one. With a head without BatchNorm and dropout (per-shard statistics / per-rank RNG would differ by
design) the only difference left is float summation order. Measured max |diff| after 4 epochs: ~4e-8 on the
head weights, ~5e-7 on the ArcFace centres (|W| ~ 3); the test allows 1e-5 and equal val mP@5.
Batch size 25 splits into unequal shards (13 + 12), which exercises the rescaling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from uniembed.configs import config_path
from uniembed.train import TrainConfig, train
from uniembed.train.synthetic import write_synthetic_features

REPO = Path(__file__).resolve().parents[2]
SMOKE = config_path("smoke")
SETS = ["batch_size=25", "loss.distill_weight=2.0", "head.dropout=0.0", "head.batchnorm=false"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    feats = write_synthetic_features(tmp_path / "feats", nuisance=0.5, noise=0.2)
    ddp_run, one_run = tmp_path / "ddp", tmp_path / "one"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "uniembed.cli",
        "train",
        "-c",
        str(SMOKE),
        "-f",
        str(feats),
        "-o",
        str(ddp_run),
    ]
    for s in SETS:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cfg = TrainConfig.from_yaml(SMOKE).with_overrides(SETS)
    cfg.features, cfg.out = [str(feats)], str(one_run)
    train(cfg)

    a = torch.load(one_run / "checkpoint.pt", weights_only=False)
    b = torch.load(ddp_run / "checkpoint.pt", weights_only=False)
    assert b["world"] == 2 and a["world"] == 1 and len(b["rng"]) == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=0, msg=k)
    va = [h["val"]["mP@5"] for h in a["history"]]
    vb = [h["val"]["mP@5"] for h in b["history"]]
    assert va == pytest.approx(vb, abs=1e-9)
    la = [h["loss"] for h in a["history"][1:]]
    lb = [h["loss"] for h in b["history"][1:]]
    assert la == pytest.approx(lb, rel=1e-5)
    # Only rank 0 wrote outputs: one setup line, one line per epoch.
    lines = [json.loads(x) for x in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines].count("setup") == 1
    assert [x["epoch"] for x in lines if x["kind"] == "epoch"] == list(range(cfg.epochs + 1))
