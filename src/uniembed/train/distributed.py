"""Processes and devices: torchrun's environment, the training device, batch sharding and gathers.

Launched with ``torchrun --nproc_per_node N``, each rank takes a contiguous shard of every global batch;
gradients are averaged by DDP and the per-rank margin loss is rescaled so the update equals that of one
process on the whole batch. The in-batch similarity terms all-gather the batch so their similarity matrices
are the global ones. Without torchrun there is one process and none of this applies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from uniembed.models.losses import BatchGather


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # we called init_process_group (so we tear it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` (this rank's GPU, else the CPU), or the named device, which must exist."""
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {pref!r} requested but CUDA is not available")
    return dev


def setup_distributed(device_pref: str) -> DistInfo:
    """Read torchrun's environment (WORLD_SIZE/RANK/LOCAL_RANK); one process when absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    info = DistInfo(rank=rank, world=world, device=device)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            info.started_here = True
    return info


def teardown_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`setup_distributed` created it."""
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def rank_shard(pos: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, float, list[int] | None]:
    """This rank's contiguous shard of a global batch's rows, the factor that turns its per-rank mean loss
    into its share of the global-batch mean (DDP averages over ranks), and every rank's shard size."""
    if info.world == 1:
        return pos, 1.0, None
    sizes = [len(c) for c in np.array_split(np.arange(len(pos)), info.world)]
    lo = sum(sizes[: info.rank])
    return pos[lo : lo + sizes[info.rank]], sizes[info.rank] * info.world / sum(sizes), sizes


def gather_rows(t: torch.Tensor, sizes: list[int], differentiable: bool) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (= the global batch order). all_gather needs equal shapes,
    so shards are zero-padded to the largest and trimmed after."""
    m = max(sizes)
    padded = torch.cat([t, t.new_zeros((m - t.shape[0], *t.shape[1:]))]) if t.shape[0] < m else t
    if differentiable:
        import torch.distributed.nn.functional as dist_nn

        parts = dist_nn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def _gather_batch(
    emb: torch.Tensor, feats: torch.Tensor, sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    return gather_rows(emb, sizes, differentiable=True), gather_rows(feats, sizes, differentiable=False)


def batch_gather(sizes: list[int]) -> BatchGather:
    """The whole batch's (embeddings, input features) from every rank's shard; gradients flow back to each
    rank's own embeddings."""
    return partial(_gather_batch, sizes=sizes)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (just ``[obj]`` in one process)."""
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> None:
    """Sum ``t`` over ranks, in place."""
    if info.world > 1:
        dist.all_reduce(t)
