"""Search measures: exact FAISS vs numpy brute force, and an approximate (IVF) index vs exact search.

Vectors are synthetic so the sizes can be chosen freely; both sides of a measure regenerate the same
vectors from the same seed in their own process.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from uniembed_lab.bench.common import BenchConfig, ProgressFile


def _l2n(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def uniform_sphere(n: int, dim: int, seed: int) -> np.ndarray:
    """Random directions, L2-normalised float32: the exact-search measure's data (the worst case for ANN)."""
    rng = np.random.default_rng(seed)
    return _l2n(rng.standard_normal((n, dim), dtype=np.float32))


def clustered_sphere(n: int, dim: int, n_clusters: int, seed: int, chunk: int = 250_000) -> np.ndarray:
    """A mixture of Gaussians on the unit sphere, L2-normalised float32.

    Real embeddings are clustered (images of one object / class lie close together, classes of one domain
    closer than others), unlike uniform random vectors. Here: 64 domain centres, class centres scattered
    around them, cluster sizes long-tailed (log-normal), each cluster with its own spread, so within-class
    cosine similarities range from about 0.3 to 0.8 and classes overlap. Generated in chunks to keep the
    temporary memory at a few hundred MB for 2M vectors.
    """
    rng = np.random.default_rng(seed)
    n_domains = max(1, min(64, n_clusters // 10))
    domains = _l2n(rng.standard_normal((n_domains, dim), dtype=np.float32))
    dom_of = rng.integers(0, n_domains, n_clusters)
    centres = _l2n(
        domains[dom_of] + 0.9 / np.sqrt(dim) * rng.standard_normal((n_clusters, dim), dtype=np.float32)
    )
    weights = rng.lognormal(0.0, 1.0, n_clusters)
    weights /= weights.sum()
    # Per-dimension noise; total noise norm sigma*sqrt(dim) from 0.5 to 1.3 times the centre's norm.
    sigma = (rng.uniform(0.5, 1.3, n_clusters) / np.sqrt(dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        cid = rng.choice(n_clusters, size=e - s, p=weights)
        x = rng.standard_normal((e - s, dim), dtype=np.float32)
        x *= sigma[cid, None]
        x += centres[cid]
        out[s:e] = _l2n(x)
    return out


def numpy_knn(
    base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256, progress: ProgressFile | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN by brute force in numpy: squared L2 via one matmul per chunk of queries, then
    argpartition for the k smallest and a sort of those k. This is the baseline FAISS is compared with."""
    base_sq = np.einsum("ij,ij->i", base, base)
    n_q = queries.shape[0]
    dist = np.empty((n_q, k), dtype=np.float32)
    ids = np.empty((n_q, k), dtype=np.int64)
    for s in range(0, n_q, chunk):
        q = queries[s : s + chunk]
        d = base_sq[None, :] - 2.0 * (q @ base.T)
        d += np.einsum("ij,ij->i", q, q)[:, None]
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        pd = np.take_along_axis(d, part, axis=1)
        order = np.argsort(pd, axis=1)
        ids[s : s + chunk] = np.take_along_axis(part, order, axis=1)
        dist[s : s + chunk] = np.take_along_axis(pd, order, axis=1)
        if progress:
            progress.update(min(n_q, s + chunk), n_q, "numpy brute force")
    return dist, ids


def _faiss_flat_knn(
    base: np.ndarray, queries: np.ndarray, k: int, progress: ProgressFile | None, desc: str, chunk: int = 1000
) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact k-NN with the project's flat index (``serve.index.make_faiss_index(..., "flat")``, i.e.
    faiss.IndexFlatL2): distances, ids and the search time (index build excluded)."""
    from uniembed.serve.index import make_faiss_index

    index = make_faiss_index(base, "flat", {})
    dist = np.empty((queries.shape[0], k), dtype=np.float32)
    ids = np.empty((queries.shape[0], k), dtype=np.int64)
    t0 = time.perf_counter()
    for s in range(0, queries.shape[0], chunk):
        dist[s : s + chunk], ids[s : s + chunk] = index.search(queries[s : s + chunk], k)
        if progress:
            progress.update(min(queries.shape[0], s + chunk), queries.shape[0], desc)
    return dist, ids, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- search_exact
def _exact_data(cfg: BenchConfig) -> tuple[np.ndarray, np.ndarray]:
    base = uniform_sphere(cfg.exact_n, cfg.dim, cfg.seed)
    queries = uniform_sphere(cfg.exact_queries, cfg.dim, cfg.seed + 1)
    return base, queries


def search_exact_baseline(cfg: BenchConfig, progress: ProgressFile) -> dict:
    base, queries = _exact_data(cfg)
    t0 = time.perf_counter()
    dist, ids = numpy_knn(base, queries, cfg.k, progress=progress)
    dt = time.perf_counter() - t0
    np.savez(cfg.work_dir / "search_exact_numpy.npz", dist=dist, ids=ids)
    return {
        "figure": queries.shape[0] / dt,
        "unit": "queries/s",
        "details": {"method": "numpy: chunked matmul (256 queries) + argpartition", "seconds": dt},
    }


def search_exact_project(cfg: BenchConfig, progress: ProgressFile) -> dict:
    base, queries = _exact_data(cfg)
    dist, ids, dt = _faiss_flat_knn(base, queries, cfg.k, progress, "faiss IndexFlatL2")
    np.savez(cfg.work_dir / "search_exact_faiss.npz", dist=dist, ids=ids)
    return {
        "figure": queries.shape[0] / dt,
        "unit": "queries/s",
        "details": {
            "method": "uniembed.serve.index.make_faiss_index(kind 'flat') = faiss.IndexFlatL2, batches of "
            "1000 queries",
            "seconds": dt,
        },
    }


def compare_topk(work_dir: Path, tol: float = 1e-4) -> dict:
    """Do FAISS and numpy return the same top-k? Differences are accepted only as ties: the k-th
    distances agree within ``tol`` (float32 rounding differs between the two matmul kernels)."""
    a = np.load(work_dir / "search_exact_faiss.npz")
    b = np.load(work_dir / "search_exact_numpy.npz")
    same_lists = np.all(a["ids"] == b["ids"], axis=1)
    same_sets = np.array([set(x) == set(y) for x, y in zip(a["ids"], b["ids"], strict=True)])
    dist_ok = np.abs(a["dist"] - b["dist"]).max(axis=1) <= tol
    return {
        "queries": int(len(same_lists)),
        "identical_top_k_lists": float(same_lists.mean()),
        "identical_top_k_sets": float(same_sets.mean()),
        "differ_beyond_ties": int(np.sum(~same_sets & ~dist_ok)),
        "max_abs_dist_diff": float(np.abs(a["dist"] - b["dist"]).max()),
        "same_top_k": bool(np.all(same_sets | dist_ok)),
    }


# ------------------------------------------------------------------------------------------------ search_ann
def _ann_data(cfg: BenchConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Base vectors, tuning queries (pick nprobe) and evaluation queries (report recall), all from the same
    clustered distribution; queries are fresh draws, not copies of base vectors."""
    n_tune = max(1, cfg.ann_queries // 2)
    allv = clustered_sphere(cfg.ann_n + n_tune + cfg.ann_queries, cfg.dim, cfg.ann_clusters, cfg.seed)
    return allv[: cfg.ann_n], allv[cfg.ann_n : cfg.ann_n + n_tune], allv[cfg.ann_n + n_tune :]


def search_ann_baseline(cfg: BenchConfig, progress: ProgressFile) -> dict:
    """Exact search over the same vectors: the ground truth and the speed an ANN index must beat."""
    progress.update(0, 1, "generating clustered vectors", force=True)
    base, tune_q, eval_q = _ann_data(cfg)
    q = np.concatenate([tune_q, eval_q])
    _, ids, dt = _faiss_flat_knn(base, q, cfg.k, progress, "exact ground truth (faiss IndexFlatL2)")
    np.save(cfg.work_dir / "search_ann_gt.npy", ids)
    return {
        "figure": q.shape[0] / dt,
        "unit": "queries/s",
        "details": {"method": "faiss.IndexFlatL2 (exact)", "queries": int(q.shape[0]), "seconds": dt},
    }


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true k nearest neighbours that appear in the returned k."""
    k = truth.shape[1]
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth, strict=True))
    return hits / (k * truth.shape[0])


def _timed_search(index, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, float]:
    from uniembed.serve.index import apply_search_params

    apply_search_params(index, "ivf", {"nprobe": nprobe})
    t0 = time.perf_counter()
    _, ids = index.search(q, k)
    return ids, time.perf_counter() - t0


def search_ann_project(cfg: BenchConfig, progress: ProgressFile) -> dict:
    """The project's IVF index (``serve.index.make_faiss_index(..., "ivf")``) over the clustered vectors:
    build, pick the smallest nprobe whose recall@k on the tuning queries reaches the goal, then report speed
    and recall on the evaluation queries, and also at the nprobe the project's default rule would use."""
    from uniembed.serve.index import default_params, make_faiss_index

    gt_path = cfg.work_dir / "search_ann_gt.npy"
    if not gt_path.exists():
        raise FileNotFoundError(f"{gt_path} missing: the baseline side (exact search) must run first")
    gt = np.load(gt_path)
    progress.update(0, 1, "generating clustered vectors", force=True)
    base, tune_q, eval_q = _ann_data(cfg)
    gt_tune, gt_eval = gt[: len(tune_q)], gt[len(tune_q) :]

    # nlist is set here: the project's default for 2M vectors (about 4*sqrt(N) = 5,657 lists, k-means on
    # FAISS's subsample of 256 points per list) costs ~10 TFLOP of training, many minutes on 2 cores.
    nlist = cfg.ann_nlist
    progress.update(0, 1, f"building IVF{nlist},Flat over {base.shape[0]:,} vectors", force=True)
    t0 = time.perf_counter()
    index = make_faiss_index(base, "ivf", {"nlist": nlist, "nprobe": 1})
    t_build = time.perf_counter() - t0

    sweep = []
    chosen = None
    nprobe = 1
    while nprobe <= nlist:
        ids, dt = _timed_search(index, tune_q, cfg.k, nprobe)
        r = recall_at_k(ids, gt_tune)
        sweep.append({"nprobe": nprobe, "recall_tune": r, "qps_tune": len(tune_q) / dt})
        progress.update(r, cfg.recall_goal, f"nprobe {nprobe}: recall@{cfg.k} {r:.3f}", force=True)
        if r >= cfg.recall_goal:
            chosen = nprobe
            break
        nprobe *= 2
    if chosen is None:
        chosen = sweep[-1]["nprobe"]
    _timed_search(index, eval_q[:50], cfg.k, chosen)  # warm caches
    ids, dt = _timed_search(index, eval_q, cfg.k, chosen)
    recall = recall_at_k(ids, gt_eval)
    # The project's own defaults (serve.index.default_params) for this many vectors, and their nprobe here.
    defaults_2m = default_params("ivf", base.shape[0], cfg.dim)
    rule_nprobe = int(min(nlist, defaults_2m["nprobe"]))
    ids_rule, dt_rule = _timed_search(index, eval_q, cfg.k, rule_nprobe)
    return {
        "figure": len(eval_q) / dt,
        "unit": "queries/s",
        "details": {
            "index": f"IVF{nlist},Flat (serve.index.make_faiss_index 'ivf' = faiss.IndexIVFFlat, L2)",
            "vectors": int(base.shape[0]),
            "data": (
                f"synthetic clustered: mixture of {cfg.ann_clusters:,} Gaussians on the unit sphere in "
                f"{cfg.dim}-d (long-tailed cluster sizes), resembling real embeddings; uniform random "
                "vectors would be the hardest case for ANN"
            ),
            "train_vectors": int(min(base.shape[0], 256 * nlist)),
            "train_note": "make_faiss_index trains on all vectors; FAISS k-means subsamples 256 per list",
            "build_s": t_build,
            "nprobe": chosen,
            "nprobe_sweep": sweep,
            f"recall_at_{cfg.k}": recall,
            "recall_goal": cfg.recall_goal,
            "eval_queries": int(len(eval_q)),
            "seconds": dt,
            "project_rule_nprobe": rule_nprobe,
            f"project_rule_recall_at_{cfg.k}": recall_at_k(ids_rule, gt_eval),
            "project_rule_qps": len(eval_q) / dt_rule,
            "project_defaults_for_this_n": defaults_2m,
            "project_defaults_note": "not built here: training that many lists is too slow for the bench",
        },
    }
