"""FAISS index types for the image index: which type suits a collection, its parameters, build and tuning.

Vectors are the model's L2-normalised embeddings and the metric is (squared) L2; row i of a FAISS index
built here gets id i.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.serve.errors import ImageIndexError

#: A compressed IVF-PQ index filled in shards and merged into memory-mapped on-disk lists (serve/sharded.py).
SHARDED_TYPE = "ivfpq_sharded"
INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq", "hnsw", SHARDED_TYPE)
#: Index types whose query-time knob is nprobe.
IVF_TYPES = ("ivf", "ivfpq", SHARDED_TYPE)

#: Below this many vectors an exact scan is fast enough (64-d: ~1 ms per query at 20k) and has perfect recall.
FLAT_MAX = 20_000
#: Up to this many, HNSW: no training, high recall; beyond, IVF keeps build time and memory in check.
HNSW_MAX = 500_000
#: Cap on automatic IVF list counts (override with --nlist for very large collections).
IVF_MAX_NLIST = 1024


def choose_index_type(n: int) -> str:
    """``auto`` by collection size: exact below FLAT_MAX, HNSW up to HNSW_MAX, IVF beyond."""
    if n < FLAT_MAX:
        return "flat"
    return "hnsw" if n < HNSW_MAX else "ivf"


def default_params(index_type: str, n: int, dim: int) -> dict[str, int]:
    """Parameters that give high recall for ``n`` vectors; any of them can be overridden by the caller."""
    if index_type == "flat":
        return {}
    if index_type == SHARDED_TYPE:
        from uniembed.serve.sharded import sharded_params

        return sharded_params(n, dim)
    if index_type == "hnsw":
        return {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64}
    # IVF: ~4*sqrt(N) lists, but FAISS wants >= 39 training points per list, and at most IVF_MAX_NLIST so
    # k-means training stays in minutes on a laptop CPU. nprobe = nlist/32 (at least 16): `make bench`
    # measured recall@5 0.98 at nprobe 16 with 1,024 lists over 2M clustered vectors, while nlist/8
    # (707 of 5,657 lists) searched ~7x slower for 0.998.
    nlist = int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39 if n >= 39 else 1, IVF_MAX_NLIST)))
    params = {"nlist": nlist, "nprobe": int(min(nlist, max(16, nlist // 32)))}
    if index_type == "ivfpq":
        m = max(d for d in range(1, min(dim, 16) + 1) if dim % d == 0)
        # 8-bit codes need ~39*256 training points per sub-quantizer; use fewer bits for smaller sets.
        bits = int(min(8, max(4, math.floor(math.log2(max(n, 1) / 39))))) if n >= 16 * 39 else 4
        params.update({"pq_m": m, "pq_bits": bits})
    return params


def _trained_ivf(x: np.ndarray, index_type: str, params: dict[str, int]) -> Any:
    """An IVF (flat or PQ) index trained on ``x``; refuses fewer vectors than lists."""
    import faiss

    n, dim = x.shape
    quantizer = faiss.IndexFlatL2(dim)
    if index_type == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]))
    else:
        if dim % int(params["pq_m"]):
            raise ImageIndexError(f"pq_m={params['pq_m']} must divide the embedding dim {dim}")
        index = faiss.IndexIVFPQ(
            quantizer, dim, int(params["nlist"]), int(params["pq_m"]), int(params["pq_bits"])
        )
    if n < int(params["nlist"]):
        raise ImageIndexError(
            f"{index_type} needs at least nlist={params['nlist']} vectors to train, got {n}"
        )
    index.train(x)
    return index


def make_faiss_index(vectors: np.ndarray, index_type: str, params: dict[str, int]) -> Any:
    """A trained FAISS index of ``index_type`` holding ``vectors`` (row i gets id i)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = x.shape[1]
    if index_type == "flat":
        index = faiss.IndexFlatL2(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["hnsw_m"]))
        index.hnsw.efConstruction = int(params["ef_construction"])
    elif index_type in ("ivf", "ivfpq"):
        index = _trained_ivf(x, index_type, params)
    elif index_type == SHARDED_TYPE:
        raise ImageIndexError(
            f"{SHARDED_TYPE} is written to disk by uniembed.serve.sharded.build_sharded, not built in memory"
        )
    else:
        raise ImageIndexError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    apply_search_params(index, index_type, params)
    index.add(x)
    return index


def apply_search_params(index: Any, index_type: str, params: dict[str, int]) -> None:
    """Query-time knobs (nprobe, efSearch) live in index.json so they can be tuned without rebuilding."""
    import faiss

    if index_type in IVF_TYPES and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if index_type == "hnsw" and "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])


def read_faiss_file(path: str | Path, index_type: str) -> Any:
    """Open an index.faiss: a sharded index memory-mapped from the index.ivfdata beside it (the folder may
    have moved since it was built), any other type read into memory."""
    if index_type == SHARDED_TYPE:
        from uniembed.serve.sharded_io import read_sharded

        return read_sharded(path)
    import faiss

    return faiss.read_index(str(path))
