"""The row-level work of an index edit: FAISS rows dropped and renumbered, the files an edit carries over
from the old index folder by hard link, and the writer of the edited folder (see ``edits.py``)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.serve.errors import ImageIndexError
from uniembed.serve.items import absolute_path
from uniembed.serve.sharded_io import IVFDATA_FILE
from uniembed.serve.store import INDEX_FILE, INFO_FILE, ITEMS_FILE, THUMBS_DIR, ImageIndex

#: Originals of images added through the service (``POST /items``), named by content hash.
UPLOADS_DIR = "uploads"
FEATURES_FILE = "features.npy"  # adapt.FEATURES_FILE (not imported: adapt pulls in torch)
ADAPT_FILES = ("projection.npz", "query_model.pt")  # written by AdaptPlan.finish on an add
_REWRITTEN = {INDEX_FILE, ITEMS_FILE, INFO_FILE, FEATURES_FILE, THUMBS_DIR, UPLOADS_DIR, IVFDATA_FILE}


def _link(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (a copy where links are refused), files or whole folders."""
    import shutil

    if src.is_dir():
        dst.mkdir(exist_ok=True)
        for p in src.iterdir():
            _link(p, dst / p.name)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _renumber_ivf(index: Any, new_row: np.ndarray) -> None:
    """After ``remove_ids`` an IVF index keeps the old row numbers as ids; give each entry its new row."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if not n:
            continue
        ids = faiss.rev_swig_ptr(inv.get_ids(lst), n).copy()
        codes = faiss.rev_swig_ptr(inv.get_codes(lst), n * inv.code_size).copy()
        renum = np.ascontiguousarray(new_row[ids], dtype=np.int64)
        inv.update_entries(lst, 0, n, faiss.swig_ptr(renum), faiss.swig_ptr(codes))


@contextlib.contextmanager
def _all_cores() -> Iterator[None]:
    """FAISS on every core for a rebuild (the service pins it to one thread for searches), then back."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(before, os.cpu_count() or 1))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def drop_rows(index: Any, kind: str, params: dict[str, int], rows: Sequence[int]) -> Any:
    """The FAISS index without ``rows``, the others renumbered 0..n-1 in their order (owned index only)."""
    from uniembed.serve.faiss_index import make_faiss_index

    n = int(index.ntotal)
    drop = np.asarray(sorted(rows), dtype=np.int64)
    if kind == "hnsw":  # FAISS cannot remove from an HNSW graph: rebuild it from the stored vectors
        keep = np.setdiff1d(np.arange(n), drop)
        vectors = index.reconstruct_n(0, n) if n else np.zeros((0, index.d), np.float32)
        with _all_cores():
            return make_faiss_index(vectors[keep], kind, params)
    if kind not in ("flat", "ivf", "ivfpq"):
        raise ImageIndexError(f"removing items from a {kind!r} index is not supported; rebuild it instead")
    if len(drop):
        removed = index.remove_ids(drop)
        if removed != len(drop):
            raise ImageIndexError(f"FAISS removed {removed} of {len(drop)} rows; the index was not changed")
    if kind != "flat":
        gone = np.zeros(n, dtype=np.int64)
        gone[drop] = 1
        _renumber_ivf(index, np.arange(n, dtype=np.int64) - np.cumsum(gone))
    return index


def carry_thumbs_and_uploads(old: ImageIndex, tmp: Path, keep: Sequence[dict[str, str]]) -> None:
    """Hard-link into ``tmp`` the thumbnails and uploaded originals of the items kept (not the removed)."""
    ids = {it["id"] for it in keep}
    (tmp / THUMBS_DIR).mkdir()
    for p in (old.root / THUMBS_DIR).glob("*.jpg") if (old.root / THUMBS_DIR).is_dir() else []:
        if p.stem in ids:
            _link(p, tmp / THUMBS_DIR / p.name)
    uploads = old.root / UPLOADS_DIR
    if uploads.is_dir():
        (tmp / UPLOADS_DIR).mkdir()
        here = Path(absolute_path(str(uploads)))
        kept = {Path(it["path"]).name for it in keep if Path(it["path"]).parent == here}
        for p in uploads.iterdir():
            if p.name in kept:
                _link(p, tmp / UPLOADS_DIR / p.name)


def carry_others(old: ImageIndex, tmp: Path, skip: Iterable[str] = ()) -> None:
    """Hard-link every file of the index an edit does not rewrite (an adapted index's projection and query
    model on a removal); ``skip``: files the edit writes itself (never link then overwrite: the old index
    shares the inode)."""
    for p in old.root.iterdir():
        if p.name not in _REWRITTEN and p.name not in set(skip) and not p.name.startswith("."):
            _link(p, tmp / p.name)


def write_edited(tmp: Path, index: Any, items: list[dict[str, str]], info: dict[str, Any]) -> None:
    """index.faiss, items.csv, then index.json with checksums, through build.py's writer."""
    from uniembed.serve.assemble import Assembled
    from uniembed.serve.build import write_index_folder

    kind = info["index"]["type"]
    built = Assembled(index, items, kind, info["index"].get("params", {}), int(info["dim"]), [])
    write_index_folder(tmp, built, info)


def removed_info(old: ImageIndex, count: int) -> dict[str, Any]:
    """index.json after a removal: same model and parameters, new count, ``next_id`` kept."""
    info = {k: v for k, v in old.info.items()}
    info.update(count=count, next_id=old.next_id, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    info["removed_total"] = int(old.info.get("removed_total", 0)) + len(old) - count
    return info
