"""Train a projection head on cached features: ``train(config) -> run_dir``.

- Features live in memory as one float32 tensor (on the training device); batches are index permutations
  (train/loop.py).
- Seeded and deterministic; an atomic checkpoint each epoch (model, loss centres, optimizer, scheduler, epoch,
  RNG states of every rank) lets ``resume=True`` continue exactly where it stopped (train/checkpoint.py).
- Validation each epoch on held-out ("unseen") labels: GUIE mP@5 leave-one-out, overall and per domain, next
  to two baselines computed once on the same split: raw (L2-normalised) features and PCA-64
  (train/validate.py).
- DDP: launched with ``torchrun --nproc_per_node N``; each rank takes a contiguous shard of every global
  batch; gradients are averaged by DDP and the per-rank loss is rescaled so the update equals that of one
  process on the whole batch (exactly, up to float summation order, when the head has no BatchNorm/dropout:
  BatchNorm statistics are per shard unless SyncBatchNorm, which needs CUDA, and dropout masks come from
  per-rank RNGs). The in-batch similarity terms all-gather the batch so their similarity matrices are the
  global ones (train/distributed.py). Rank 0 validates and writes every output.

Run directory: ``config.yaml``, ``head.pt``, ``checkpoint.pt``, ``metrics.jsonl``, ``curve.png``,
``summary.json``, ``split.json`` (train / held-out labels; train/report.py), and ``backbone_finetuned.pt``
after the optional fine-tune stage (train/finetune.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from uniembed.core.run_record import HEAD_FILE
from uniembed.train.checkpoint import (
    CHECKPOINT_FILE,
    check_run_dir,
    head_record,
    load_head,
    resume_state,
    selected_head,
)
from uniembed.train.config import TrainConfig
from uniembed.train.data import TrainData, nearest_rows, prepare_data
from uniembed.train.distributed import DistInfo, setup_distributed, teardown_distributed
from uniembed.train.loop import RunContext, run_epochs
from uniembed.train.report import (
    CURVE_FILE,
    final_val,
    plot_curve,
    summary_table,
    write_metrics,
    write_split,
    write_summary,
)
from uniembed.train.state import TrainState, build_train_state
from uniembed.train.validate import baselines, score_val

__all__ = ["load_head", "resolve_feature_dirs", "run_dir_for", "train"]


def train(
    config: TrainConfig, resume: bool = False, stop_after: int | None = None, overwrite: bool = False
) -> Path:
    """Train a head (then optionally fine-tune the backbone); returns the run dir.

    ``resume``: continue from ``<run>/checkpoint.pt`` (exactly: same batches, RNG, optimizer state).
    ``stop_after``: stop after this many epochs in total (e.g. to split a long run into sessions), keeping the
    schedule of the full ``epochs``. ``overwrite``: start over in a run dir that already has a checkpoint.
    """
    from rich.console import Console

    cfg = config.validate()
    di = setup_distributed(cfg.device)
    console = Console(stderr=True, quiet=not di.is_main)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, di, console, resume, stop_after, overwrite)
    finally:
        torch.set_num_threads(threads)  # the head-training thread count is ours, not the caller's
        teardown_distributed(di)


def run_dir_for(cfg: TrainConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path("artifacts") / "runs" / cfg.name


def resolve_feature_dirs(cfg: TrainConfig, di: DistInfo) -> list[str]:
    """The configured feature dirs, or extract (or reuse) features of ``dataset`` with ``backbone``."""
    if cfg.features:
        return [str(f) for f in cfg.features]
    from uniembed.features.extract import extract

    d = None
    if di.is_main:
        d = extract(cfg.dataset, backbone=cfg.backbone, out_root=cfg.features_root, pooling=cfg.pooling)
    di.barrier()
    if not di.is_main:  # complete by now: returns at once
        d = extract(cfg.dataset, backbone=cfg.backbone, out_root=cfg.features_root, pooling=cfg.pooling)
    return [str(d)]


def _set_determinism(cfg: TrainConfig, device: torch.device) -> None:
    if not cfg.deterministic:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def _load_data(cfg: TrainConfig, di: DistInfo, run: Path, console: Any) -> TrainData:
    """The training data (features, label split); creates the run dir only once it loaded."""
    dirs = resolve_feature_dirs(cfg, di)
    t0 = time.perf_counter()
    s = cfg.split
    data = prepare_data(
        dirs, s.val_fraction, s.seed, cfg.train_domains, s.unseen_domains_all_labels, s.photo_fraction
    )
    load_s = time.perf_counter() - t0
    if di.is_main:  # only now: bad input leaves no empty run dir behind
        run.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]train[/] {len(data.train_idx)} rows / {len(data.classes)} classes, val {len(data.val_idx)} "
        f"rows / {len(data.split.val_labels)} labels"
        + (f", {len(data.photo_idx)} photos of training labels held out" if len(data.photo_idx) else "")
        + f", dim {data.dim}, world {di.world} on {di.device} "
        f"(loaded in {load_s:.1f}s)"
    )
    return data


def _run_meta(data: TrainData, di: DistInfo, steps: int) -> dict[str, Any]:
    """The ``setup`` record of metrics.jsonl (also in summary.json)."""
    return {
        "train_rows": len(data.train_idx),
        "classes": len(data.classes),
        "val_rows": int(len(data.val_idx)),
        "val_labels": len(data.split.val_labels),
        "heldout_photos": int(len(data.photo_idx)),
        "split": data.split.summary(),
        "world": di.world,
        "device": str(di.device),
        "steps_per_epoch": steps,
        "feature_dirs": data.feature_dirs,
    }


def _start_outputs(ctx: RunContext, state: TrainState) -> None:
    """Rank 0, before the first epoch: config.yaml, split.json and epoch 0 (the untrained, e.g.
    PCA-initialised, head) unless resuming."""
    ctx.cfg.to_yaml(ctx.run / "config.yaml")
    write_split(ctx.run, ctx.data)
    if not state.history and ctx.has_val:
        val = score_val(state.head, ctx.val_feats, ctx.data)
        state.history.append({"epoch": 0, "loss": None, "val": val})


def _finish_outputs(ctx: RunContext, state: TrainState, last: int) -> None:
    """Rank 0, after the last epoch: metrics, curve, the selected head as head.pt, summary."""
    cfg, run = ctx.cfg, ctx.run
    write_metrics(run, ctx.base, state.history, ctx.meta)
    plot_curve(state.history, ctx.base, run / CURVE_FILE)
    final_head, selected = selected_head(state, cfg, last)
    head_record(state.head_config, final_head, ctx.data, selected).save(run / HEAD_FILE)
    final = final_val(state.history, state.best, cfg.select == "best")
    write_summary(run, state.history, ctx.base, ctx.meta, final, state.best)
    summary_table(ctx.base, final, ctx.console)


def _train(
    cfg: TrainConfig, di: DistInfo, console: Any, resume: bool, stop_after: int | None, overwrite: bool
) -> Path:
    run = run_dir_for(cfg)
    check_run_dir(run, resume, overwrite)
    di.barrier()
    _set_determinism(cfg, di.device)
    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    data = _load_data(cfg, di, run, console)
    ctx = RunContext.create(cfg, di, console, run, data)
    state = build_train_state(cfg, di, data)
    if not ctx.has_val:
        console.print("[yellow]no held-out labels with 2+ images: validation skipped[/]")
    ctx.base = baselines(data, state.head_config["out_dim"]) if di.is_main and ctx.has_val else {}
    if resume:
        resume_state(run / CHECKPOINT_FILE, state, cfg, di)
        console.print(f"resumed from epoch {state.start_epoch}")
    ctx.meta = _run_meta(data, di, state.steps)
    if di.is_main:
        _start_outputs(ctx, state)

    # Nearest training rows by full-width cosine, once per run (the ``neighbours`` sampler's table).
    ctx.neighbours = nearest_rows(data.feats[data.train_idx]) if cfg.sampler == "neighbours" else None
    last = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    run_epochs(ctx, state, last)
    if di.is_main:
        _finish_outputs(ctx, state, last)

    if cfg.finetune.enabled and last == cfg.epochs:
        if di.is_main:
            torch.set_num_threads(threads_before)  # convolutions do benefit from every core
            from uniembed.train.finetune import finetune

            finetune(cfg, run, data, console)
        di.barrier()
    return run
