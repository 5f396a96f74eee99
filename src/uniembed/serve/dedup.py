"""Near-duplicate and exact-duplicate groups of a collection (``uniembed dedup``), as plain functions.

Near duplicates are found by embedding distance: every vector is a query of a FAISS range search over the
L2-normalised vectors (radius = threshold squared, queries in batches so memory stays bounded), the pairs
found are the edges of a graph, and its connected components (scipy) are the groups. Exact duplicates are
files with identical bytes (sha256) and are reported apart: a group of identical files is an ``exact``
group, and it takes part in the near-duplicate search through its first file only, so one photo saved
twice and resized once gives one exact group and one near group.

Distances are Euclidean between unit vectors, in [0, 2], as everywhere in the index (store.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.fsutil import sha256_file

#: Default near-duplicate distance for the default index embedding (pcaw256 on the ensemble backbone),
#: picked on real photos with made duplicates: `python -m uniembed_lab.dedup_calibration` (docs/search.md).
DEFAULT_THRESHOLD = 0.425
#: Queries per range-search call: bounds the result buffers FAISS allocates at once.
RANGE_BATCH = 4096
#: Groups up to this size get max/mean over all member pairs; bigger ones over the linked pairs only.
PAIRWISE_MAX = 1000


@dataclass
class NearGroup:
    """One near-duplicate group: member rows (ascending) and the distances between them."""

    members: list[int]
    max_distance: float
    mean_distance: float


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 C-contiguous rows scaled to unit length (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-d array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def range_pairs(
    vectors: np.ndarray, threshold: float, batch: int = RANGE_BATCH
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for every pair i < j of unit rows at most ``threshold`` apart (FAISS range search)."""
    import faiss

    x = unit_rows(vectors)
    n, dim = x.shape
    index = faiss.IndexFlatL2(dim)
    index.add(x)
    radius = float(threshold) ** 2 * (1 + 1e-6) + 1e-12  # range_search keeps d < radius; include d == T
    rows, cols, dists = [], [], []
    for start in range(0, n, max(1, int(batch))):
        lims, d, j = index.range_search(x[start : start + batch], radius)
        i = np.repeat(np.arange(start, start + len(lims) - 1, dtype=np.int64), np.diff(lims).astype(np.int64))
        keep = j > i
        rows.append(i[keep])
        cols.append(j[keep].astype(np.int64))
        dists.append(np.sqrt(np.maximum(d[keep], 0)).astype(np.float32))
    if not rows:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(dists)


def components(n: int, rows: np.ndarray, cols: np.ndarray) -> list[list[int]]:
    """Connected components of size >= 2 of the graph with ``n`` nodes and edges (rows[k], cols[k]),
    largest first, members ascending (scipy's csgraph does it in C)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0 or len(rows) == 0:
        return []
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels)
    groups = [g.tolist() for g in np.split(order, np.cumsum(sizes)[:-1]) if len(g) > 1]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups


def duplicate_groups(vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[list[int]]:
    """Rows of ``vectors`` grouped by near-duplicate links (distance <= ``threshold``, transitively);
    singletons are left out, largest group first."""
    return [g.members for g in near_groups(vectors, threshold)]


def near_groups(
    vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD, batch: int = RANGE_BATCH
) -> list[NearGroup]:
    """``duplicate_groups`` with each group's max and mean distance between its members."""
    x = unit_rows(vectors)
    rows, cols, dists = range_pairs(x, threshold, batch)
    out = []
    for members in components(len(x), rows, cols):
        if len(members) <= PAIRWISE_MAX:
            v = x[members]
            sq = np.maximum(2.0 - 2.0 * (v @ v.T), 0.0)
            d = np.sqrt(sq[np.triu_indices(len(members), 1)])
        else:
            inside = np.isin(rows, members)
            d = dists[inside]
        out.append(NearGroup(members, float(d.max()), float(d.mean())))
    return out


def exact_groups(paths: Sequence[str | Path]) -> tuple[list[list[int]], dict[int, str]]:
    """(groups of positions whose files have identical bytes, largest first; {position: reason} for files
    that could not be read). Files of different sizes are never hashed against each other."""
    by_size: dict[int, list[int]] = {}
    unreadable: dict[int, str] = {}
    for i, p in enumerate(paths):
        try:
            by_size.setdefault(Path(p).stat().st_size, []).append(i)
        except OSError as e:
            unreadable[i] = e.strerror or type(e).__name__
    by_hash: dict[str, list[int]] = {}
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        for i in same_size:
            try:
                by_hash.setdefault(sha256_file(paths[i]), []).append(i)
            except OSError as e:
                unreadable[i] = e.strerror or type(e).__name__
    groups = [sorted(g) for g in by_hash.values() if len(g) > 1]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups, unreadable


def index_vectors(index: Any) -> np.ndarray:
    """Every stored vector of a FAISS index, row i = id i: ``reconstruct_n`` for flat and HNSW; IVF indexes
    get a direct map first (PQ codes give their approximations)."""
    import faiss

    n = int(index.ntotal)
    if n == 0:
        return np.zeros((0, int(index.d)), np.float32)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    return np.ascontiguousarray(index.reconstruct_n(0, n), dtype=np.float32)
