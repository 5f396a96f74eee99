"""Ray extraction measure: the overhead of ``uniembed extract --ray`` against the single-process path.

Both sides extract the same image files (the ``extract`` measure's subset) straight into a feature cache.
The baseline is ``extract_files`` in one process (``uniembed extract labels.csv``); the project side is
``extract_ray_with_stats`` on a local Ray cluster of 2 workers (actors) that share the same cores. On a
2-core machine the ratio is about the overhead (scheduling, pickling, actor start-up), not a speed-up; the
per-worker throughput is what the scaling guide multiplies by the number of workers. Starting the local
cluster is timed apart (a real cluster is already running); the actors' start-up is inside the clock.
"""

from __future__ import annotations

import shutil
import time

import numpy as np

from uniembed_lab.bench.common import BenchConfig, ProgressFile
from uniembed_lab.bench.extract import _warm_up, select_images, write_subset_csv

WORKERS = 2


def _inputs(cfg: BenchConfig, progress: ProgressFile, side: str):
    rows = select_images(cfg)
    csv_path = write_subset_csv(cfg, rows)
    engine, _ = _warm_up(cfg, rows, progress)
    out = cfg.work_dir / f"ray_{side}"
    shutil.rmtree(out, ignore_errors=True)
    return rows, csv_path, engine, out


def extract_ray_baseline(cfg: BenchConfig, progress: ProgressFile) -> dict:
    """``extract_files`` in this process, all ``cfg.threads`` threads."""
    from uniembed.features import extract as ext

    rows, csv_path, engine, out = _inputs(cfg, progress, "single")
    progress.update(0, len(rows), "single process: files -> features", force=True)
    t0 = time.perf_counter()
    res = ext.extract_files_with_stats(
        [str(csv_path)], cfg.backbone, out_root=out, threads=cfg.threads, progress=False
    )
    dt = time.perf_counter() - t0
    return {
        "figure": res.stats.images / dt,
        "unit": "images/s",
        "details": {
            "images": res.stats.images,
            "seconds": dt,
            "engine": engine,
            "feature_dir": str(res.path),
        },
    }


def extract_ray_project(cfg: BenchConfig, progress: ProgressFile) -> dict:
    """The same files on a fresh local Ray cluster of ``WORKERS`` actors (the cores split between them)."""
    import logging

    import ray

    from uniembed.features.ray_extract import RayOptions, extract_ray_with_stats

    rows, csv_path, engine, out = _inputs(cfg, progress, "cluster")
    per_worker = max(1, cfg.threads // WORKERS)
    progress.update(0, len(rows), f"starting a local Ray cluster ({WORKERS * per_worker} CPUs)", force=True)
    t0 = time.perf_counter()
    ray.init(
        num_cpus=WORKERS * per_worker,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    t_init = time.perf_counter() - t0
    try:
        # Decode tasks asking what an actor asks are fused into the actors: each worker decodes and embeds.
        opts = RayOptions("auto", actors=WORKERS, cpus_per_actor=per_worker, cpus_per_task=per_worker)
        progress.update(0, len(rows), f"ray: {WORKERS} workers, files -> features", force=True)
        t0 = time.perf_counter()
        res = extract_ray_with_stats([str(csv_path)], cfg.backbone, ray=opts, out_root=out, progress=False)
        dt = time.perf_counter() - t0
    finally:
        ray.shutdown()
    ips = res.stats.images / dt
    return {
        "figure": ips,
        "unit": "images/s",
        "details": {
            "images": res.stats.images,
            "seconds": dt,
            "workers": WORKERS,
            "threads_per_worker": per_worker,
            "images_per_s_per_worker": ips / WORKERS,
            "cluster_start_s": t_init,
            "engine": res.stats.engine or engine,
            "feature_dir": str(res.path),
        },
    }


def same_features(cfg: BenchConfig, r: dict) -> dict:
    """Whether the two sides wrote the same cache (bytes), and the largest difference if not."""
    from pathlib import Path

    a, b = (Path(r[s]["details"]["feature_dir"]) for s in ("project", "baseline"))
    fa, fb = (np.load(d / "features.npy") for d in (a, b))
    same = (a / "features.npy").read_bytes() == (b / "features.npy").read_bytes()
    same_meta = (a / "meta.csv").read_bytes() == (b / "meta.csv").read_bytes()
    diff = (
        float(np.abs(fa.astype(np.float32) - fb.astype(np.float32)).max()) if fa.shape == fb.shape else None
    )
    return {"features_identical": same and same_meta, "max_abs_diff": diff}
