"""Opening a merged sharded index memory-mapped, and measuring its recall against exact search.

The merged index is two files: ``index.faiss`` (quantizer, PQ codebooks, list sizes: small) and
``index.ivfdata`` (the PQ codes and ids of every inverted list: large). FAISS stores the ivfdata path inside
index.faiss; it is read back relative to the folder index.faiss is in (``IO_FLAG_ONDISK_SAME_DIR``), so an
index folder can be moved or copied anywhere, and mapped read-only, so it can live on a read-only volume and
many server processes share one copy of the codes in the page cache.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.serve.errors import ImageIndexError

IVFDATA_FILE = "index.ivfdata"
#: Queries sampled from the indexed vectors to measure recall at build time.
RECALL_QUERIES = 1000
#: nprobe is raised (doubling) until recall@k on the tuning queries reaches this, or stops improving.
RECALL_GOAL = 0.95
#: Base vectors scanned per exact-search chunk (bounded memory for any N, float16 memmaps included).
_EXACT_CHUNK = 1_000_000


@contextmanager
def quiet_faiss() -> Iterator[None]:
    """Silence FAISS's C-level progress lines ("resizing ...", "updating ondisk filename ...") so CLI output
    and server logs stay one line per event; C stdio is flushed before fd 1 is given back."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (detached): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            try:
                yield
            finally:
                libc.fflush(None)
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def read_sharded(path: str | Path) -> Any:
    """The merged index at ``path`` with its inverted lists memory-mapped read-only from the
    ``index.ivfdata`` beside it (wherever the folder now lives); nothing of the codes is read into RAM."""
    import faiss

    path = Path(path)
    ivfdata = path.parent / IVFDATA_FILE
    if not ivfdata.is_file():
        raise ImageIndexError(f"{ivfdata} is missing (the inverted lists of {path})")
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    with quiet_faiss():
        index = faiss.read_index(str(path), flags)
    lists = ondisk_lists(index)
    if lists is None:
        raise ImageIndexError(f"{path} is not a merged on-disk index (its inverted lists are in memory)")
    return index


def ondisk_lists(index: Any) -> Any | None:
    """The ``OnDiskInvertedLists`` of an IVF index (None when its lists are in memory)."""
    import faiss

    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def exact_knn(queries: np.ndarray, vectors: Any, k: int) -> np.ndarray:
    """Exact top-``k`` row ids of ``queries`` among ``vectors`` (any array-like, e.g. a float16 memmap),
    scanned in chunks so memory stays bounded whatever the collection size."""
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(q.shape[0], k)
    for s in range(0, len(vectors), _EXACT_CHUNK):
        base = np.ascontiguousarray(vectors[s : s + _EXACT_CHUNK], dtype=np.float32)
        dist, ids = faiss.knn(q, base, min(k, len(base)))
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(dist), np.ascontiguousarray(ids + np.where(ids >= 0, s, 0)))
    heap.finalize()
    return heap.I


def _drop_self(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Top-k lists without the query's own row (queries are indexed vectors: finding themselves is free)."""
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, (row, found) in enumerate(zip(rows, ids, strict=True)):
        rest = [int(j) for j in found if j != row][:k]
        out[i, : len(rest)] = rest
    return out


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true k nearest neighbours that are among the k returned."""
    hits = sum(len(set(f.tolist()) & set(t.tolist()) - {-1}) for f, t in zip(found, truth, strict=True))
    return hits / max(1, truth.size)


def tune_and_measure(
    index: Any,
    vectors: Any,
    k: int = 5,
    n_queries: int = RECALL_QUERIES,
    goal: float = RECALL_GOAL,
    seed: int = 0,
) -> dict[str, Any]:
    """Pick nprobe and report recall@k against exact search, on indexed vectors used as queries (their own
    row excluded from both lists). Half the queries tune nprobe (doubling until recall reaches ``goal`` or
    gains under 0.005), the other half give the recall that is reported; the index keeps the chosen nprobe."""
    import faiss

    n = len(vectors)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, max(2, n_queries)), replace=False))
    q = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    truth = _drop_self(exact_knn(q, vectors, k + 1), rows, k)
    half = len(rows) // 2
    ivf = faiss.extract_index_ivf(index)
    sweep: list[dict[str, float]] = []
    nprobe, best = 1, -1.0
    while True:
        ivf.nprobe = nprobe
        r = _recall(_drop_self(index.search(q[:half], k + 1)[1], rows[:half], k), truth[:half])
        sweep.append({"nprobe": nprobe, "recall": round(r, 4)})
        if r >= goal or nprobe >= ivf.nlist or (best >= 0 and r - best < 0.005):
            break
        best, nprobe = r, min(ivf.nlist, nprobe * 2)
    if r < goal and len(sweep) > 1 and r - best < 0.005:
        nprobe = int(sweep[-2]["nprobe"])  # the last doubling bought nothing: keep the cheaper one
    ivf.nprobe = nprobe
    found = _drop_self(index.search(q[half:], k + 1)[1], rows[half:], k)
    return {
        "k": k,
        "recall": round(_recall(found, truth[half:]), 4),
        "queries": int(len(rows) - half),
        "tune_queries": int(half),
        "nprobe": int(nprobe),
        "goal": goal,
        "sweep": sweep,
        "method": "indexed vectors as queries, own row excluded; truth = exact L2 (faiss.knn)",
    }
