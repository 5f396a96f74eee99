"""Filtered search on 100k synthetic clustered 64-d unit vectors: per-query time and results returned
(plain queries: no query expansion). `python scripts/bench_filters.py [flat ivf hnsw]`."""

import sys
import time
from pathlib import Path

import faiss
import numpy as np

from uniembed.serve.index import ImageIndex, default_params, make_faiss_index

faiss.omp_set_num_threads(1)
n, dim, k = 100_000, 64, 10
rng = np.random.default_rng(0)
centres = rng.normal(size=(500, dim))
x = (centres[rng.integers(0, 500, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
q = x[rng.choice(n, 200, replace=False)] + 0.05 * rng.normal(size=(200, dim)).astype(np.float32)
q /= np.linalg.norm(q, axis=1, keepdims=True)
items = [
    {
        "id": str(i),
        "path": f"/p/{i}.jpg",
        "label": f"l{i % 1000}",
        "source": "s",
        "domain": "d001" if i % 1000 == 0 else ("d10" if i % 10 == 0 else "other"),
    }
    for i in range(n)
]
for kind in sys.argv[1:] or ["flat", "ivf", "hnsw"]:
    params = default_params(kind, n, dim)
    t0 = time.perf_counter()
    index = make_faiss_index(x, kind, params)
    tb = time.perf_counter() - t0
    info = {"index": {"type": kind, "params": params}, "dim": dim, "count": n, "model": {"fingerprint": "x"}}
    ix = ImageIndex(root=Path("."), index=index, items=items, info=info)
    ix.search_batch(q[:2], k, filters=["domain=d10"])  # column cache, direct map
    print(f"{kind} {params} built in {tb:.1f}s")
    for filt in (None, ["domain=d10"], ["domain=d001"]):
        t0 = time.perf_counter()
        hits = [ix.search_batch(v, k, filters=filt, expand=False)[0] for v in q]
        ms = (time.perf_counter() - t0) * 1000 / len(q)
        n_ok = sum(len(h) == k for h in hits)
        print(
            f"  filter={filt} matched={ix.matching(filt)}: {ms:.2f} ms/query, "
            f"{n_ok}/{len(q)} queries got k={k}"
        )
    if kind != "flat":
        flat = ImageIndex(
            root=Path("."),
            index=make_faiss_index(x, "flat", {}),
            items=items,
            info={**info, "index": {"type": "flat", "params": {}}},
        )
        for filt in (["domain=d10"], ["domain=d001"]):
            got = [{h.id for h in ix.search_batch(v, k, filters=filt, expand=False)[0]} for v in q]
            truth = [{h.id for h in flat.search_batch(v, k, filters=filt, expand=False)[0]} for v in q]
            rec = np.mean([len(a & b) / k for a, b in zip(got, truth, strict=False)])
            print(f"  filter={filt}: recall@{k} vs exact filtered search {rec:.3f}")
