"""Dedup measure: near-duplicate groups of 100k synthetic 64-d vectors (FAISS range search + components).

The background is the clustered synthetic collection of the search measures (real embeddings are
clustered); planted into it are small families of near copies (an original and noisy copies a third of
the threshold away), so the measure also checks that every family is found whole.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from uniembed_lab.bench.search import clustered_sphere


def planted_collection(
    n: int, dim: int, families: int, copies: int, spread: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, family id per row: -1 for the background): ``families`` originals with ``copies`` near
    copies each, at a mean distance ``spread`` from their original, hidden among clustered vectors."""
    rng = np.random.default_rng(seed)
    planted = families * (copies + 1)
    x = clustered_sphere(n, dim, n_clusters=max(10, n // 100), seed=seed)
    fam = np.full(n, -1, dtype=np.int64)
    rows = rng.choice(n, size=planted, replace=False)
    for f in range(families):
        block = rows[f * (copies + 1) : (f + 1) * (copies + 1)]
        base = x[block[0]]
        noise = rng.standard_normal((copies, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        copies_v = base + noise
        x[block[1:]] = copies_v / np.linalg.norm(copies_v, axis=1, keepdims=True)
        fam[block] = f
    return x, fam


def dedup_bench(
    n: int = 100_000,
    dim: int = 64,
    threshold: float | None = None,
    families: int = 1_000,
    copies: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``near_groups`` (range search at ``threshold``, default the calibrated one, plus connected
    components) on ``n`` synthetic vectors; prints one line and returns the figures."""
    import faiss

    from uniembed.serve.dedup import DEFAULT_THRESHOLD, near_groups

    t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    x, fam = planted_collection(n, dim, families, copies, spread=t / 3, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    groups = near_groups(x, t)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    found = 0
    for g in groups:
        ids = fam[g.members]
        if ids[0] >= 0 and (ids == ids[0]).all() and int((fam == ids[0]).sum()) == len(g.members):
            found += 1
    result = {
        "n": n,
        "dim": dim,
        "threshold": t,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),  # all threads: wall >> cpu / threads means a busy machine
        "vectors_per_s": round(n / seconds, 1),
        "groups": len(groups),
        "files_in_groups": int(sum(len(g.members) for g in groups)),
        "planted_families": families,
        "planted_found_exactly": found,
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    print(
        f"dedup: {n:,} x {dim}-d vectors at threshold {t:g} in {seconds:.2f} s (CPU {cpu:.1f} s, "
        f"{faiss.omp_get_max_threads()} threads, {n / seconds:,.0f} vectors/s): {len(groups)} groups, "
        f"{found}/{families} planted families found whole"
    )
    return result


def dedup_project(cfg: Any, progress: Any = None) -> dict[str, Any]:
    """The ``uniembed bench`` side (bench/worker.py calls it with a BenchConfig): 100k vectors, 10k with
    --quick, at the config's dim and seed."""
    n = 10_000 if cfg.quick else 100_000
    r = dedup_bench(n=n, dim=int(cfg.dim), seed=int(cfg.seed))
    return {"figure": r["vectors_per_s"], "unit": "vectors/s", "details": r}


if __name__ == "__main__":
    dedup_bench()
