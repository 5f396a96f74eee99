"""Metadata filters for search (``domain=toys``, ``label^=coil100:``, ``colour!=red``) and the filtered
FAISS search that applies them inside the index, so k results come back whenever k items match.

One place for the syntax, used by ``uniembed search --filter`` and the service's ``filter`` parameters:
``COLUMN=VALUE`` (exact), ``COLUMN^=PREFIX`` (starts with), ``COLUMN!=VALUE`` (anything else). Several
filters all have to hold. Columns are an item's ``path``, ``label``, ``domain``, ``source`` and the extra
columns of the labels.csv it was indexed from (items.csv ``meta``); an item without such a column has the
value ''.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from uniembed.serve.errors import ImageIndexError
from uniembed.serve.items import META_FIELD

#: Item columns every index has and filters may name (``id`` is not a filter: use ``--id``).
BASE_COLUMNS = ("label", "domain", "path", "source")
_FILTER = re.compile(r"^\s*([^=!^]+?)\s*(\^=|!=|=)(.*)$", re.S)
#: Allowed rows below this are searched exactly over their stored vectors instead of through the index.
EXACT_MAX = 4096
_CHUNK = 65536


class FilterError(ImageIndexError):
    """A filter that cannot be parsed or names a column the index does not have."""


@dataclass(frozen=True)
class Filter:
    """One condition on an item column."""

    column: str
    op: str  # "=", "^=" or "!="
    value: str

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value}"

    def test(self, values: np.ndarray) -> np.ndarray:
        """Which of the (distinct) column values pass, as a bool array."""
        if self.op == "^=":
            return np.array([str(v).startswith(self.value) for v in values], dtype=bool)
        same = values == self.value
        return ~same if self.op == "!=" else same


def parse_filter(text: str) -> Filter:
    """``COLUMN=VALUE``, ``COLUMN^=PREFIX`` or ``COLUMN!=VALUE``; the value is kept as written."""
    m = _FILTER.match(str(text))
    if m is None:
        raise FilterError(
            f"bad filter {str(text)[:60]!r}: write COLUMN=VALUE, COLUMN^=PREFIX or COLUMN!=VALUE"
        )
    return Filter(m.group(1), m.group(2), m.group(3))


def parse_filters(texts: Iterable[str] | None) -> list[Filter]:
    """Every filter of a request or command line (None or empty: no filtering)."""
    return [parse_filter(t) for t in (texts or []) if str(t).strip()]


def item_meta(item: dict[str, Any]) -> dict[str, str]:
    """The extra labels.csv columns of an item row ({} for items from folders, shards or older indexes)."""
    raw = item.get(META_FIELD) or ""
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


class ItemColumns:
    """Column values of an index's items, each kept as (distinct values, code per row) and built on first
    use, so a filter costs one test per distinct value plus one vectorised lookup per row."""

    def __init__(self, items: Sequence[dict[str, Any]]) -> None:
        self._items = items
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._meta: list[dict[str, str]] | None = None
        self._names: list[str] | None = None

    def _metas(self) -> list[dict[str, str]]:
        if self._meta is None:
            self._meta = [item_meta(it) for it in self._items]
        return self._meta

    @property
    def names(self) -> list[str]:
        """Columns a filter may name: the base ones, then every metadata column in name order."""
        if self._names is None:
            extra = sorted({k for m in self._metas() for k in m} - set(BASE_COLUMNS))
            self._names = [*BASE_COLUMNS, *extra]
        return list(self._names)

    def coded(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(distinct values, row codes) of one column; FilterError listing the known ones if unknown."""
        if column not in self._cache:
            if column in BASE_COLUMNS:
                raw = [str(it.get(column, "")) for it in self._items]
            elif column in self.names:
                raw = [m.get(column, "") for m in self._metas()]
            else:
                raise FilterError(f"unknown filter column {column!r}; known columns: {', '.join(self.names)}")
            values, codes = np.unique(np.array(raw, dtype=object), return_inverse=True)
            self._cache[column] = (values, codes.reshape(-1))
        return self._cache[column]

    def check(self, filters: Sequence[Filter]) -> None:
        """Refuse a filter on a column the index does not have (before any search runs)."""
        for f in filters:
            self.coded(f.column)

    def mask(self, filters: Sequence[Filter]) -> np.ndarray | None:
        """Rows passing every filter (None: no filters, every row)."""
        if not filters:
            return None
        keep = np.ones(len(self._items), dtype=bool)
        for f in filters:
            values, codes = self.coded(f.column)
            if len(values):
                keep &= f.test(values)[codes]
        return keep

    def counts(self, column: str, limit: int = 100) -> list[dict[str, Any]]:
        """The most frequent values of a column with their counts (for the page's filter choices)."""
        values, codes = self.coded(column)
        n = np.bincount(codes, minlength=len(values)) if len(values) else np.zeros(0, int)
        order = sorted(range(len(values)), key=lambda i: (-int(n[i]), str(values[i])))[:limit]
        return [{"value": str(values[i]), "count": int(n[i])} for i in order]

    def facets(self) -> dict[str, Any]:
        """What a page offers to filter on: every column, the domains and label prefixes with their
        counts, and the most frequent values of each metadata column."""
        extra = [c for c in self.names if c not in BASE_COLUMNS]
        return {
            "columns": self.names,
            "domains": self.counts("domain"),
            "label_prefixes": self.label_prefixes(),
            "meta": {c: self.counts(c, limit=50) for c in extra},
        }

    def label_prefixes(self, limit: int = 100) -> list[dict[str, Any]]:
        """Label prefixes up to and including the first ':' (``coil100:``), with their item counts."""
        values, codes = self.coded("label")
        n = np.bincount(codes, minlength=len(values)) if len(values) else np.zeros(0, int)
        tally: dict[str, int] = {}
        for v, c in zip(values, n, strict=True):
            head, sep, _ = str(v).partition(":")
            if sep:
                tally[head + sep] = tally.get(head + sep, 0) + int(c)
        ranked = sorted(tally.items(), key=lambda t: (-t[1], t[0]))[:limit]
        return [{"value": p, "count": c} for p, c in ranked]


