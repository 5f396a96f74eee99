"""The image-search HTTP service: FastAPI over a loaded index and the GUIE model.

Endpoints: ``POST /search`` and ``POST /embed`` (multipart field ``image``, or a raw ``image/*`` body),
``GET /search?id=N`` ("more like this": the stored vector of item N), ``GET /facets`` (filter choices),
``GET /health``, ``GET /thumb/{id}`` (indexed ids only: no path ever reaches the file system from a
request), ``GET /`` (an offline web page from ``static/``). Searches take ``k``, ``max_distance`` and
repeatable ``filter`` (``domain=toys``, ``label^=coil100:``, ``colour!=red``: see ``serve/filters.py``) as
form fields or query parameters. Routes read the index from ``app.state.index`` on every request, so
swapping in a new ``ImageIndex`` there changes what the next request searches. Every bad input gets a 4xx JSON
``{"detail": ...}``; nothing a client sends can take the process down. Statuses: 413 for bytes over
``--max-upload-mb``, 422 for pixels over ``--max-pixels`` (or an image that cannot be decoded), 503 with
``Retry-After`` when every decode/embed slot is taken and the queue is full (``serve/admission.py``).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from uniembed.export.embedder import Embedder
from uniembed.serve.admission import Admission, ServerBusy, decode_side
from uniembed.serve.body_limit import MULTIPART_SLACK, BodySizeLimit
from uniembed.serve.dedup_routes import add_duplicate_routes
from uniembed.serve.edit_routes import add_edit_routes
from uniembed.serve.filters import Filter, FilterError, parse_filters
from uniembed.serve.index import ImageIndex, open_index_and_model
from uniembed.serve.limits import (
    DEFAULT_K,
    DEFAULT_MAX_UPLOAD_MB,
    MAX_K,
    ServiceLimits,
    k_error,
)
from uniembed.serve.uploads import (  # noqa: F401  (re-exported: the service's upload API)
    ALLOWED_TYPES,
    NEUTRAL_TYPES,
    decode_upload,
    embed_bytes,
    read_upload,
    sniff_image_type,
)

STATIC_DIR = Path(__file__).parent / "static"


def _install_error_handlers(app: FastAPI) -> None:
    """Invalid requests answer 422 with one readable line; any other exception answers 500, not a crash."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse({"detail": f"invalid request: {msgs}"}, status_code=422)

    @app.exception_handler(ServerBusy)
    async def _busy(request: Request, exc: ServerBusy) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail}, status_code=503, headers={"Retry-After": str(exc.retry_after)}
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Last line of defence: a bug must become one failed request, not a dead server.
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


def parse_k(raw: Any, limits: ServiceLimits) -> int:
    """The requested number of results (form field or query parameter), else the default; 422 if invalid."""
    if raw is None or raw == "":
        return limits.default_k
    try:
        k = int(str(raw).strip())
    except ValueError:
        raise HTTPException(422, f"k must be an integer, got {str(raw)[:40]!r}") from None
    error = k_error(k, limits.max_k)
    if error:
        raise HTTPException(422, error)
    return k


