"""A built index directory, loaded: the FAISS index, its item table and index.json, and top-k search.

Index directory layout (written atomically by ``uniembed.serve.build``)::

    index.faiss   the FAISS index; row id i == items.csv row i
    items.csv     id,path,label,domain,source[,meta] (paths absolute: see items.py; meta: extra labels.csv
                  columns as JSON, for filters: see filters.py)
    index.json    model fingerprint + path, index type + params, count, dim, skipped images with reasons,
                  size + sha256 of the other files but the thumbnails (verified on load)
    thumbs/       <id>.jpg thumbnails made while indexing, so the service never reads arbitrary files

Item ids are stable: an item keeps the id in items.csv's ``id`` column (and its thumbnail ``thumbs/<id>.jpg``)
for its whole life, and a removed item's id is never handed out again (index.json ``next_id``). FAISS row i is
items.csv row i; ``ImageIndex.position`` maps an id to its row. In an index that never had an item removed the
two are equal.

Distances are Euclidean (square root of FAISS's squared L2) between the model's L2-normalised embeddings,
so they lie in [0, 2] and 0 means the same picture.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.integrity import read_json_object, reading, verify_checksums
from uniembed.export.embedder import Embedder
from uniembed.serve.errors import DamagedIndexError, ImageIndexError, ModelMismatchError
from uniembed.serve.expansion import ExpansionSettings, expander, settings_for_index
from uniembed.serve.faiss_index import apply_search_params, read_faiss_file
from uniembed.serve.filters import Filter, ItemColumns, filtered_search, item_meta, parse_filters
from uniembed.serve.items import ITEM_FIELDS, absolute_path, read_items

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.csv"
INFO_FILE = "index.json"
THUMBS_DIR = "thumbs"
#: index.json entries every reader relies on, with the type each must have.
_INFO_SHAPE = {"model": dict, "index": dict, "count": int, "dim": int}


def rebuild_hint(root: Path, info: dict[str, Any] | None = None) -> str:
    """What to do about a damaged index: the command that rebuilds it, with the sources and model options
    index.json recorded when it is readable."""
    info = info if isinstance(info, dict) else {}
    sources = info.get("sources")
    images = " ".join(str(s) for s in sources) if isinstance(sources, list) and sources else "SOURCES"
    if len(images) > 200:
        images = "SOURCES"
    adapt, model = info.get("adapt"), info.get("model")
    if isinstance(adapt, dict) and adapt.get("spec") and adapt.get("backbone"):
        how = f"--adapt {adapt['spec']} --backbone {adapt['backbone']}"
    elif isinstance(model, dict) and model.get("path") and not model.get("adapted"):
        how = f"--model {model['path']}"
    else:
        cmd = f"uniembed index --images {images} --out {root}"
        return f"rebuild it with `{cmd}` and the model options it was built with"
    return f"rebuild it with `uniembed index --images {images} --out {root} {how}`"


def _check_info(path: Path, info: dict[str, Any], fix: str) -> None:
    """index.json must hold the entries the loader and search read, each of the right type."""
    for key, kind in _INFO_SHAPE.items():
        if not isinstance(info.get(key), kind):
            raise DamagedIndexError(f"{path} is damaged (no valid {key!r} entry); {fix}")
    if not isinstance(info["index"].get("type"), str) or "fingerprint" not in info["model"]:
        raise DamagedIndexError(f"{path} is damaged (incomplete 'index' or 'model' entry); {fix}")


def _read_faiss(path: Path, fix: str, index_type: str) -> Any:
    """The FAISS index file (a sharded index memory-mapped from the index.ivfdata beside it), or one line
    saying it cannot be read (FAISS's own error is a C++ trace)."""
    with reading(path, fix, DamagedIndexError, what="cannot be read as a FAISS index"):
        return read_faiss_file(path, index_type)


def _read_item_table(path: Path, fix: str) -> list[dict[str, str]]:
    """items.csv with every column present on every row, paths made absolute."""
    with reading(path, fix, DamagedIndexError, what="cannot be read as an item table"):
        items = read_items(path)
    for n, it in enumerate(items, start=2):
        if any(not isinstance(it.get(k), str) for k in ITEM_FIELDS) or None in it:
            raise DamagedIndexError(
                f"{path} is damaged (line {n} does not have the columns {','.join(ITEM_FIELDS)}); {fix}"
            )
        it["path"] = absolute_path(it["path"])
        if not it["id"].isdigit():
            raise DamagedIndexError(
                f"{path} is damaged (line {n}: id {it['id'][:20]!r} is not a number); {fix}"
            )
    return items


@dataclass
class Hit:
    """One search result."""

    id: int
    path: str
    label: str
    domain: str
    distance: float
    meta: dict[str, str] = field(default_factory=dict)  # the extra labels.csv columns, if any

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "path": self.path,
            "label": self.label,
            "domain": self.domain,
            "distance": round(self.distance, 6),
        }
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


