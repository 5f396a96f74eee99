"""IVF-PQ compression choices at 64-d: recall@5 and training time of PQ16/PQ32 with and without OPQ.

`OMP_NUM_THREADS=1 python scripts/experiments/opq_compression_check.py IVF128,PQ32 OPQ16,IVF128,PQ16 ...`
"""

import sys
import time

import faiss
import numpy as np

from uniembed_lab.bench.search import clustered_sphere

N = 50_000
allx = clustered_sphere(N + 500, 64, 1000, 0)
x, q = allx[:N], allx[N:]
_, gt = faiss.knn(q, x, 5)


def rec(ids):
    return np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, gt, strict=True)])


for key in sys.argv[1:]:
    ix = faiss.index_factory(64, key)
    t = time.time()
    c0 = time.process_time()
    ix.train(x[:12_000])
    tt = time.time() - t
    ct = time.process_time() - c0
    t = time.time()
    ix.add(x)
    ta = time.time() - t
    out = []
    for npb in (16, 64):
        faiss.extract_index_ivf(ix).nprobe = npb
        t = time.time()
        _, ids = ix.search(q, 5)
        ts = time.time() - t
        out.append(f"np{npb}: r={rec(ids):.3f} qps={len(q) / ts:.0f}")
    print(key, f"train {tt:.1f}s (cpu {ct:.1f}) add {ta:.1f}s", "; ".join(out), flush=True)
