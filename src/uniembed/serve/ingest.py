"""Turn a stream of image records into index rows: decode (worker threads), thumbnail and embed in chunks.

Unreadable images, duplicate paths and non-finite embeddings become skip entries ``{path, reason, detail}``
(recorded in index.json) instead of stopping the build.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.export.embedder import Embedder
from uniembed.serve.items import ImageRecord


def _thumbnail_jpeg(im: Any, size: int) -> bytes:
    t = im.copy()
    t.thumbnail((size, size))
    buf = io.BytesIO()
    t.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def decode_record(rec: ImageRecord, thumb_size: int, prepare: Any) -> tuple[Any, bytes] | dict[str, str]:
    """(model-ready image from ``prepare``, thumbnail JPEG), or a skip entry {path, reason, detail}.

    Runs in worker threads: decoding, the thumbnail and the model's own resize all release the GIL."""
    from uniembed.data.images import BadImageError, load_image

    if rec.file is None and rec.data is None:
        return {"path": rec.path, "reason": "empty path", "detail": ""}
    try:
        im = load_image(rec.data if rec.data is not None else rec.file)
    except BadImageError as e:
        return {"path": rec.path, "reason": e.reason, "detail": e.detail}
    return prepare(im), _thumbnail_jpeg(im, thumb_size)


class _Collector:
    """Accumulates the new rows of one build: items with consecutive ids, their vectors, skip entries."""

    def __init__(self, embedder: Embedder, start_id: int, thumbs: Path, batch_size: int, thumb_size: int):
        self.embedder = embedder
        self.start_id = start_id
        self.thumbs = thumbs
        self.batch_size = batch_size
        self.thumb_size = thumb_size
        self.items: list[dict[str, str]] = []
        self.vectors: list[np.ndarray] = []
        self.skipped: list[dict[str, str]] = []

    def flush(self, chunk: list[ImageRecord], pool: ThreadPoolExecutor) -> None:
        """Decode a chunk in the pool, embed what decoded, store thumbnails and rows for finite vectors."""
        decoded = list(pool.map(lambda r: decode_record(r, self.thumb_size, self.embedder.prepare), chunk))
        ok = [(r, d) for r, d in zip(chunk, decoded, strict=True) if isinstance(d, tuple)]
        self.skipped.extend(d for d in decoded if isinstance(d, dict))
        if not ok:
            return
        emb = self.embedder.embed_prepared([d[0] for _, d in ok], batch_size=self.batch_size)
        finite = np.isfinite(emb).all(axis=1)
        for (r, d), vec, good in zip(ok, emb, finite, strict=True):
            if not good:
                self.skipped.append({"path": r.path, "reason": "non-finite embedding", "detail": ""})
                continue
            item_id = self.start_id + len(self.items)
            (self.thumbs / f"{item_id}.jpg").write_bytes(d[1])
            self.items.append(
                {"id": str(item_id), "path": r.path, "label": r.label, "domain": r.domain, "source": r.source}
            )
            self.vectors.append(vec)

    def stacked(self) -> np.ndarray:
        """The new vectors as one float32 [n, D] array (``[0, D]`` when nothing was indexed)."""
        if self.vectors:
            return np.stack(self.vectors).astype(np.float32)
        return np.zeros((0, self.embedder.dim), np.float32)


