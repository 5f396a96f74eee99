"""uniembed.train: projection-head training on cached features (+ optional backbone fine-tuning, DDP).

Heavy modules (torch) are imported lazily so ``import uniembed.train`` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uniembed.train.config import TrainConfig

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from uniembed.core.run_record import HeadRecord

__all__ = ["TrainConfig", "load_head", "train"]


def train(
    config: TrainConfig, resume: bool = False, stop_after: int | None = None, overwrite: bool = False
) -> Path:
    """See :func:`uniembed.train.trainer.train`."""
    from uniembed.train.trainer import train as _train

    return _train(config, resume=resume, stop_after=stop_after, overwrite=overwrite)


def load_head(run_dir: Any) -> tuple[nn.Module, HeadRecord]:
    """``(head in eval mode, run record)``; see :func:`uniembed.train.checkpoint.load_head`."""
    from uniembed.train.checkpoint import load_head as _load_head

    return _load_head(run_dir)
