"""The optimiser and learning-rate schedule shared by head training and the fine-tune stage."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from uniembed.train.config import TrainConfig


def build_optimizer(
    cfg: TrainConfig,
    head: nn.Module,
    loss: nn.Module,
    head_lr: float | None = None,
    extra_groups: list[dict] | None = None,
) -> torch.optim.Optimizer:
    """Head params at (lr, weight_decay); the loss's class centres in their own group (x centers_lr_mult)."""
    o = cfg.optim
    lr = o.lr if head_lr is None else head_lr
    groups = [
        {
            "params": [p for p in head.parameters() if p.requires_grad],
            "lr": lr,
            "weight_decay": o.weight_decay,
            "name": "head",
        }
    ]
    centres = [p for p in loss.parameters() if p.requires_grad]
    if centres:
        groups.append(
            {
                "params": centres,
                "lr": lr * o.centers_lr_mult,
                "weight_decay": o.centers_weight_decay,
                "name": "centers",
            }
        )
    groups += extra_groups or []
    if o.name == "adam":
        return torch.optim.Adam(groups)
    if o.name == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=o.momentum)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step lr factor: constant (``schedule.name: none``) or linear warm-up then cosine to the floor."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.schedule.warmup_epochs * steps_per_epoch))
    floor = cfg.schedule.min_lr_ratio

    def f(step: int) -> float:
        if cfg.schedule.name == "none":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * prog))

    return f


def build_scheduler(
    cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimiser step, over the full ``epochs`` (also when a run stops early)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps_per_epoch))
