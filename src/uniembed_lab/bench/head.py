"""Head-epoch measure: one training epoch of the projection head on cached features, vs producing the same
samples the original GUIE way (frozen backbone re-run inside the training loop, then the head step).

The project side runs the real trainer (``uniembed.train.train``) on the feature cache of the benchmark's
image subset and reads its per-epoch training time. The baseline side times the frozen backbone's forward
pass plus the same head step (same head, loss and optimizer config) on a few batches of real images and
extrapolates to the same number of samples; image decoding is left out, which flatters the baseline.
"""

from __future__ import annotations

import json
import statistics
import time

from uniembed_lab.bench.common import BenchConfig, ProgressFile, write_json
from uniembed_lab.bench.extract import select_images, write_subset_csv


def _feature_dir(cfg: BenchConfig, progress: ProgressFile):
    """The subset's feature cache: made by the extract measure, or made here (prepare/extract are cached)."""
    from uniembed.data.prepare import prepare
    from uniembed.features.extract import extract

    csv_path = write_subset_csv(cfg, select_images(cfg))
    progress.update(0, 1, "feature cache of the image subset (prepare + extract, cached)", force=True)
    ds = cfg.work_dir / "dataset"
    prepare([str(csv_path)], ds, min_per_class=1, progress=False)
    return extract(ds, cfg.backbone, out_root=cfg.work_dir / "features", threads=cfg.threads, progress=False)


def head_epoch_project(cfg: BenchConfig, progress: ProgressFile) -> dict:
    from uniembed.train import TrainConfig, train

    fdir = _feature_dir(cfg, progress)
    epochs = 2 if cfg.quick else 5
    run = cfg.work_dir / "head_run"
    tc = TrainConfig(features=[str(fdir)], epochs=epochs, out=str(run), name="bench", progress=False)
    progress.update(0, 1, f"training the head for {epochs} epochs on cached features", force=True)
    t0 = time.perf_counter()
    train(tc, overwrite=True)
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epoch_s = [h["train_s"] for h in history if h.get("train_s") is not None]
    if not epoch_s:
        raise RuntimeError(f"{run}/metrics.jsonl has no per-epoch train_s")
    summary = json.loads((run / "summary.json").read_text())
    n_train = int(summary["train_rows"])
    fig = float(statistics.median(epoch_s))
    shared = {
        "train_rows": n_train,
        "classes": int(summary["classes"]),
        "batch_size": tc.batch_size,
        "feature_dir": str(fdir),
        "head": tc.head,
        "loss": tc.loss,
    }
    write_json(cfg.work_dir / "head_epoch_project.json", shared)
    return {
        "figure": fig,
        "unit": "seconds/epoch",
        "details": {
            "measured": "uniembed.train.train on the cached features of the image subset; median of the "
            "trainer's per-epoch training time (train_s in metrics.jsonl, validation excluded)",
            "epochs": epochs,
            "epoch_seconds": epoch_s,
            "samples_per_epoch": n_train,
            "steps_per_epoch": int(summary.get("steps_per_epoch", 0)),
            "trainer_threads": tc.threads,
            "train_call_wall_s": wall,
            **shared,
        },
    }


def head_epoch_baseline(cfg: BenchConfig, progress: ProgressFile) -> dict:
    """Backbone forward + head step on ``head_backbone_batches`` real batches, extrapolated to the epoch."""
    import torch

    from uniembed.data.images import load_image
    from uniembed.models.heads import build_head, head_config
    from uniembed.models.losses import build_loss
    from uniembed.models.registry import create_backbone
    from uniembed.train import TrainConfig
    from uniembed.train.optim import build_optimizer

    shared_path = cfg.work_dir / "head_epoch_project.json"
    if not shared_path.exists():
        raise FileNotFoundError(f"{shared_path} missing: the project side of head_epoch must run first")
    shared = json.loads(shared_path.read_text())
    n_train, n_cls = int(shared["train_rows"]), int(shared["classes"])

    torch.set_num_threads(cfg.threads)
    bb = create_backbone(cfg.backbone)
    pre = bb.preprocessor()
    B, K = cfg.batch_size, cfg.head_backbone_batches
    rows = select_images(cfg)[: B * (K + 1)]
    from torchvision.transforms.functional import pil_to_tensor

    with torch.no_grad():
        pix = [pre(pil_to_tensor(load_image(r["path"]))[None])[0] for r in rows]
    batches = [torch.stack(pix[i * B : (i + 1) * B]) for i in range(len(pix) // B)]
    if len(batches) < 2:
        raise RuntimeError(f"need at least {2 * B} images for the baseline, got {len(pix)}")

    tc = TrainConfig()
    hcfg = head_config(dict(tc.head, in_dim=bb.dim))
    head = build_head(hcfg)
    loss = build_loss(tc.loss, n_cls, hcfg["out_dim"])
    opt = build_optimizer(tc, head, loss)
    gen = torch.Generator().manual_seed(cfg.seed)

    def step(x: torch.Tensor) -> None:
        with torch.no_grad():
            feats = bb.module(x)  # the frozen backbone, re-run for every sample of every epoch
        y = torch.randint(0, n_cls, (x.shape[0],), generator=gen)
        out = loss(head(feats), y, feats)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    head.train()
    step(batches[0])  # warm-up batch (allocations, oneDNN primitive caches), not timed
    times = []
    for i, x in enumerate(batches[1:]):
        t0 = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - t0)
        progress.update(i + 1, len(batches) - 1, "frozen backbone forward + head step")
    per_sample = sum(times) / (len(times) * B)
    epoch = per_sample * n_train
    return {
        "figure": epoch,
        "unit": "seconds/epoch",
        "details": {
            "measured": f"torch eager backbone forward (no_grad, {cfg.threads} threads) + head step (same "
            "head, "
            f"loss and Adam config as the trainer) on {len(times)} batches of {B} real images, extrapolated "
            f"to {n_train} samples; decoding/preprocessing excluded (the original also paid for it)",
            "extrapolated": True,
            "timed_batches": len(times),
            "batch_size": B,
            "batch_seconds": times,
            "seconds_per_sample": per_sample,
            "samples_per_epoch": n_train,
        },
    }
