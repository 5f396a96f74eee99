"""Build an image index directory, or extend one (``--add``), from ``--images`` sources.

The directory is written atomically: everything goes into a temp dir beside it, which replaces the old one
in a rename only once complete, so a failed build leaves the previous index untouched. A collection-adapted
index (``--adapt``) also holds ``features.npy``, ``projection.npz`` and ``query_model.pt`` (see adapt.py).
index.json, written last, records the size and sha256 of every other file but the thumbnails
("checksums"), which ``ImageIndex.load`` verifies.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.fsutil import building_dir
from uniembed.core.integrity import CHECKSUMS_KEY, checksums
from uniembed.core.runtime import torch_threads
from uniembed.export.embedder import Embedder, file_fingerprint, load_embedder, resolve_model_path
from uniembed.serve.adapt_plan import AdaptPlan
from uniembed.serve.assemble import Assembled, NewRows, assemble
from uniembed.serve.edit_rows import UPLOADS_DIR
from uniembed.serve.errors import ImageIndexError
from uniembed.serve.faiss_index import INDEX_TYPES, SHARDED_TYPE
from uniembed.serve.ingest import embed_records, embed_records_ray, ray_embedding
from uniembed.serve.items import META_FIELD, ImageRecord, absolute_path, meta_cell, open_sources, write_items
from uniembed.serve.store import INDEX_FILE, INFO_FILE, ITEMS_FILE, THUMBS_DIR, ImageIndex


@dataclass
class BuildResult:
    """What ``build_index`` did, for the CLI summary and tests."""

    out_dir: Path
    count: int
    added: int
    skipped: list[dict[str, str]]
    index_type: str
    params: dict[str, int]
    fingerprint: str
    seconds: float
    skipped_counts: dict[str, int] = field(default_factory=dict)
    embedder: dict[str, Any] = field(default_factory=dict)  # engine, batching, threads (as in index.json)
    adapt: dict[str, Any] | None = None  # the projection of a collection-adapted index (index.json "adapt")
    recall: dict[str, Any] | None = None  # sharded index: recall@5 against exact search (index.json)


@dataclass
class Embedding:
    """How the images get embedded: a fixed model file, or an adapted plan (backbone + projection)."""

    plan: AdaptPlan | None
    model_file: Path | None
    fingerprint: str  # of the model file; an adapted build learns its own once the query model is written


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link old thumbnails into the new index (instant, no extra space); copy if links are refused."""
    dst.mkdir(parents=True, exist_ok=True)
    if not src.is_dir():
        return
    for p in src.iterdir():
        try:
            os.link(p, dst / p.name)
        except OSError:
            shutil.copy2(p, dst / p.name)


def _requested_type(
    index_type: str, params: dict[str, int] | None, shards: int | None
) -> tuple[str, dict[str, int] | None]:
    """The index type and parameters asked for; ``--shards N`` means a sharded index filled in N shards."""
    if shards is not None:
        index_type = SHARDED_TYPE if index_type == "auto" else index_type
        if index_type != SHARDED_TYPE:
            raise ImageIndexError(f"--shards builds a {SHARDED_TYPE} index, not {index_type!r}")
        params = {**(params or {}), "shards": int(shards)}
    if index_type not in INDEX_TYPES:
        raise ImageIndexError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    return index_type, params


def _existing_index(
    out_dir: Path, add: bool, index_type: str, refit: bool, verify: bool = True
) -> ImageIndex | None:
    """The index ``--add`` extends (None for a fresh build); refuses to overwrite a folder that is not one."""
    old: ImageIndex | None = None
    if add:
        if not (out_dir / INFO_FILE).is_file():
            raise ImageIndexError(f"--add: no index at {out_dir} to add to; build it first without --add")
        old = ImageIndex.load(out_dir, verify=verify)
        if index_type not in ("auto", old.info["index"]["type"]):
            raise ImageIndexError(
                f"--add keeps the existing index type {old.info['index']['type']!r}; "
                f"rebuild without --add to switch to {index_type!r}"
            )
    elif out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / INFO_FILE).is_file():
        raise ImageIndexError(f"{out_dir} exists and is not an index directory; refusing to overwrite it")
    if refit and not add:
        raise ImageIndexError("--refit refits an existing adapted index: use it with --add")
    return old


