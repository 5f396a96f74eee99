"""The epochs and steps of head training, and what rank 0 does after each epoch (validate, checkpoint,
report).

Features live in memory as one float32 tensor on the training device; an epoch is a seeded index order over
its training rows (``epoch_order``), cut into global batches; under DDP each rank trains on its shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniembed.core.run_record import HEAD_FILE
from uniembed.train.checkpoint import CHECKPOINT_FILE, gather_rng_states, head_record, save_checkpoint
from uniembed.train.config import TrainConfig
from uniembed.train.data import TrainData, epoch_order
from uniembed.train.distributed import DistInfo, all_reduce_sum, rank_shard
from uniembed.train.report import epoch_line, step_progress, write_metrics
from uniembed.train.state import TrainState
from uniembed.train.validate import score_val


@dataclass
class RunContext:
    """The fixed inputs of one training run, with the training rows already on the device."""

    cfg: TrainConfig
    di: DistInfo
    console: Any
    run: Path
    data: TrainData
    x_train: torch.Tensor  # training features on the device
    y_train: torch.Tensor  # their class ids on the device
    dom_train: np.ndarray  # their domains
    val_feats: torch.Tensor  # held-out rows' features on the device
    has_val: bool  # enough held-out rows (2+) to validate
    base: dict[str, dict] = field(default_factory=dict)  # baseline scores (rank 0)
    meta: dict[str, Any] = field(default_factory=dict)  # the "setup" record of metrics.jsonl
    neighbours: torch.Tensor | None = None  # nearest-rows table of the ``neighbours`` sampler

    @classmethod
    def create(cls, cfg: TrainConfig, di: DistInfo, console: Any, run: Path, data: TrainData) -> RunContext:
        dev = di.device
        return cls(
            cfg=cfg,
            di=di,
            console=console,
            run=run,
            data=data,
            x_train=data.feats[data.train_idx].to(dev),
            y_train=data.y_train.to(dev),
            dom_train=data.domains[data.train_idx],
            val_feats=data.feats[data.val_idx].to(dev),
            has_val=len(data.val_idx) >= 2,
        )


class LossSums:
    """An epoch's running sums per loss term (value x rows) and of rows, kept on the device (no host sync
    per step) in one float64 tensor, so DDP sums them over ranks in one call."""

    def __init__(self, terms: tuple[str, ...], device: torch.device):
        self.terms = terms
        self.values = torch.zeros(len(terms) + 1, dtype=torch.float64, device=device)  # ..., rows

    def add(self, out: dict[str, torch.Tensor], rows: int) -> None:
        for i, name in enumerate(self.terms):
            self.values[i] += out[name].double() * rows
        self.values[-1] += rows

    def all_reduce(self, di: DistInfo) -> None:
        all_reduce_sum(self.values, di)

    def means(self) -> dict[str, float]:
        """Per-term mean over every row of the epoch."""
        v = self.values.cpu()
        return {name: float(v[i] / v[-1]) for i, name in enumerate(self.terms)}


def train_step(ctx: RunContext, state: TrainState, pos: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """One optimiser step on the global batch ``pos`` (this rank's shard of it); its loss terms and rows."""
    pos, scale, shard = rank_shard(pos, ctx.di)
    out = state.ddp(ctx.x_train[pos], ctx.y_train[pos], scale, shard)
    state.opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    if ctx.cfg.optim.grad_clip > 0:
        nn.utils.clip_grad_norm_(state.model.parameters(), ctx.cfg.optim.grad_clip)
    state.opt.step()
    state.sched.step()
    return out, len(pos)


def train_epoch(ctx: RunContext, state: TrainState, epoch: int, progress: Any, task: Any) -> dict[str, float]:
    """Every step of one epoch; returns the epoch's mean of each active loss term (over all ranks)."""
    cfg, B = ctx.cfg, ctx.cfg.batch_size
    state.model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = epoch_order(
        len(ctx.data.train_idx), cfg.sampler, gen, ctx.data.y_train, ctx.dom_train, ctx.neighbours
    ).to(ctx.di.device)
    sums = LossSums(state.loss.terms, ctx.di.device)
    progress.reset(task, total=state.steps, ep=f"{epoch}/{cfg.epochs}", loss="-")
    for s in range(state.steps):
        out, rows = train_step(ctx, state, order[s * B : (s + 1) * B])
        sums.add(out, rows)
        show = s % 25 == 0 or s == state.steps - 1
        progress.update(task, advance=1, **({"loss": f"{float(out['loss'].detach()):.4f}"} if show else {}))
    sums.all_reduce(ctx.di)
    return sums.means()


def epoch_record(state: TrainState, epoch: int, parts: dict[str, float], train_s: float) -> dict[str, Any]:
    """The epoch's line of metrics.jsonl (before validation): lr, time, total loss and each term's."""
    lr = state.opt.param_groups[0]["lr"]
    rec: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_s": round(train_s, 3)}
    rec["loss"] = state.loss.weighted_total(parts)
    rec.update({f"loss_{k}": v for k, v in parts.items()})
    return rec


def validate_epoch(ctx: RunContext, state: TrainState, rec: dict[str, Any]) -> None:
    """Score the head on the held-out rows into ``rec``; remember it if it is the best so far."""
    t_v = time.perf_counter()
    rec["val"] = score_val(state.head, ctx.val_feats, ctx.data)
    rec["val_s"] = round(time.perf_counter() - t_v, 3)
    if state.best is None or rec["val"]["mP@5"] > state.best["mP@5"]:
        state.best = {
            "epoch": rec["epoch"],
            "mP@5": rec["val"]["mP@5"],
            "state_dict": {k: v.detach().cpu().clone() for k, v in state.head.state_dict().items()},
        }


def end_epoch(
    ctx: RunContext, state: TrainState, rec: dict[str, Any], rngs: list[dict], last: int, train_s: float
) -> None:
    """Rank 0 after an epoch: validate (every ``val_every`` and at the end), then checkpoint and rewrite the
    head and the metrics, so a stopped run keeps every finished epoch."""
    cfg, epoch = ctx.cfg, rec["epoch"]
    if ctx.has_val and (epoch % cfg.val_every == 0 or epoch == last):
        validate_epoch(ctx, state, rec)
    state.history.append(rec)
    save_checkpoint(ctx.run / CHECKPOINT_FILE, state, epoch, rngs, cfg, ctx.di.world)
    head_record(state.head_config, state.head, ctx.data).save(ctx.run / HEAD_FILE)
    write_metrics(ctx.run, ctx.base, state.history, ctx.meta)
    ctx.console.print(epoch_line(rec, cfg.epochs, train_s))


def run_epochs(ctx: RunContext, state: TrainState, last: int) -> None:
    """Epochs ``start_epoch + 1 .. last`` (``last`` < ``epochs`` when stopping early)."""
    di = ctx.di
    progress = step_progress("epoch", ctx.console, enabled=ctx.cfg.progress and di.is_main)
    with progress:
        task = progress.add_task("train", total=state.steps, ep="-", loss="-")
        for epoch in range(state.start_epoch + 1, last + 1):
            t_ep = time.perf_counter()
            parts = train_epoch(ctx, state, epoch, progress, task)
            train_s = time.perf_counter() - t_ep
            rec = epoch_record(state, epoch, parts, train_s)
            rngs = gather_rng_states(di)
            if di.is_main:
                end_epoch(ctx, state, rec, rngs, last, train_s)
            di.barrier()
