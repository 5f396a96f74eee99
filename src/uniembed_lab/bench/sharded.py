"""Sharded-index measure: the merged, memory-mapped IVF-PQ index vs the flat (exact) index, on the same
synthetic clustered vectors (bench/search.py's distribution), side by side in one run.

Each side builds its index, writes it to disk, then serves it from a fresh process (``serve_probe``) that
opens the index as ``uniembed serve`` would, answers the queries and reports its RSS: the flat index holds
N*dim*4 bytes in RAM, the sharded one maps its codes from disk and pages in only the lists it probes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from uniembed_lab.bench.common import BenchConfig, ProgressFile
from uniembed_lab.bench.search import clustered_sphere, recall_at_k

#: Shards filled for the bench's sharded index (in this process, one after the other; Ray with extra.ray).
SHARDS = 4


def _data(cfg: BenchConfig) -> tuple[np.ndarray, np.ndarray]:
    """Base vectors and fresh queries from the same clustered distribution (same seed on both sides)."""
    allv = clustered_sphere(cfg.ann_n + cfg.ann_queries, cfg.dim, cfg.ann_clusters, cfg.seed + 7)
    return allv[: cfg.ann_n], allv[cfg.ann_n :]


def _serve(kind: str, index_path: Path, queries: Path, k: int, threads: int) -> dict:
    """Open the index in a fresh process and search: queries/s and that process's memory."""
    cmd = [sys.executable, "-m", "uniembed_lab.bench.sharded", kind, str(index_path), str(queries), str(k)]
    cmd.append(str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _rss() -> dict[str, float]:
    """This process's resident memory (MB): total, anonymous (heap) and file-backed (mapped files)."""
    got: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            got[key] = int(val.split()[0]) / 1024
    return got


def serve_probe(kind: str, index_path: str, queries_path: str, k: int, threads: int) -> dict:
    """The serving side: load as the service does (flat: read whole; sharded: mapped), warm up on 50
    queries, then time the rest in batches of 100; ids go to a file beside the queries."""
    import faiss

    from uniembed.serve.faiss_index import SHARDED_TYPE, apply_search_params, read_faiss_file

    faiss.omp_set_num_threads(threads)
    before = _rss()
    t0 = time.perf_counter()
    index = read_faiss_file(index_path, SHARDED_TYPE if kind == "sharded" else "flat")
    load_s = time.perf_counter() - t0
    params = json.loads((Path(index_path).parent / "params.json").read_text())
    apply_search_params(index, SHARDED_TYPE if kind == "sharded" else "flat", params)
    q = np.load(queries_path)
    index.search(q[:50], k)
    ids = np.empty((len(q), k), dtype=np.int64)
    t0 = time.perf_counter()
    for s in range(0, len(q), 100):
        ids[s : s + 100] = index.search(q[s : s + 100], k)[1]
    dt = time.perf_counter() - t0
    np.save(Path(queries_path).with_name(f"ids-{kind}.npy"), ids)
    after = _rss()
    return {"qps": len(q) / dt, "load_s": load_s, "rss_before_mb": before, "rss_after_mb": after}


def _disk_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def sharded_baseline(cfg: BenchConfig, progress: ProgressFile) -> dict:
    """The flat index: build (add), write, serve from a fresh process; its answers are the ground truth."""
    import faiss

    progress.update(0, 1, "generating clustered vectors", force=True)
    base, queries = _data(cfg)
    work = cfg.work_dir / "sharded" / "flat"
    work.mkdir(parents=True, exist_ok=True)
    qpath = cfg.work_dir / "sharded" / "queries.npy"
    np.save(qpath, queries)
    progress.update(0, 1, f"building IndexFlatL2 over {len(base):,} vectors", force=True)
    t0 = time.perf_counter()
    index = faiss.IndexFlatL2(cfg.dim)
    index.add(base)
    faiss.write_index(index, str(work / "index.faiss"))
    build_s = time.perf_counter() - t0
    (work / "params.json").write_text("{}")
    del index, base
    progress.update(0, 1, "serving the flat index from a fresh process", force=True)
    served = _serve("flat", work / "index.faiss", qpath, cfg.k, cfg.threads)
    return {
        "figure": served["qps"],
        "unit": "queries/s",
        "details": {
            "index": "faiss.IndexFlatL2 (exact), read whole into RAM",
            "vectors": cfg.ann_n,
            "build_s": build_s,
            "disk_mb": _disk_mb(work),
            "serve": served,
            f"recall_at_{cfg.k}": 1.0,
        },
    }


def sharded_project(cfg: BenchConfig, progress: ProgressFile) -> dict:
    """The sharded IVF-PQ index: train on a sample, fill SHARDS shards, merge on disk, tune nprobe on
    sampled indexed vectors; served mapped from a fresh process; recall@k against the flat side's answers."""
    from uniembed.serve.sharded import build_sharded

    truth_path = cfg.work_dir / "sharded" / "ids-flat.npy"
    if not truth_path.exists():
        raise FileNotFoundError(f"{truth_path} missing: the baseline side (flat index) must run first")
    progress.update(0, 1, "generating clustered vectors", force=True)
    base, _ = _data(cfg)
    work = cfg.work_dir / "sharded" / "ivfpq"
    for p in work.glob("*"):
        p.unlink()
    params = {"nlist": cfg.ann_nlist, **({"train_size": 10_000} if cfg.quick else {})}
    params.update(cfg.extra.get("sharded_params", {}))
    address = cfg.extra.get("ray")
    progress.update(0, 1, f"building the sharded index ({SHARDS} shards)", force=True)
    t0 = time.perf_counter()
    built = build_sharded(base, work, SHARDS, address, params, progress=False, recall_queries=1000)
    build_s = time.perf_counter() - t0
    (work / "params.json").write_text(json.dumps(built.params))
    stages, at_build = built.seconds, built.recall
    del built, base
    progress.update(0, 1, "serving the sharded index from a fresh process", force=True)
    qpath = cfg.work_dir / "sharded" / "queries.npy"
    served = _serve("sharded", work / "index.faiss", qpath, cfg.k, cfg.threads)
    found = np.load(qpath.with_name("ids-sharded.npy"))
    params_out = json.loads((work / "params.json").read_text())
    return {
        "figure": served["qps"],
        "unit": "queries/s",
        "details": {
            "index": "uniembed.serve.sharded.build_sharded: IVF-PQ, on-disk lists mapped read-only",
            "vectors": cfg.ann_n,
            "params": params_out,
            "shards_filled_by": f"Ray at {address}" if address else "this process, one after the other",
            "build_s": build_s,
            "build_stages_s": stages,
            "build_time_recall": at_build,
            "disk_mb": _disk_mb(work),
            "serve": served,
            f"recall_at_{cfg.k}": recall_at_k(found, np.load(truth_path)),
            "recall_queries": "fresh draws of the same distribution; truth = the flat side's answers",
        },
    }


def sharded_goal(r: dict) -> bool:
    """Compressed and mapped must pay off: recall@5 >= 0.8 and less serving RAM than the flat index."""
    c = r["checks"]["sharded_vs_flat"]
    rec = next(v for k, v in c["project"].items() if k.startswith("recall_at_"))
    return rec >= 0.8 and c["project"]["serve_rss_mb"] < c["baseline"]["serve_rss_mb"]


def sharded_check(cfg: BenchConfig, r: dict) -> dict:
    """The figures of the sharded-index line, both sides: build time, queries/s, recall@k, serving RAM."""
    out = {}
    for side in ("project", "baseline"):
        d = r[side]["details"]
        rss = d["serve"]["rss_after_mb"]
        out[side] = {
            "build_s": round(d["build_s"], 1),
            "qps": round(r[side]["figure"], 1),
            f"recall_at_{cfg.k}": round(d[f"recall_at_{cfg.k}"], 4),
            "serve_rss_mb": round(rss["VmRSS"], 1),
            "serve_anon_mb": round(rss.get("RssAnon", 0.0), 1),
            "disk_mb": round(d["disk_mb"], 1),
        }
    return {"sharded_vs_flat": out}


def summary_line(checks: dict, k: int = 5) -> str:
    """``SHARDED build_s a/b qps a/b recall@5 a/b serve_rss_mb a/b`` (project/flat), for report.py."""
    p, b = checks["sharded_vs_flat"]["project"], checks["sharded_vs_flat"]["baseline"]
    keys = ("build_s", "qps", f"recall_at_{k}", "serve_rss_mb", "disk_mb")
    return "SHARDED " + " ".join(f"{key} {p[key]:g}/{b[key]:g}" for key in keys)


def main() -> None:
    kind, index_path, queries, k, threads = sys.argv[1:6]
    print(json.dumps(serve_probe(kind, index_path, queries, int(k), int(threads))))


if __name__ == "__main__":
    main()