def embed_records(
    embedder: Embedder,
    records: Iterator[ImageRecord],
    total: int,
    limit: int | None,
    known: set[str],
    start_id: int,
    thumbs: Path,
    batch_size: int,
    thumb_size: int,
    workers: int | None,
    progress: bool,
) -> tuple[list[dict[str, str]], np.ndarray, list[dict[str, str]], int]:
    """Decode (worker threads), thumbnail and embed a record stream: (new items, their vectors [n, D],
    skipped entries, records seen). Paths in ``known`` or repeated are skipped; ids start at ``start_id``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out = _Collector(embedder, start_id, thumbs, batch_size, thumb_size)
    seen_now: set[str] = set()
    chunk_size = max(1, batch_size) * 4
    n_workers = workers or min(8, (os.cpu_count() or 2) * 2)
    cols = [TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    seen = 0
    with (
        Progress(*cols, disable=not progress, transient=False) as bar,
        ThreadPoolExecutor(n_workers) as pool,
    ):
        task = bar.add_task("embed", total=total)
        chunk: list[ImageRecord] = []
        for rec in records:
            if limit is not None and seen >= limit:
                break
            seen += 1
            if rec.path in known or rec.path in seen_now:
                why = "already indexed" if rec.path in known else "duplicate path"
                out.skipped.append({"path": rec.path, "reason": why, "detail": ""})
                bar.advance(task)
                continue
            seen_now.add(rec.path)
            chunk.append(rec)
            if len(chunk) >= chunk_size:
                out.flush(chunk, pool)
                bar.advance(task, len(chunk))
                chunk = []
        if chunk:
            out.flush(chunk, pool)
            bar.advance(task, len(chunk))
    return out.items, out.stacked(), out.skipped, seen


# ------------------------------------------------------------------------------------ on a Ray cluster


class RayEmbedderFactory:
    """Picklable recipe for the build's ``Embedder``, run inside each Ray actor: the model file
    (``load_embedder``) or, for an adapted index, the frozen feature model of the plan's backbone."""

    def __init__(self, model_file: Path | None, backbone: Any, batch_size: int, engine: str, threads: int):
        self.model_file, self.backbone = model_file, backbone
        self.batch_size, self.engine, self.threads = batch_size, engine, threads

    def __call__(self) -> Any:
        if self.model_file is not None:
            from uniembed.export.embedder import load_embedder

            embedder = load_embedder(
                self.model_file, batch_size=self.batch_size, engine=self.engine, threads=self.threads
            )
        else:
            from uniembed.serve.adapt import feature_embedder

            embedder = feature_embedder(
                self.backbone, self.batch_size, engine=self.engine, threads=self.threads
            )
        return _ChunkEmbedder(embedder, self.batch_size)


def ray_embedding(
    model_file: Path | None, backbone: Any, ray: dict[str, Any] | None, batch_size: int, engine: str
) -> tuple[Any, RayEmbedderFactory] | None:
    """(cluster options, the picklable recipe of the build's embedder) for ``index --ray``; None without."""
    if ray is None:
        return None
    from uniembed.features.ray_extract import ExtractError, RayOptions
    from uniembed.serve.errors import ImageIndexError

    opts = RayOptions(**ray)
    try:
        opts.check()
    except ExtractError as e:
        raise ImageIndexError(str(e)) from e
    threads = max(1, int(opts.cpus_per_actor))
    return opts, RayEmbedderFactory(model_file, backbone, batch_size, engine, threads)


class _ChunkEmbedder:
    """Actor side: a decoded chunk -> its vectors, batched exactly as ``_Collector.flush`` batches them."""

    def __init__(self, embedder: Embedder, batch_size: int):
        self.embedder, self.batch_size = embedder, batch_size

    def __call__(self, item: dict) -> dict:
        import torch

        resize = self.embedder.resize
        images = [torch.from_numpy(a) for a in item.pop("images")]
        if resize is not None:  # == Embedder.prepare on the decoded image
            with torch.inference_mode():
                images = [resize(t.unsqueeze(0))[0] for t in images]
        dim = self.embedder.dim
        vecs = self.embedder.embed_prepared(images, self.batch_size) if images else np.zeros((0, dim))
        item["vectors"] = np.asarray(vecs, np.float32)
        return item


def _decode_chunk(row: tuple[int, list[ImageRecord], int]) -> Iterator[dict]:
    """Task side: a chunk of records -> uint8 [3,H,W] arrays and thumbnails of the decodable ones, skip
    entries for the rest (``decode_record`` without the model's resize, which the actor applies)."""
    from uniembed.export.embedding import to_uint8_chw

    chunk, records, thumb_size = row
    images, thumbs, kept, skipped = [], [], [], []
    for pos, rec in enumerate(records):
        got = decode_record(rec, thumb_size, lambda im: to_uint8_chw(im).numpy())
        if isinstance(got, dict):
            skipped.append(got)
        else:
            images.append(got[0])
            thumbs.append(got[1])
            kept.append(pos)
    yield {"chunk": chunk, "images": images, "thumbs": thumbs, "kept": kept, "skipped": skipped}


