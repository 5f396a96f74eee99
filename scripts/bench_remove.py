"""Time remove_items on synthetic indexes (N vectors, 64-d): flat, ivf, hnsw."""

import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from uniembed.serve.build import _Assembled, _write_index
from uniembed.serve.edits import remove_items
from uniembed.serve.faiss_index import default_params, make_faiss_index
from uniembed.serve.store import ImageIndex

faiss.omp_set_num_threads(1)
n, root = int(sys.argv[1]), Path(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.normal(size=(n, 64)).astype("float32")
x /= np.linalg.norm(x, axis=1, keepdims=True)
items = [
    {"id": str(i), "path": f"/data/img{i}.jpg", "label": str(i % 100), "domain": "d", "source": "s"}
    for i in range(n)
]
for kind in sys.argv[3:]:
    params = default_params(kind, n, 64)
    t = time.perf_counter()
    index = make_faiss_index(x, kind, params)
    tb = time.perf_counter() - t
    d = root / kind
    d.mkdir(parents=True, exist_ok=True)
    (d / "thumbs").mkdir(exist_ok=True)
    info = {
        "version": 1,
        "model": {"fingerprint": "x", "path": "/m"},
        "index": {"type": kind, "params": params, "metric": "l2"},
        "count": n,
        "next_id": n,
        "dim": 64,
        "thumb_size": 160,
    }
    _write_index(d, _Assembled(index, items, kind, params, 64, []), info)
    ids = rng.choice(n, 100, replace=False).tolist()
    t = time.perf_counter()
    c = time.process_time()
    res = remove_items(d, ids=ids)
    tr = time.perf_counter() - t
    cr = time.process_time() - c
    ix = ImageIndex.load(d)
    print(
        json.dumps(
            {
                "kind": kind,
                "n": n,
                "build_s": round(tb, 2),
                "remove_100_s": round(tr, 2),
                "remove_100_cpu_s": round(cr, 2),
                "left": len(ix),
                "params": params,
            }
        )
    )
