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
