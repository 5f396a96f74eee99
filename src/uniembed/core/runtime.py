"""Process-level runtime helpers shared by the stages: CPU threads, ONNX Runtime sessions, weight hashes.

Why one module: extraction, export checks and the search service all open ONNX sessions and pick thread
counts; when each stage did it its own way, their settings drifted (spinning threads measured 35% slower on a
shared machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


def cpu_threads_default() -> int:
    """Intra-op threads for CPU inference: all cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def free_cores() -> int:
    """CPU cores this process may use that are not already busy (cores minus the 1-minute load average).

    Why: torch's OpenMP threads spin-wait for each other; when another process holds a core, a 2-thread
    forward on a 2-core machine was measured 3x slower than a 1-thread one (and model loading 10-30x)."""
    cores = cpu_threads_default()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


@contextlib.contextmanager
def torch_threads(threads: int | None = None) -> Iterator[int]:
    """Run a block with ``threads`` intra-op torch threads (None: :func:`free_cores`), restoring the previous
    setting afterwards; yields the number used."""
    prev = torch.get_num_threads()
    n = int(threads) if threads else free_cores()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(prev)


def onnx_session(path: str | Path, threads: int | None = None, spin: bool = False) -> Any:
    """A CPU ``onnxruntime.InferenceSession``: the one way this project opens ONNX files.

    ``spin``: let idle worker threads spin-wait. It helps a dedicated machine a little and hurts a shared one
    a lot (measured 35%), so it is off unless asked for."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 of a weights file, cached per process by (path, size, mtime): it is part of every cache key,
    and re-hashing a large checkpoint for each call would dominate a cache hit."""
    from uniembed.core.fsutil import sha256_file

    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    digest = sha256_file(p)
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
    return digest


def state_dict_sha256(module: nn.Module) -> str:
    """Content hash of a module's tensors, for hub weights whose file location is the hub's business."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
