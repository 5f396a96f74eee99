"""The service's duplicate view: ``GET /duplicates`` (near-duplicate groups of the loaded index as JSON) and
``GET /duplicates/view`` (the page, static/duplicates.html + duplicates.js).

Groups come from the index's stored vectors (``dedup.near_groups``), never from reading image files, so
exact byte duplicates show up as groups at distance 0 (``identical``) rather than by hash: hashing the whole
collection is ``uniembed dedup``'s job. The index is read from ``request.app.state.index`` on every request,
because edits may swap it; results are cached per threshold for that very index object only.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from uniembed.serve.dedup import DEFAULT_THRESHOLD, index_vectors, near_groups
from uniembed.serve.store import ImageIndex

STATIC_DIR = Path(__file__).parent / "static"
#: Groups one response lists at most (largest first); ``group_count`` still counts them all.
MAX_GROUPS = 500
#: Thresholds kept in the cache of one index (a slider sends many).
CACHE_SIZE = 16


class _GroupCache:
    """Group lists of one index object per threshold; a different (swapped) index empties it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._index: ImageIndex | None = None
        self._stamp: tuple[int, int] = (-1, -1)
        self._by_threshold: dict[float, list[dict[str, Any]]] = {}

    def get(self, index: ImageIndex, threshold: float) -> tuple[list[dict[str, Any]], bool]:
        stamp = (len(index), index.next_id)  # an in-place edit changes one of them
        with self._lock:
            if index is not self._index or stamp != self._stamp:
                self._index, self._stamp, self._by_threshold = index, stamp, {}
            hit = self._by_threshold.get(threshold)
        if hit is not None:
            return hit, True
        groups = compute_groups(index, threshold)
        with self._lock:
            if index is self._index:
                if len(self._by_threshold) >= CACHE_SIZE:
                    self._by_threshold.pop(next(iter(self._by_threshold)))
                self._by_threshold[threshold] = groups
        return groups, False


def compute_groups(index: ImageIndex, threshold: float) -> list[dict[str, Any]]:
    """Near-duplicate groups of an index as the API returns them (ids, labels, thumbnails, distances)."""
    out = []
    for n, g in enumerate(near_groups(index_vectors(index.reconstructable_index()), threshold), start=1):
        items = []
        for pos in g.members:
            it = index.items[pos]
            items.append(
                {
                    "id": int(it["id"]),
                    "path": it["path"],
                    "label": it["label"],
                    "domain": it["domain"],
                    "thumbnail": f"/thumb/{it['id']}",
                }
            )
        out.append(
            {
                "group": n,
                "size": len(items),
                "max_distance": round(g.max_distance, 6),
                "mean_distance": round(g.mean_distance, 6),
                "identical": g.max_distance == 0.0,
                "items": items,
            }
        )
    return out


def parse_threshold(raw: str | None) -> float:
    """``?threshold=`` (default: the calibrated one); 422 unless a number in [0, 2]."""
    if raw is None or not raw.strip():
        return DEFAULT_THRESHOLD
    try:
        t = float(raw.strip())
    except ValueError:
        t = float("nan")
    if not 0.0 <= t <= 2.0:
        raise HTTPException(422, f"threshold must be a number in [0, 2], got {raw[:40]!r}")
    return round(t, 4)


def add_duplicate_routes(app: FastAPI) -> None:
    """Register GET /duplicates and GET /duplicates/view on a service app (its index in app.state.index)."""
    cache = _GroupCache()

    @app.get("/duplicates")
    async def duplicates(request: Request) -> dict[str, Any]:
        """Near-duplicate groups of the loaded index at ``threshold`` (Euclidean distance between unit
        vectors, 0..2), largest first, at most ``limit`` groups (default and cap MAX_GROUPS)."""
        t0 = time.perf_counter()
        index: ImageIndex = request.app.state.index
        threshold = parse_threshold(request.query_params.get("threshold"))
        raw_limit = request.query_params.get("limit", str(MAX_GROUPS)).strip()
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_GROUPS:
            raise HTTPException(422, f"limit must be a number in 1..{MAX_GROUPS}, got {raw_limit[:40]!r}")
        groups, cached = await run_in_threadpool(cache.get, index, threshold)
        return {
            "threshold": threshold,
            "default_threshold": DEFAULT_THRESHOLD,
            "total": len(index),
            "group_count": len(groups),
            "files_in_groups": sum(g["size"] for g in groups),
            "would_delete": sum(g["size"] - 1 for g in groups),
            "groups": groups[: int(raw_limit)],
            "cached": cached,
            "took_ms": round((time.perf_counter() - t0) * 1000, 2),
        }

    @app.get("/duplicates/view", include_in_schema=False)
    def duplicates_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "duplicates.html")
