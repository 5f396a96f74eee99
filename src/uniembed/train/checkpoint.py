"""What a run keeps: ``checkpoint.pt`` (to resume exactly) and ``head.pt`` (the run record export reads).

The checkpoint is written atomically after every epoch: model (head + loss centres), optimiser, scheduler,
epoch, history, best head so far, the config, and the RNG states of every rank, so ``resume`` continues with
the same batches and the same random numbers as an uninterrupted run.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniembed.core.fsutil import atomic_path
from uniembed.core.integrity import DamagedFileError, reading
from uniembed.core.run_record import HeadRecord, RunRecordError, retrain_hint
from uniembed.models.heads import build_head
from uniembed.train.config import TrainConfig
from uniembed.train.data import TrainData
from uniembed.train.distributed import DistInfo, all_gather_objects
from uniembed.train.state import TrainState

CHECKPOINT_FILE = "checkpoint.pt"
#: Config keys that may differ between a checkpoint and a resumed run.
RESUMABLE_CHANGES = {"epochs", "progress", "out", "finetune", "val_every", "select", "device"}
#: What a complete checkpoint holds.
_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "history", "config", "world")


class CheckpointError(DamagedFileError):
    """``checkpoint.pt`` is truncated, garbled or incomplete: the run cannot be resumed from it."""


def _restart_hint(path: Path) -> str:
    return f"it cannot be resumed: start the run over with --overwrite instead of --resume (in {path.parent})"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``save_checkpoint``, or ``CheckpointError`` (one line) saying it is damaged."""
    with reading(path, _restart_hint(path), CheckpointError, what="cannot be read as a checkpoint"):
        ck = torch.load(path, map_location="cpu", weights_only=False)
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise CheckpointError(f"{path} is damaged (no {', '.join(missing)}); {_restart_hint(path)}")
    return ck


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves half a file (temporary name, then rename)."""
    # Through a file object: torch.save(path) names the archive inside after the (random) temp file, so two
    # identical runs would write different bytes.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def rng_state() -> dict:
    """This process's torch, Python, NumPy (and CUDA) RNG states."""
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def gather_rng_states(di: DistInfo) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: every rank calls it)."""
    return all_gather_objects(rng_state(), di)


def check_run_dir(run: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an existing run unless resuming or overwriting; ``resume`` needs a checkpoint.

    Every rank checks (same filesystem), so a refusal never leaves other ranks waiting at a barrier."""
    ckpt_path = run / CHECKPOINT_FILE
    if ckpt_path.exists() and not (resume or overwrite):
        raise FileExistsError(
            f"{run} already holds a training run; pass --resume to continue it or --overwrite to start over"
        )
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no {ckpt_path}; start the run without --resume")


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs, except those a resumed run may change."""
    out = []
    for k in sorted(set(a) | set(b)):
        if not prefix and k in RESUMABLE_CHANGES:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k not in ("head", "loss"):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def save_checkpoint(
    path: Path, state: TrainState, epoch: int, rngs: list[dict], cfg: TrainConfig, world: int
) -> None:
    ck = {
        "epoch": epoch,
        "model": state.model.state_dict(),
        "optimizer": state.opt.state_dict(),
        "scheduler": state.sched.state_dict(),
        "rng": rngs,
        "history": state.history,
        "best": state.best,
        "config": cfg.to_dict(),
        "world": world,
    }
    save_torch(ck, path)


def resume_state(path: Path, state: TrainState, cfg: TrainConfig, di: DistInfo) -> None:
    """Restore ``state`` and this rank's RNG from a checkpoint written by the same config and world size."""
    ck = read_checkpoint(path)
    diff = config_diff(ck["config"], cfg.to_dict())
    if diff:
        raise ValueError("--resume with a different config: " + "; ".join(diff))
    if ck["world"] != di.world:
        raise ValueError(f"checkpoint was written by {ck['world']} process(es), this run has {di.world}")
    with reading(path, _restart_hint(path), CheckpointError, what="does not fit this run's model"):
        state.model.load_state_dict(ck["model"])
        state.opt.load_state_dict(ck["optimizer"])
        state.sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"][di.rank])
    state.start_epoch, state.history, state.best = ck["epoch"], ck["history"], ck.get("best")


def load_loss_state(path: Path, loss: nn.Module) -> None:
    """The loss's part of a checkpoint's model (its class centres) into ``loss``."""
    ck = read_checkpoint(path)
    with reading(path, _restart_hint(path), CheckpointError, what="does not fit this run's loss"):
        loss.load_state_dict({k[len("loss.") :]: v for k, v in ck["model"].items() if k.startswith("loss.")})


def head_record(
    cfg_head: dict, head: nn.Module, data: TrainData, selected_epoch: int | None = None
) -> HeadRecord:
    """The run record (``head.pt``, docs/design.md): everything export needs to rebuild the embedder."""
    info = data.info
    return HeadRecord(
        head_config=cfg_head,
        state_dict={k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        backbone=info.get("backbone"),
        pooling=info.get("pooling", "avg"),
        preprocess=info.get("preprocess"),
        fingerprint=info.get("fingerprint"),
        weights_hash=info.get("weights_hash"),
        feature_dir=data.feature_dirs[0] if len(data.feature_dirs) == 1 else list(data.feature_dirs),
        embedding_dim=int(cfg_head["out_dim"]),
        selected_epoch=selected_epoch,
    )


def selected_head(state: TrainState, cfg: TrainConfig, last: int) -> tuple[nn.Module, int]:
    """The head that becomes ``head.pt`` (``select``: last epoch or best validated) and its epoch."""
    if cfg.select == "best" and state.best is not None:
        head = build_head(state.head_config)
        head.load_state_dict(state.best["state_dict"])
        return head, state.best["epoch"]
    return state.head, last


def load_head(run_dir: str | Path) -> tuple[nn.Module, HeadRecord]:
    """``(head in eval mode, run record)`` from a run dir (or a head.pt path); ``RunRecordError`` when the
    record's head cannot be rebuilt from it (a damaged file that still unpickles)."""
    rec = HeadRecord.load(run_dir)
    p = Path(run_dir)
    with reading(p, retrain_hint(p if p.is_dir() else p.parent), RunRecordError, what="holds a broken head"):
        head = build_head(rec.head_config)
        head.load_state_dict(rec.state_dict)
    return head.eval(), rec
