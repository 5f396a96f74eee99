"""Optional retrieval boosts: alpha-weighted query expansion (alpha-QE) and database-side augmentation (DBA).

Both replace a vector by the weighted average of itself (weight 1) and its top-n neighbours (weight
``max(sim, 0) ** alpha``), L2-normalised (Radenovic et al., "Fine-tuning CNN image retrieval with no human
annotation", 2018). alpha-QE does it to a query at search time and searches again; DBA does it once to every
stored vector at build time, so the database itself moves towards its clusters.

Vectors are L2-normalised and the index metric is squared Euclidean, so a neighbour's similarity is the
cosine ``1 - d^2 / 2``. The GUIE model file embeds one image at a time and cannot hold either step (they need
the collection); an index and the search service can. ``ExpansionSettings`` says what to apply;
``expand_queries`` is the call a search makes before its FAISS search; ``dba`` rewrites vectors before they
are indexed. Whether they help depends on the embedding: docs/search.md has the per-domain measurements
(`python -m uniembed_lab.expansion_eval`) behind ``DEFAULTS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from uniembed.serve.faiss_index import SHARDED_TYPE


@dataclass(frozen=True)
class ExpansionSettings:
    """What to apply: ``qe_n`` / ``dba_n`` neighbours (0: off), weighted by ``qe_alpha`` / ``dba_alpha``."""

    qe_n: int = 0
    qe_alpha: float = 3.0
    dba_n: int = 0
    dba_alpha: float = 3.0

    def __post_init__(self) -> None:
        if self.qe_n < 0 or self.dba_n < 0:
            raise ValueError(f"neighbour counts must be >= 0, got qe_n={self.qe_n}, dba_n={self.dba_n}")
        if self.qe_alpha < 0 or self.dba_alpha < 0:
            raise ValueError(f"alpha must be >= 0, got qe={self.qe_alpha}, dba={self.dba_alpha}")

    @property
    def off(self) -> bool:
        return self.qe_n == 0 and self.dba_n == 0

    def describe(self) -> str:
        parts = []
        if self.qe_n:
            parts.append(f"alpha-QE n={self.qe_n} alpha={self.qe_alpha:g}")
        if self.dba_n:
            parts.append(f"DBA n={self.dba_n} alpha={self.dba_alpha:g}")
        return " + ".join(parts) or "off"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ExpansionSettings:
        d = d or {}
        return cls(**{k: type(getattr(cls(), k))(v) for k, v in d.items() if k in cls.__dataclass_fields__})


#: Chosen on the mean mP@5 over the 7 shared domains (merged index, leave-one-out, docs/search.md). For an
#: index of a GUIE model, alpha-QE with n=2, alpha=3 gained +0.010 (DBA on top: +0.004 more, but it rewrites
#: the stored vectors, so every later add or removal would have to recompute it from kept plain vectors, and
#: distances would no longer be the model's: left off by default, available through ``dba``). For the
#: collection-adapted default index the best setting gained +0.006 in-sample and only +0.001 with each
#: domain held out of the choice, so it stays off.
DEFAULTS: dict[str, ExpansionSettings] = {
    "adapted": ExpansionSettings(),
    "model": ExpansionSettings(qe_n=2, qe_alpha=3.0),
}


def settings_for_index(info: dict[str, Any]) -> ExpansionSettings:
    """The settings an index's searches use, from its index.json: the ``expansion`` block a build recorded
    (its DBA part says what was done to the stored vectors), else the default for its kind with DBA off,
    since an index built before these existed holds plain vectors."""
    recorded = info.get("expansion")
    if isinstance(recorded, dict):
        return ExpansionSettings.from_dict(recorded)
    index = info.get("index") if isinstance(info.get("index"), dict) else {}
    if index.get("type") == SHARDED_TYPE:
        # Reading neighbours back needs an id map over every vector (8 bytes each: 8 GB at 1B) and gives
        # only PQ approximations; the gain was measured on exact vectors. Opt in with an expansion block.
        return ExpansionSettings()
    default = DEFAULTS["adapted" if isinstance(info.get("adapt"), dict) else "model"]
    return ExpansionSettings(qe_n=default.qe_n, qe_alpha=default.qe_alpha)


def l2n(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (eps 1e-12, like the rest of the project)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def neighbour_weights(sims: np.ndarray, alpha: float) -> np.ndarray:
    """``max(sim, 0) ** alpha``; alpha 0 gives every neighbour weight 1 (plain average QE)."""
    s = np.maximum(np.asarray(sims, dtype=np.float32), 0.0)
    return np.ones_like(s) if alpha == 0 else s ** np.float32(alpha)


def weighted_average(
    base: np.ndarray, nbr_vecs: np.ndarray, nbr_sims: np.ndarray, alpha: float
) -> np.ndarray:
    """L2n(base + sum_j w_j * nbr_j), base [Q, D] weight 1, nbr_vecs [Q, n, D], nbr_sims [Q, n]."""
    base = np.asarray(base, dtype=np.float32)
    if nbr_vecs.shape[1] == 0:
        return l2n(base)
    w = neighbour_weights(nbr_sims, alpha)
    return l2n(base + np.einsum("qn,qnd->qd", w, np.asarray(nbr_vecs, dtype=np.float32)))


def knn_ip(
    vectors: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (= cosine for unit vectors) with FAISS: (sims [Q, k], rows [Q, k]).

    ``exclude_self``: queries are ``vectors`` themselves and row i never lists i (dropped by id, so an exact
    duplicate that ties with i still counts as a neighbour)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k_eff = min(k, x.shape[0] - (1 if exclude_self else 0))
    if k_eff <= 0 or q.shape[0] == 0:
        return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(q, k_eff + (1 if exclude_self else 0))
    if not exclude_self:
        return sims, ids
    return _drop_rows(sims, ids, np.arange(q.shape[0]), k_eff)


def _drop_rows(sims: np.ndarray, ids: np.ndarray, drop: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k results of each row that are not in its ``drop`` rows ([Q] or [Q, m]), order kept;
    columns left short are -1."""
    drop = np.asarray(drop, np.int64).reshape(len(ids), -1)
    keep = ~(ids[:, :, None] == drop[:, None, :]).any(2)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, 1)
    return (
        np.where(kept, np.take_along_axis(sims, order, 1), 0.0).astype(np.float32),
        np.where(kept, np.take_along_axis(ids, order, 1), -1),
    )