def parse_expand(raw: Any) -> bool:
    """``expand``: query expansion as the index sets it (default, true/1) or off (false/0); 422 otherwise."""
    text = "" if raw is None else str(raw).strip().lower()
    if text in ("", "true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise HTTPException(422, f"expand must be true or false, got {text[:20]!r}")


def parse_max_distance(raw: Any) -> float | None:
    """The distance cut-off of a search (None: no cut-off); 422 unless a number in [0, 2]."""
    if raw is None or str(raw).strip() == "":
        return None
    try:
        d = float(str(raw).strip())
    except ValueError:
        d = math.nan
    if not 0.0 <= d <= 2.0:  # NaN fails too
        raise HTTPException(422, f"max_distance must be a number in [0, 2], got {str(raw)[:40]!r}")
    return d


def request_filters(index: ImageIndex, texts: list[str]) -> list[Filter]:
    """The request's ``filter`` values parsed and checked against the index's columns; 422 with the known
    columns for an unknown one."""
    try:
        filters = parse_filters(texts)
        index.columns.check(filters)
    except FilterError as e:
        raise HTTPException(422, str(e)) from e
    return filters


def search_answer(
    index: ImageIndex,
    vec: Any,
    k: int,
    max_distance: float | None,
    filters: list[Filter],
    exclude: list[int],
    expand: bool = True,
) -> dict[str, Any]:
    """Results plus ``matched`` (items passing the filters) out of ``total``, for "5 of 312 matching"."""
    hits = index.search_batch(vec, k, max_distance, filters, exclude, expand)[0]
    return {
        "results": [{**h.to_dict(), "thumbnail": f"/thumb/{h.id}"} for h in hits],
        "k": k,
        "matched": index.matching(filters, exclude),
        "total": len(index),
        "max_distance": max_distance,
        "filters": [str(f) for f in filters],
    }


def thumbnail_response(index: ImageIndex, item_id: str) -> Response:
    """Thumbnail of an indexed id: the stored one, else one rendered from the indexed file (its path comes
    from items.csv, never from the request)."""
    from uniembed.data.images import BadImageError, load_image

    if not item_id.isdigit() or len(item_id) > 12:
        raise HTTPException(404, "no such item")
    i = int(item_id)
    p = index.thumbnail_path(i)
    if p is not None:
        return FileResponse(p, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
    item = index.item(i)
    if item is None:
        raise HTTPException(404, "no such item")
    # Index built without thumbnails: render one from the indexed file (path from items.csv, not the URL).
    try:
        im = load_image(item["path"])
    except BadImageError as e:
        raise HTTPException(404, f"thumbnail unavailable: {e.reason}") from e
    im.thumbnail((int(index.info.get("thumb_size", 160)),) * 2)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return Response(buf.getvalue(), media_type="image/jpeg")


def _item_id(raw: str | None, index: ImageIndex) -> int:
    """The ``id`` of a "more like this" request: 422 if not a number, 404 if no such item is indexed."""
    if raw is None or not raw.strip().isdigit() or len(raw.strip()) > 12:
        raise HTTPException(422, f"id must be an item id (a number), got {str(raw)[:40]!r}")
    if index.position(int(raw)) is None:
        raise HTTPException(404, f"no item with id {int(raw)}")
    return int(raw)


def _add_search_routes(app: FastAPI, embed_admitted: Callable[[bytes], Any], limits: ServiceLimits) -> None:
    """POST /search (an uploaded image), GET /search?id=N (more like this) and GET /facets."""

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        """Top-k indexed images nearest to the uploaded one (nearest first), within ``max_distance`` and
        passing every ``filter``."""
        t0 = time.perf_counter()
        index: ImageIndex = request.app.state.index
        data, fields = await read_upload(request, limits)
        q = request.query_params
        k = parse_k(fields.get("k", q.get("k")), limits)
        max_distance = parse_max_distance(fields.get("max_distance", q.get("max_distance")))
        filters = request_filters(index, [*fields.get("filter", []), *q.getlist("filter")])
        vec = await embed_admitted(data)
        expand = parse_expand(fields.get("expand", q.get("expand")))
        answer = await run_in_threadpool(search_answer, index, vec, k, max_distance, filters, [], expand)
        return {**answer, "took_ms": round((time.perf_counter() - t0) * 1000, 2)}

    @app.get("/search")
    async def more_like_this(request: Request) -> dict[str, Any]:
        """More like this: the items nearest to indexed item ``id`` (itself left out); same ``k``,
        ``max_distance`` and ``filter`` parameters as POST /search."""
        t0 = time.perf_counter()
        index: ImageIndex = request.app.state.index
        q = request.query_params
        item_id = _item_id(q.get("id"), index)
        k = parse_k(q.get("k"), limits)
        max_distance = parse_max_distance(q.get("max_distance"))
        filters = request_filters(index, q.getlist("filter"))
        vec = await run_in_threadpool(index.vector, item_id)
        expand = parse_expand(q.get("expand"))
        answer = await run_in_threadpool(
            search_answer, index, vec, k, max_distance, filters, [item_id], expand
        )
        return {**answer, "id": item_id, "took_ms": round((time.perf_counter() - t0) * 1000, 2)}

    @app.get("/facets")
    def facet_values(request: Request) -> dict[str, Any]:
        """Filter choices for the page: domains, label prefixes and metadata columns with their values."""
        index: ImageIndex = request.app.state.index
        return {"total": len(index), **index.columns.facets()}


def _add_routes(app: FastAPI, embedder: Embedder, limits: ServiceLimits) -> None:
    """/, /search, /facets, /health, /embed and /thumb/{id}. Each request reads the index from
    ``app.state.index`` once and uses that one throughout."""
    gate = Admission(limits.slots, limits.queue, limits.queue_wait_s)
    app.state.admission = gate

    async def embed_admitted(data: bytes) -> Any:
        async with gate.slot():
            return await run_in_threadpool(embed_bytes, embedder, data, limits)

    _add_search_routes(app, embed_admitted, limits)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    def health(request: Request) -> dict[str, Any]:
        """Liveness plus what is loaded, so a client can check it talks to the right index and model."""
        index: ImageIndex = request.app.state.index
        return {
            "status": "ok",
            "count": len(index),
            "dim": index.dim,
            "model_fingerprint": embedder.fingerprint,
            "engine": embedder.engine,
            "index_type": index.info["index"]["type"],
            # `index --adapt`: spec, dim, fitted_on, fitted_at, backbone, ...; None for a fixed-model index.
            "projection": index.projection,
            "default_k": limits.default_k,
            "max_k": limits.max_k,
            "max_upload_mb": limits.max_upload_mb,
            "max_megapixels": limits.max_megapixels,
            "max_concurrent": gate.slots,
            "busy": gate.busy,
            "waiting": gate.waiting,
            # POST /items and DELETE /items/{id} accept edits (the page shows its edit controls).
            "edits": bool(getattr(getattr(request.app.state, "edits", None), "token", None)),
        }

    @app.post("/embed")
    async def embed(request: Request) -> dict[str, Any]:
        """The model's embedding of the uploaded image."""
        data, _ = await read_upload(request, limits)
        vec = await embed_admitted(data)
        return {
            "embedding": [float(v) for v in vec[0]],
            "dim": int(vec.shape[1]),
            "model_fingerprint": embedder.fingerprint,
        }

    @app.get("/thumb/{item_id}")
    def thumb(request: Request, item_id: str) -> Response:
        """Thumbnail of an indexed id. The id is the only input: there is no path to traverse."""
        return thumbnail_response(request.app.state.index, item_id)


def create_app(
    index_dir: str | Path | ImageIndex,
    model_path: str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    default_k: int = DEFAULT_K,
    max_k: int = MAX_K,
    embedder: Embedder | None = None,
    warmup: bool = True,
    engine: str = "auto",
    limits: ServiceLimits | None = None,
    verify: bool = True,
    edit_token: str | None = None,
) -> FastAPI:
    """Load the index and the model, check they belong together, and return the ASGI app.

    ``index_dir`` may be an already loaded ``ImageIndex`` (with ``embedder``). ``limits`` (pixels,
    concurrency, queue, ...), when given, replaces ``max_upload_mb``, ``default_k`` and ``max_k``.
    ``verify`` False skips checking the index files against their checksums. ``edit_token``: POST /items
    and DELETE /items/{id} accept edits with it (None: they answer that edits are off).

    Raises ``ModelMismatchError`` when the model's fingerprint is not the one the index was built with: the
    vectors would live in different spaces and every answer would be silently wrong.
    """
    if embedder is None:
        where = index_dir.root if isinstance(index_dir, ImageIndex) else index_dir
        index, embedder = open_index_and_model(where, model_path, engine=engine, verify=verify)
    else:
        index = index_dir if isinstance(index_dir, ImageIndex) else ImageIndex.load(index_dir, verify=verify)
        index.check_embedder(embedder)
    if warmup:
        embedder.warmup()
    limits = limits or ServiceLimits(max_upload_mb=max_upload_mb, default_k=default_k, max_k=max_k)
    if limits.decode_side is None:
        limits = replace(limits, decode_side=decode_side(embedder))

    app = FastAPI(title="uniembed image search", version="1", docs_url="/docs", redoc_url=None)
    app.state.index = index
    app.state.embedder = embedder
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_bytes + MULTIPART_SLACK)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app)
    _add_routes(app, embedder, limits)
    add_edit_routes(app, embedder, limits, edit_token)
    add_duplicate_routes(app)
    return app