def _selector_params(index: Any, sel: Any, widen: bool) -> Any:
    """FAISS search parameters carrying the selector, with the index's own nprobe/efSearch (``widen``:
    every IVF list / a deeper HNSW search, for a retry that came back short). Chosen by what the index is
    (an IVF behind a transform counts), so every type FAISS builds here is covered."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=sel, nprobe=int(ivf.nlist if widen else ivf.nprobe))
    if hasattr(index, "hnsw"):
        ef = int(index.hnsw.efSearch)
        return faiss.SearchParametersHNSW(sel=sel, efSearch=max(ef * 8, 512) if widen else ef)
    return faiss.SearchParameters(sel=sel)


def exact_search(index: Any, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query over the stored vectors of ``rows`` (chunked so memory stays bounded);
    squared L2 distances and FAISS rows, padded with (inf, -1) like FAISS."""
    import faiss

    best_d = np.full((len(q), k), np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for start in range(0, len(rows), _CHUNK):
        part = rows[start : start + _CHUNK]
        xb = index.reconstruct_batch(part.astype(np.int64))
        d, i = faiss.knn(q, xb, min(k, len(part)))
        d = np.concatenate([best_d, d], axis=1)
        i = np.concatenate([best_i, np.where(i >= 0, part[np.clip(i, 0, None)], -1)], axis=1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    return best_d, best_i


def filtered_search(
    index: Any, q: np.ndarray, k: int, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search restricted to the ``allowed`` rows (bool mask; None: all), returning k results per
    query whenever k rows are allowed: few allowed rows are scanned exactly; otherwise an ID selector runs
    inside the index, and a query it leaves short (IVF lists probed, HNSW graph) is retried wider, then
    exactly over the allowed rows."""
    import faiss

    if allowed is None:
        return index.search(q, k)
    rows = np.flatnonzero(allowed)
    want = min(k, len(rows))
    if want == 0:
        return np.full((len(q), k), np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    if len(rows) <= EXACT_MAX:
        return exact_search(index, q, k, rows)
    bitmap = np.packbits(allowed, bitorder="little")
    sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
    dist, ids = index.search(q, k, params=_selector_params(index, sel, widen=False))
    short = np.flatnonzero((ids >= 0).sum(axis=1) < want)
    if len(short):
        d2, i2 = index.search(q[short], k, params=_selector_params(index, sel, widen=True))
        dist[short], ids[short] = d2, i2
        short = short[(i2 >= 0).sum(axis=1) < want]
    if len(short):
        dist[short], ids[short] = exact_search(index, q[short], k, rows)
    del bitmap  # the selector points into it: keep it alive until the searches are done
    return dist, ids