def _choose_embedding(
    old: ImageIndex | None,
    model_path: str | Path | None,
    adapt: str | None,
    backbone: Any,
    pooling: str | None,
    refit: bool,
) -> Embedding:
    """Check the model options against each other and the old index before anything is embedded."""
    from uniembed.serve import adapt as ad

    try:
        if adapt is not None or (old is not None and old.adapted):
            return Embedding(AdaptPlan.make(old, model_path, adapt, backbone, pooling, refit), None, "")
        if refit:
            raise ImageIndexError("--refit only applies to an index built with --adapt")
        if backbone is not None:
            raise ImageIndexError("--backbone is only used with --adapt (a collection-adapted index)")
        if model_path is None:
            raise ImageIndexError(
                "give --model (a GUIE saved_model.pt), or --adapt SPEC --backbone NAME to fit a "
                "collection-adapted projection"
            )
        model_file = resolve_model_path(model_path)
        fingerprint = file_fingerprint(model_file)
        if old is not None:
            old.check_model(fingerprint)
    except ad.AdaptError as e:
        raise ImageIndexError(str(e)) from e
    return Embedding(None, model_file, fingerprint)


def _load_embedder(how: Embedding, batch_size: int, engine: str, threads: int) -> Embedder:
    """The feature model of an adapted build, or the fixed model file."""
    if how.plan is not None:
        from uniembed.serve import adapt as ad

        return ad.feature_embedder(how.plan.backbone, batch_size, engine=engine, threads=threads)
    assert how.model_file is not None
    return load_embedder(how.model_file, batch_size=batch_size, engine=engine, threads=threads)


def embed_new_images(
    embedder: Embedder,
    records: Iterator[ImageRecord],
    total: int,
    old: ImageIndex | None,
    tmp: Path,
    limit: int | None,
    batch_size: int,
    thumb_size: int,
    workers: int | None,
    progress: bool,
    ray: tuple[Any, Any] | None = None,
) -> tuple[list[dict[str, str]], np.ndarray, list[dict[str, str]]]:
    """(new items, their vectors, skip entries) for the records not yet indexed, with thumbnails in
    ``tmp``; the old index's thumbnails are carried over first. Fails if a fresh build indexed nothing.
    ``ray``: (cluster options, embedder recipe) to embed on a Ray cluster instead of here."""
    thumbs = tmp / THUMBS_DIR
    if old is not None:
        _link_or_copy_tree(old.root / THUMBS_DIR, thumbs)
        if (old.root / UPLOADS_DIR).is_dir():  # originals of images added with POST /items (edits.py)
            _link_or_copy_tree(old.root / UPLOADS_DIR, tmp / UPLOADS_DIR)
    thumbs.mkdir(exist_ok=True)
    known = {it["path"] for it in old.items} if old else set()
    start_id = old.next_id if old else 0
    metas: dict[str, str] = {}

    def noting_meta(recs: Iterator[ImageRecord]) -> Iterator[ImageRecord]:
        for r in recs:  # the extra labels.csv columns travel to items.csv beside the row ingest makes
            if r.meta:
                metas[r.path] = meta_cell(r.meta)
            yield r

    embed = embed_records if ray is None else functools.partial(embed_records_ray, ray=ray)
    new_items, new, skipped, seen = embed(
        embedder,
        noting_meta(records),
        total,
        limit,
        known,
        start_id,
        thumbs,
        batch_size,
        thumb_size,
        workers,
        progress,
    )
    for it in new_items:
        if it["path"] in metas:
            it[META_FIELD] = metas[it["path"]]
    if not new_items and old is None:
        counts = dict(Counter(s["reason"] for s in skipped))
        raise ImageIndexError(f"no image could be indexed ({seen} seen; skipped: {counts or 'none'})")
    return new_items, new, skipped


def finish_rows(
    how: Embedding,
    items: list[dict[str, str]],
    new: np.ndarray,
    tmp: Path,
    out_dir: Path,
    old: ImageIndex | None,
    threads: int,
) -> NewRows:
    """Index vectors for the new rows; an adapted build fits (or keeps) its projection and query model."""
    if how.plan is None:
        assert how.model_file is not None
        record = {"fingerprint": how.fingerprint, "path": str(how.model_file.resolve())}
        return NewRows(items, new, None, record, how.fingerprint, None)
    from uniembed.serve import adapt as ad

    try:
        vectors, rebuild, fingerprint, adapt_info = how.plan.finish(tmp, old, new, threads)
    except ad.AdaptError as e:
        raise ImageIndexError(str(e)) from e
    record = {"fingerprint": fingerprint, "path": str((out_dir / ad.QUERY_MODEL).resolve()), "adapted": True}
    return NewRows(items, vectors, rebuild, record, fingerprint, adapt_info)