def dba(vectors: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Database-side augmentation: each vector becomes L2n(itself + its top-n neighbours weighted
    ``max(sim, 0) ** alpha``), neighbours found among the *original* vectors. n=0 returns them unchanged."""
    x = np.asarray(vectors, dtype=np.float32)
    if n <= 0 or len(x) < 2:
        return x.copy()
    sims, ids = knn_ip(x, x, n, exclude_self=True)
    return dba_from_knn(x, sims, ids, n, alpha)


def dba_from_knn(x: np.ndarray, sims: np.ndarray, ids: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """DBA from a precomputed self-excluded kNN (sims/ids with at least n columns): lets one kNN serve
    several n and alpha."""
    return weighted_average(x, x[ids[:, :n]], sims[:, :n], alpha)


def _reconstruct(index: Any, rows: np.ndarray) -> np.ndarray:
    """Stored vectors of FAISS rows; IVF indexes get their direct map first (needed by reconstruct)."""
    import faiss

    flat = rows.reshape(-1).astype(np.int64)
    try:
        out = index.reconstruct_batch(flat)
    except RuntimeError:
        faiss.extract_index_ivf(index).make_direct_map()
        out = index.reconstruct_batch(flat)
    return np.asarray(out, np.float32).reshape(*rows.shape, -1)


def alpha_qe(
    index_or_vectors: Any,
    queries: np.ndarray,
    n: int,
    alpha: float,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """alpha-QE: the expanded queries L2n(q + sum of its top-n neighbours weighted ``max(sim, 0) ** alpha``);
    search again with them. ``index_or_vectors``: a FAISS index (squared L2, as the image index builds) or
    an [N, D] array. ``exclude``: one row per query never used as its neighbour (-1: none), e.g. the item
    itself when a "more like this" query is an indexed item (it already has weight 1 as the query)."""
    q = l2n(np.atleast_2d(queries))
    if n <= 0:
        return q
    extra = 0 if exclude is None else np.asarray(exclude).reshape(len(q), -1).shape[1]
    vecs = None
    if isinstance(index_or_vectors, np.ndarray):
        vecs = np.asarray(index_or_vectors, np.float32)
        sims, ids = knn_ip(vecs, q, n + extra)
    else:
        k = min(n + extra, int(index_or_vectors.ntotal))
        d2, ids = index_or_vectors.search(np.ascontiguousarray(q), k)
        sims = 1.0 - d2 / 2.0
    if exclude is not None:
        sims, ids = _drop_rows(sims, ids, exclude, n)
    valid = ids >= 0  # IVF/HNSW may find fewer than asked
    sims = np.where(valid, sims, 0.0)
    safe = np.where(valid, ids, 0)
    nbr_vecs = vecs[safe] if vecs is not None else _reconstruct(index_or_vectors, safe)
    nbr_vecs = nbr_vecs * valid[..., None]
    return weighted_average(q, nbr_vecs, sims, alpha)


def expand_queries(
    index: Any, queries: np.ndarray, settings: ExpansionSettings, exclude: np.ndarray | None = None
) -> np.ndarray:
    """The queries a search should send to FAISS under ``settings`` (unchanged when QE is off).

    ``index``: an ``ImageIndex`` (its ``reconstructable_index()``) or a FAISS index. DBA is not applied here:
    it belongs to the stored vectors (``dba`` at build time), and QE then averages those stored vectors."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if settings.qe_n <= 0:
        return q
    getter = getattr(index, "reconstructable_index", None)
    faiss_index = getter() if callable(getter) else index
    return alpha_qe(faiss_index, q, settings.qe_n, settings.qe_alpha, exclude=exclude)


def expander(
    settings: ExpansionSettings, exclude_ids: Iterable[int] = ()
) -> Callable[[Any, np.ndarray], np.ndarray] | None:
    """The ``expand`` hook of ``ImageIndex.search_batch`` for ``settings`` (None when QE is off); items in
    ``exclude_ids`` (a "more like this" item itself) never serve as neighbours."""
    if settings.qe_n <= 0:
        return None
    ids = list(exclude_ids)

    def expand(index: Any, queries: np.ndarray) -> np.ndarray:
        rows = [p for p in (index.position(i) for i in ids) if p is not None]
        q = np.atleast_2d(queries)
        exclude = np.tile(np.asarray(rows, np.int64), (len(q), 1)) if rows else None
        return expand_queries(index, q, settings, exclude=exclude)

    return expand