@dataclass
class ImageIndex:
    """A loaded index directory: FAISS index + item table + metadata."""

    root: Path
    index: Any
    items: list[dict[str, str]]
    info: dict[str, Any]
    _positions: dict[int, int] = field(default_factory=dict, repr=False)
    _columns: ItemColumns | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._positions = {int(it["id"]): pos for pos, it in enumerate(self.items)}

    @classmethod
    def load(cls, index_dir: str | Path, verify: bool = True) -> ImageIndex:
        """Open an index directory. Refuses, with one line naming the file and how to rebuild it, an index
        whose files are missing or damaged: their sizes and sha256 recorded in index.json are checked first
        (unless ``verify`` is False; an index written before checksums has none to check), then FAISS,
        items.csv and index.json must parse and agree. Relative item paths (older indexes) are resolved
        against the current directory, so every path handed out is absolute."""
        root = Path(index_dir)
        if not (root / INFO_FILE).is_file():
            raise ImageIndexError(
                f"{root} is not an index directory (missing {INFO_FILE}); build one with `uniembed index`"
            )
        info = read_json_object(root / INFO_FILE, rebuild_hint(root), DamagedIndexError)
        fix = rebuild_hint(root, info)
        _check_info(root / INFO_FILE, info, fix)
        for name in (INDEX_FILE, ITEMS_FILE):
            if not (root / name).is_file():
                raise DamagedIndexError(f"{root / name} is missing; {fix}")
        if verify:
            verify_checksums(root, info, str(root / INFO_FILE), fix, DamagedIndexError)
        index = _read_faiss(root / INDEX_FILE, fix, info["index"]["type"])
        items = _read_item_table(root / ITEMS_FILE, fix)
        if index.ntotal != len(items) or index.ntotal != int(info["count"]):
            raise DamagedIndexError(
                f"{root}: index holds {index.ntotal} vectors but items.csv has {len(items)} rows "
                f"and index.json says {info.get('count')}; {fix}"
            )
        if len(items) and index.d != int(info["dim"]):
            raise DamagedIndexError(
                f"{root / INDEX_FILE} holds {index.d}-d vectors, index.json says {info['dim']}-d; {fix}"
            )
        with reading(root / INFO_FILE, fix, DamagedIndexError, what="has unusable index parameters"):
            apply_search_params(index, info["index"]["type"], info["index"].get("params", {}))
        ix = cls(root=root, index=index, items=items, info=info)
        if len(ix._positions) != len(items):
            raise DamagedIndexError(f"{root / ITEMS_FILE} is damaged (an id appears twice); {fix}")
        return ix

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def position(self, item_id: int) -> int | None:
        """The FAISS row of a stable item id, or None when no such item is indexed."""
        return self._positions.get(int(item_id))

    def item(self, item_id: int) -> dict[str, str] | None:
        """The items.csv row of an id (None when it is not indexed)."""
        pos = self.position(item_id)
        return None if pos is None else self.items[pos]

    @property
    def next_id(self) -> int:
        """The id the next added item gets: never one an item had before, even a removed one."""
        recorded = int(self.info.get("next_id", 0) or 0)
        return max(recorded, max(self._positions, default=-1) + 1)

    @property
    def fingerprint(self) -> str:
        return str(self.info["model"]["fingerprint"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def adapted(self) -> bool:
        """Built with ``--adapt``: the index holds its own projection and query model."""
        return isinstance(self.info.get("adapt"), dict)

    @property
    def projection(self) -> dict[str, Any] | None:
        """The ``adapt`` block of index.json (spec, dim, fitted_on, fitted_at, backbone, ...), or None."""
        return dict(self.info["adapt"]) if self.adapted else None

    def query_model_path(self) -> Path:
        """The model that embeds queries for this index: the stored query model of an adapted index (found
        beside index.json, wherever the folder now lives), else the model recorded at build time."""
        if self.adapted:
            return self.root / str(self.info["adapt"].get("query_model") or "query_model.pt")
        return Path(self.info["model"]["path"])

    def describe_projection(self) -> str:
        """One line for people: which projection an adapted index uses ('' for a fixed-model index)."""
        a = self.projection
        if a is None:
            return ""
        return (
            f"projection {a['spec']} ({a['dim']}-d, whitening power {a.get('whiten_power', 0):g}) fitted on "
            f"{a['fitted_on']} images of {a.get('backbone')} features ({a.get('feature_dim')}-d) "
            f"at {a.get('fitted_at')}"
        )

    def check_model(self, fingerprint: str) -> None:
        """Refuse a model whose vectors live in a different space than the indexed ones."""
        if fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"model fingerprint {fingerprint} differs from the one the index at {self.root} was built "
                f"with ({self.fingerprint}, {self.info['model'].get('path')}); "
                "use that model or rebuild the index"
            )

    def check_embedder(self, embedder: Embedder) -> None:
        """Refuse a loaded model that is not the index's (fingerprint) or gives vectors of another width."""
        self.check_model(embedder.fingerprint)
        if embedder.dim != self.dim:
            raise ModelMismatchError(f"model gives {embedder.dim}-d vectors but the index holds {self.dim}-d")

    @property
    def columns(self) -> ItemColumns:
        """The items' filterable columns (built once per loaded index, on first use)."""
        if self._columns is None:
            self._columns = ItemColumns(self.items)
        return self._columns

    def reconstructable_index(self) -> Any:
        """The FAISS index, able to hand back stored vectors: an IVF index gets its (array) id map once,
        under a lock, so concurrent requests never rebuild it under each other. FAISS then refuses
        ``remove_ids`` on this object: edits work on a freshly loaded index."""
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            with self._lock:
                if ivf.direct_map.type == faiss.DirectMap.NoMap:
                    ivf.make_direct_map()
        return self.index

    def vector(self, item_id: int) -> np.ndarray:
        """The stored vector of an item (as FAISS holds it: PQ-coded indexes give the decoded one)."""
        pos = self.position(item_id)
        if pos is None:
            raise ImageIndexError(f"no item with id {item_id} in the index at {self.root}")
        return np.asarray(self.reconstructable_index().reconstruct(int(pos)), dtype=np.float32)

    def matching(self, filters: Sequence[Filter | str] | None = None, exclude_ids: Iterable[int] = ()) -> int:
        """How many items pass ``filters`` (all of them without filters), leaving out ``exclude_ids``."""
        mask = self._allowed(_as_filters(filters), exclude_ids)
        return len(self) if mask is None else int(mask.sum())

    def _allowed(self, filters: list[Filter], exclude_ids: Iterable[int]) -> np.ndarray | None:
        """Bool mask of the FAISS rows a search may return (None: every row)."""
        mask = self.columns.mask(filters)
        rows = [p for p in (self.position(i) for i in exclude_ids) if p is not None]
        if rows:
            mask = np.ones(len(self), dtype=bool) if mask is None else mask
            mask[rows] = False
        return mask

    def search_batch(
        self,
        vectors: np.ndarray,
        k: int = 5,
        max_distance: float | None = None,
        filters: Sequence[Filter | str] | None = None,
        exclude_ids: Iterable[int] = (),
        expand: Callable[[ImageIndex, np.ndarray], np.ndarray] | bool | None = True,
    ) -> list[list[Hit]]:
        """Top-k for many query vectors in one FAISS call (nearest first).

        ``max_distance`` drops results farther than it; ``filters`` (``Filter``s or ``domain=toys``-style
        strings, all of which must hold) and ``exclude_ids`` restrict the search inside FAISS, with k
        results whenever k items qualify (see ``filters.filtered_search``). ``expand``: query expansion,
        a hook mapping (index, query vectors) to the vectors actually searched; True (the default) applies
        the index's own setting (``expansion``: alpha-QE for an index of a GUIE model, off for a
        collection-adapted one), False or None searches the plain vectors. With an expansion the expanded
        query picks the k results, which are then ordered by their distance from the query as given: every
        distance reported (and ``max_distance``) is the plain one, so 0 still means the same picture. (On
        the shared domains this re-sort kept the whole measured gain: docs/search.md.)"""
        q = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ImageIndexError(f"query vectors have dim {q.shape[1]}, index has {self.dim}")
        if expand is True:
            expand = expander(self.expansion, exclude_ids)
        searched = q if not callable(expand) else np.ascontiguousarray(expand(self, q), dtype=np.float32)
        k = int(max(1, min(k, len(self))))
        allowed = self._allowed(_as_filters(filters), exclude_ids)
        index = self.reconstructable_index() if allowed is not None else self.index
        dist, ids = filtered_search(index, searched, k, allowed)
        if searched is not q:
            dist, ids = self._distances_from(q, ids)
        limit = math.inf if max_distance is None else float(max_distance)
        return [self._hits(drow, irow, limit) for drow, irow in zip(dist, ids, strict=True)]

    @property
    def expansion(self) -> ExpansionSettings:
        """The query expansion this index's searches use by default (index.json ``expansion``, else the
        measured default for its kind: see ``serve/expansion.py``)."""
        return settings_for_index(self.info)

    def _distances_from(self, q: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 from each original query to its result rows' stored vectors, the rows), each query's
        results re-sorted nearest first; -1 rows (fewer reachable) get inf and stay last."""
        safe = np.where(rows >= 0, rows, 0).astype(np.int64)
        stored = self.reconstructable_index().reconstruct_batch(safe.reshape(-1)).reshape(*rows.shape, -1)
        d2 = np.where(rows >= 0, ((stored - q[:, None, :]) ** 2).sum(-1), np.inf).astype(np.float32)
        order = np.argsort(d2, axis=1, kind="stable")
        return np.take_along_axis(d2, order, 1), np.take_along_axis(rows, order, 1)

    def _hits(self, dist: np.ndarray, rows: np.ndarray, limit: float) -> list[Hit]:
        """One query's results as Hits, nearest first, cut at ``limit``; -1 rows (fewer reachable) dropped."""
        hits = []
        for d, i in zip(dist, rows, strict=True):
            distance = float(math.sqrt(max(float(d), 0.0)))
            if i < 0 or distance > limit:
                continue
            it = self.items[int(i)]
            hits.append(Hit(int(it["id"]), it["path"], it["label"], it["domain"], distance, item_meta(it)))
        return hits

    def thumbnail_path(self, item_id: int) -> Path | None:
        """The stored thumbnail of an indexed id, or None (ids only: callers never pass paths)."""
        if self.position(item_id) is None:
            return None
        p = self.root / THUMBS_DIR / f"{int(item_id)}.jpg"
        return p if p.is_file() else None


def _as_filters(filters: Sequence[Filter | str] | None) -> list[Filter]:
    """Filters given as objects or as ``COLUMN=VALUE`` strings, parsed once."""
    return [f if isinstance(f, Filter) else parse_filters([f])[0] for f in (filters or []) if str(f).strip()]