def index_info(
    built: Assembled,
    rows: NewRows,
    skipped: list[dict[str, str]],
    old: ImageIndex | None,
    index_type: str,
    embedder: dict[str, Any],
    thumb_size: int,
    images: Sequence[str | Path],
) -> dict[str, Any]:
    """The contents of index.json."""
    all_skipped = built.prev_skipped + skipped
    info = {
        "version": 1,
        "model": rows.model_record,
        "embedder": embedder,
        "index": {
            "type": built.kind,
            "params": built.params,
            "metric": "l2",
            "requested": old.info["index"].get("requested", "auto") if old else index_type,
            **({"recall": built.recall} if built.recall else {}),
        },
        "count": len(built.items),
        "next_id": max([old.next_id if old else 0, *(int(it["id"]) + 1 for it in built.items)]),
        "dim": built.dim,
        "thumb_size": thumb_size,
        "sources": sorted(
            {*(old.info.get("sources", []) if old else []), *(absolute_path(str(p)) for p in images)}
        ),
        "skipped": all_skipped,
        "skipped_counts": dict(Counter(s["reason"] for s in all_skipped)),
        "created": old.info.get("created") if old else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if rows.adapt_info is not None:
        info["adapt"] = rows.adapt_info
    return info


def write_index_folder(tmp: Path, built: Assembled, info: dict[str, Any]) -> None:
    """index.faiss, items.csv, then index.json with the checksums of every file but itself and the thumbs."""
    import faiss

    faiss.write_index(built.index, str(tmp / INDEX_FILE))
    write_items(tmp / ITEMS_FILE, built.items)
    covered = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != INFO_FILE)
    info = {**info, CHECKSUMS_KEY: checksums(tmp, covered)}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))


def build_index(
    model_path: str | Path | None,
    images: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    index_type: str = "auto",
    add: bool = False,
    batch_size: int = 32,
    params: dict[str, int] | None = None,
    limit: int | None = None,
    domain: str = "",
    thumb_size: int = 160,
    workers: int | None = None,
    progress: bool = True,
    engine: str = "auto",
    threads: int | None = None,
    adapt: str | None = None,
    backbone: Any = None,
    pooling: str | None = None,
    refit: bool = False,
    verify: bool = True,
    ray: dict[str, Any] | None = None,
    shards: int | None = None,
) -> BuildResult:
    """Embed ``images`` with the model and write (or with ``add`` extend) a FAISS index at ``out_dir``.

    Unreadable images are skipped and recorded with their reason. With ``add`` the existing vectors are kept
    as they are (no re-embedding); the model must be the same file (fingerprint) the index was built with,
    and paths already in the index are skipped as duplicates. ``engine``/``threads``: see
    ``uniembed.export.embedder.load_embedder`` (``threads`` None: the cores not already busy).

    Collection-adapted mode (``uniembed.serve.adapt``): ``adapt`` (``pca64``, ``pcaw64``, ``pcaw256@1``...)
    with ``backbone`` (a name for ``create_backbone(name, pooling=pooling)``, or a ``Backbone``) and no
    ``model_path``: the images are embedded by the frozen backbone, a projection is fitted on those features
    and a query model is written into the index. ``add`` on an adapted index keeps its projection (no model
    needed; ``backbone`` defaults to the stored one); ``add`` + ``refit`` refits on all stored features (with
    ``adapt``: to that spec) and rewrites every vector and the query model.

    Image paths are stored absolute (see ``uniembed.serve.items``); ``verify`` False skips the checksum check
    of the index ``add`` extends. ``ray`` (``features.ray_extract.RayOptions`` fields): embed the images on
    a Ray cluster, each actor running the same model; the index is then built here as usual.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    index_type, params = _requested_type(index_type, params, shards)
    if isinstance(images, (str, Path)):  # one source given bare
        images = [images]
    old = _existing_index(out_dir, add, index_type, refit, verify)
    how = _choose_embedding(old, model_path, adapt, backbone, pooling, refit)
    records, total = open_sources(images, domain=domain)
    if limit is not None:
        total = min(total, limit)
    with torch_threads(threads) as n_threads, building_dir(out_dir) as tmp:
        embedder = _load_embedder(how, batch_size, engine, n_threads)
        backbone_obj = how.plan.backbone if how.plan else None
        on_ray = ray_embedding(how.model_file, backbone_obj, ray, batch_size, engine)
        new_items, new, skipped = embed_new_images(
            embedder, records, total, old, tmp, limit, batch_size, thumb_size, workers, progress, on_ray
        )
        rows = finish_rows(how, new_items, new, tmp, out_dir, old, n_threads)
        address = ray.get("address") if ray is not None else None
        built = assemble(old, rows, index_type, params, tmp, address, progress)
        described = {**embedder.describe(), "threads": n_threads}
        info = index_info(built, rows, skipped, old, index_type, described, thumb_size, images)
        write_index_folder(tmp, built, info)
    return BuildResult(
        out_dir=out_dir,
        count=len(built.items),
        added=len(new_items),
        skipped=skipped,
        index_type=built.kind,
        params=built.params,
        fingerprint=rows.fingerprint,
        seconds=time.perf_counter() - t0,
        skipped_counts=dict(Counter(s["reason"] for s in skipped)),
        embedder=info["embedder"],
        adapt=rows.adapt_info,
        recall=built.recall,
    )