def embed_records_ray(
    embedder: Embedder,
    records: Iterator[ImageRecord],
    total: int,
    limit: int | None,
    known: set[str],
    start_id: int,
    thumbs: Path,
    batch_size: int,
    thumb_size: int,
    workers: int | None,
    progress: bool,
    *,
    ray: tuple[Any, RayEmbedderFactory],
) -> tuple[list[dict[str, str]], np.ndarray, list[dict[str, str]], int]:
    """:func:`embed_records` on a Ray cluster: ``ray`` = (``features.ray_extract.RayOptions``, the recipe of
    ``embedder``). Chunks of records are decoded in Ray tasks and embedded by an actor pool, each actor
    building its own copy of the embedder; items, vectors, thumbnails and skip entries come out in the same
    order, with the same ids, as the local path's. ``workers`` is unused (Ray sizes the decoding)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from uniembed.features.ray_extract import map_on_ray

    opts, factory = ray
    chunks, dups, seen = _plan_chunks(records, limit, known, max(1, batch_size) * 4)
    results: dict[int, dict] = {}
    cols = [TextColumn("[bold]indexing (ray)"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*cols, disable=not progress, transient=False) as bar:
        task = bar.add_task("embed", total=total)
        bar.advance(task, sum(len(d) for d in dups))
        rows = [(k, recs, thumb_size) for k, recs in enumerate(chunks)]
        for item in map_on_ray(rows, _decode_chunk, factory, opts) if rows else ():
            results[item["chunk"]] = item
            bar.advance(task, len(chunks[item["chunk"]]))
    out = _Collector(embedder, start_id, thumbs, batch_size, thumb_size)
    for k, recs in enumerate(chunks):
        out.skipped.extend(dups[k])
        _take_chunk(out, recs, results[k])
    out.skipped.extend(dups[len(chunks)])
    return out.items, out.stacked(), out.skipped, seen


def _plan_chunks(
    records: Iterator[ImageRecord], limit: int | None, known: set[str], size: int
) -> tuple[list[list[ImageRecord]], list[list[dict[str, str]]], int]:
    """The chunks ``embed_records`` would flush, and the duplicate skips logged before each flush (one
    list more: those after the last)."""
    chunks: list[list[ImageRecord]] = []
    dups: list[list[dict[str, str]]] = [[]]
    chunk: list[ImageRecord] = []
    seen_now: set[str] = set()
    seen = 0
    for rec in records:
        if limit is not None and seen >= limit:
            break
        seen += 1
        if rec.path in known or rec.path in seen_now:
            why = "already indexed" if rec.path in known else "duplicate path"
            dups[-1].append({"path": rec.path, "reason": why, "detail": ""})
            continue
        seen_now.add(rec.path)
        chunk.append(rec)
        if len(chunk) >= size:
            chunks.append(chunk)
            dups.append([])
            chunk = []
    if chunk:
        chunks.append(chunk)
        dups.append([])
    return chunks, dups, seen


def _take_chunk(out: _Collector, recs: list[ImageRecord], res: dict) -> None:
    """One chunk's results into the collector, as ``_Collector.flush`` would have stored them."""
    out.skipped.extend(res["skipped"])
    finite = np.isfinite(res["vectors"]).all(axis=1) if len(res["vectors"]) else []
    for pos, thumb, vec, good in zip(res["kept"], res["thumbs"], res["vectors"], finite, strict=True):
        r = recs[pos]
        if not good:
            out.skipped.append({"path": r.path, "reason": "non-finite embedding", "detail": ""})
            continue
        item_id = out.start_id + len(out.items)
        (out.thumbs / f"{item_id}.jpg").write_bytes(thumb)
        out.items.append(
            {"id": str(item_id), "path": r.path, "label": r.label, "domain": r.domain, "source": r.source}
        )
        out.vectors.append(vec)
