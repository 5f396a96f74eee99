"""Pieces shared by the benchmark's measures: the run configuration and progress reporting.

Each side of a measure runs in its own process (so its peak RSS is its own); it reports progress by
rewriting a small JSON file that the parent process polls and draws with rich.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from uniembed.core.fsutil import atomic_write_text


@dataclass
class BenchConfig:
    """Sizes of every measure. ``quick`` shrinks them all so the whole bench runs in seconds (tests, CI)."""

    out: Path = Path("artifacts/bench")
    quick: bool = False
    data_dir: Path | None = None  # folder holding grocery_store/ and/or coil100/ (labels.csv each)
    threads: int = 0  # torch / onnxruntime / faiss intra-op threads; 0 = usable cores
    seed: int = 0
    backbone: str = "mobilenetv2"
    # extract
    n_images: int = 1000
    batch_size: int = 32
    png_fraction: float = 0.2  # share of coil100 PNGs in the image subset (the rest grocery JPEGs)
    profile_images: int = 256
    # head_epoch
    head_backbone_batches: int = 4  # batches of the frozen backbone timed, then extrapolated to the epoch
    # search_exact
    exact_n: int = 200_000
    exact_queries: int = 5_000
    dim: int = 64
    k: int = 5
    # search_ann
    ann_n: int = 2_000_000
    ann_queries: int = 600
    ann_nlist: int = 1024
    ann_clusters: int = 20_000
    recall_goal: float = 0.95
    extra: dict = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool, **overrides) -> BenchConfig:
        cfg = cls(quick=quick, **overrides)
        if quick:
            cfg.n_images = min(cfg.n_images, 32)
            cfg.batch_size = min(cfg.batch_size, 8)
            cfg.profile_images = min(cfg.profile_images, 16)
            cfg.head_backbone_batches = min(cfg.head_backbone_batches, 2)
            cfg.exact_n, cfg.exact_queries = 20_000, 300
            cfg.ann_n, cfg.ann_queries, cfg.ann_nlist, cfg.ann_clusters = 50_000, 200, 64, 500
        if not cfg.threads:
            from uniembed_lab.bench.sysinfo import cpu_count

            cfg.threads = cpu_count()
        return cfg

    @property
    def work_dir(self) -> Path:
        """Intermediate files (image list, prepared shards, feature cache, ground-truth ids)."""
        return Path(self.out) / "work" / ("quick" if self.quick else "full")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["data_dir"] = str(self.data_dir) if self.data_dir else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BenchConfig:
        d = dict(d)
        d["out"] = Path(d["out"])
        d["data_dir"] = Path(d["data_dir"]) if d.get("data_dir") else None
        return cls(**d)


class ProgressFile:
    """Progress of a worker process, written atomically to a JSON file the parent polls (throttled)."""

    def __init__(self, path: str | Path | None, min_interval: float = 0.2):
        self.path = Path(path) if path else None
        self.min_interval = min_interval
        self._last = 0.0

    def update(self, done: float, total: float, desc: str = "", force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.min_interval and done < total:
            return
        self._last = now
        atomic_write_text(self.path, json.dumps({"done": done, "total": total, "desc": desc}))


def set_threads(n: int) -> None:
    """Pin every library of the process to ``n`` intra-op threads, so both sides get the same cores."""
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:  # pragma: no cover - faiss is a dependency
        pass


def write_json(path: str | Path, obj: dict) -> Path:
    """Write a result file whole (a reader never sees half of it)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))
