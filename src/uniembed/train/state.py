"""What head training updates: the head and its loss in one module, the optimiser, the schedule, the history.

The model is seeded identically on every rank (DDP also broadcasts rank 0's parameters); after it is built
each rank gets its own torch RNG stream, for dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from uniembed.models.heads import build_head, head_config, init_head_from_features
from uniembed.models.losses import EmbeddingLoss, build_loss
from uniembed.train.config import TrainConfig
from uniembed.train.data import TrainData
from uniembed.train.distributed import DistInfo, batch_gather
from uniembed.train.optim import build_optimizer, build_scheduler


class TrainModule(nn.Module):
    """Head + loss in one module so DDP averages the gradients of both (the class centres are parameters)."""

    def __init__(self, head: nn.Module, loss: EmbeddingLoss):
        super().__init__()
        self.head = head
        self.loss = loss

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        margin_scale: float = 1.0,
        shard_sizes: list[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss of one batch (or of this rank's shard of it: ``shard_sizes`` are every rank's rows);
        term values come back detached, for logging."""
        gather = batch_gather(shard_sizes) if shard_sizes is not None else None
        out = self.loss(self.head(x), y, x, margin_scale=margin_scale, gather=gather)
        return {k: v if k == "loss" else v.detach() for k, v in out.items()}


@dataclass
class TrainState:
    """Everything the epochs update and a checkpoint restores."""

    model: TrainModule
    ddp: nn.Module  # what the steps call: ``model``, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    head_config: dict
    steps: int  # optimiser steps per epoch
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    best: dict | None = None  # {"epoch", "mP@5", "state_dict"} of the best validated head

    @property
    def head(self) -> nn.Module:
        return self.model.head

    @property
    def loss(self) -> EmbeddingLoss:
        return self.model.loss


def steps_per_epoch(n_train: int, batch_size: int, world: int, batchnorm: bool) -> int:
    """Full batches, plus the last partial one if every rank gets enough rows of it (BatchNorm needs 2)."""
    min_batch = world * (2 if batchnorm else 1)
    n_full, rem = divmod(n_train, batch_size)
    steps = n_full + (1 if rem >= min_batch else 0)
    if steps == 0:
        raise ValueError(f"{n_train} training rows: too few for one batch on {world} rank(s)")
    return steps


def build_train_state(cfg: TrainConfig, di: DistInfo, data: TrainData) -> TrainState:
    """Head (initialised from the training features), loss, optimiser and schedule, on ``di.device``."""
    dev = di.device
    hcfg = head_config(dict(cfg.head, in_dim=data.dim))
    torch.manual_seed(cfg.seed)
    head = build_head(hcfg)
    init_head_from_features(head, data.feats[data.train_idx], hcfg["init"])
    loss = build_loss(cfg.loss, len(data.classes), hcfg["out_dim"], data.class_counts())
    model = TrainModule(head, loss).to(dev)
    if di.world > 1 and dev.type == "cuda" and hcfg["batchnorm"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = build_optimizer(cfg, model.head, model.loss)
    steps = steps_per_epoch(len(data.train_idx), cfg.batch_size, di.world, hcfg["batchnorm"])
    sched = build_scheduler(cfg, opt, steps)
    ddp = (
        nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if di.world > 1
        else model
    )
    torch.manual_seed(cfg.seed + 7919 * (di.rank + 1))  # per-rank stream for dropout
    return TrainState(model=model, ddp=ddp, opt=opt, sched=sched, head_config=hcfg, steps=steps)
