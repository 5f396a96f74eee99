"""The image-search HTTP service: FastAPI over a loaded index and the GUIE model.

Endpoints: ``POST /search`` and ``POST /embed`` (multipart field ``image``, or a raw ``image/*`` body),
``GET /health``, ``GET /thumb/{id}`` (indexed ids only: no path ever reaches the file system from a
request), ``GET /`` (an offline web page from ``static/``). Every bad input gets a 4xx JSON
``{"detail": ...}``; nothing a client sends can take the process down. Statuses: 413 for bytes over
``--max-upload-mb``, 422 for pixels over ``--max-pixels`` (or an image that cannot be decoded), 503 with
``Retry-After`` when every decode/embed slot is taken and the queue is full (``serve/admission.py``).
"""

from __future__ import annotations

import io
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from uniembed.export.embedder import Embedder
from uniembed.serve.admission import Admission, ServerBusy, decode_side, release_memory
from uniembed.serve.body_limit import MULTIPART_SLACK, BodySizeLimit
from uniembed.serve.index import ImageIndex, open_index_and_model
from uniembed.serve.limits import (
    DEFAULT_K,
    DEFAULT_MAX_UPLOAD_MB,
    MAX_K,
    ServiceLimits,
    k_error,
    pixels_message,
)

STATIC_DIR = Path(__file__).parent / "static"

#: Image types the service decodes (sniffed from the bytes; a declared type alone is not trusted).
ALLOWED_TYPES = {
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/webp",
    "image/bmp",
    "image/x-ms-bmp",
    "image/tiff",
}
#: Declared types that say "no opinion" and so fall back to sniffing.
NEUTRAL_TYPES = {"", "application/octet-stream"}
#: File parts a multipart form may carry; more than one ``image`` is refused with a message (up to this many).
MAX_FORM_FILES = 8
NO_IMAGE = (
    "no image: send the file as multipart/form-data field 'image' "
    "(or the image bytes as the request body with an image/* Content-Type)"
)


def sniff_image_type(data: bytes) -> str | None:
    """MIME type from the file's magic bytes, or None for anything we do not decode."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:2] == b"BM":
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None


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


async def _request_image(request: Request) -> tuple[str, bytes, dict[str, Any]]:
    """(declared type, bytes, extra form fields) of a multipart ``image`` part or a raw image body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=16)
        parts = form.getlist("image")
        if not parts:
            raise HTTPException(400, "missing form field 'image' (multipart/form-data file upload)")
        if len(parts) > 1:
            raise HTTPException(422, f"send one image per request; got {len(parts)} 'image' fields")
        part = parts[0]
        if not isinstance(part, UploadFile):
            raise HTTPException(400, "form field 'image' must be a file, not text")
        declared = (part.content_type or "").split(";")[0].strip().lower()
        data = await part.read()
        return declared, data, {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
    if ctype.startswith("image/") or ctype in NEUTRAL_TYPES:
        body = await request.body()
        if not body:
            raise HTTPException(400, NO_IMAGE)
        return ctype, body, {}
    raise HTTPException(
        415,
        f"unsupported request type {ctype!r}: send multipart/form-data with an "
        "'image' file, or the image bytes with an image/* Content-Type",
    )


async def read_upload(request: Request, limits: ServiceLimits) -> tuple[bytes, dict[str, Any]]:
    """The uploaded image bytes and any extra form fields; 4xx for every malformed request."""
    declared, data, fields = await _request_image(request)
    if declared not in NEUTRAL_TYPES and declared not in ALLOWED_TYPES:
        raise HTTPException(
            415, f"unsupported media type {declared!r}; allowed: {', '.join(sorted(ALLOWED_TYPES))}"
        )
    if not data:
        raise HTTPException(400, "empty upload: the image has 0 bytes")
    if len(data) > limits.max_bytes:
        raise HTTPException(
            413, f"upload too large: {len(data) / 2**20:.1f} MiB; the limit is {limits.max_upload_mb:g} MiB"
        )
    if sniff_image_type(data) is None:
        raise HTTPException(415, "not an image: the bytes are not JPEG, PNG, GIF, WebP, BMP or TIFF")
    return data, fields


def decode_upload(data: bytes, limits: ServiceLimits) -> Any:
    """The upload as an RGB image reduced to about the model's size; 422 for more pixels than the budget
    (before any decoding) or for anything that cannot be decoded."""
    from uniembed.data.images import BadImageError, TooManyPixelsError, load_image

    try:
        return load_image(data, max_pixels=limits.max_pixels, reduce_to=limits.decode_side)
    except TooManyPixelsError as e:
        raise HTTPException(422, pixels_message(e.size, limits.max_pixels)) from e
    except BadImageError as e:
        raise HTTPException(422, f"cannot decode image: {e}") from e


def embed_bytes(embedder: Embedder, data: bytes, limits: ServiceLimits | None = None) -> Any:
    """The embedding [1, D] of an uploaded image (see ``decode_upload``); the memory the decode freed goes
    back to the OS afterwards."""
    try:
        vec = embedder.embed_images([decode_upload(data, limits or ServiceLimits())])
    finally:
        release_memory()
    if not np.isfinite(vec).all():
        raise HTTPException(422, "the model produced a non-finite embedding for this image")
    return vec


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


def _add_routes(app: FastAPI, index: ImageIndex, embedder: Embedder, limits: ServiceLimits) -> None:
    """/, /health, /search, /embed and /thumb/{id} (in this order in the OpenAPI schema)."""
    gate = Admission(limits.slots, limits.queue, limits.queue_wait_s)
    app.state.admission = gate

    async def embed_admitted(data: bytes) -> Any:
        async with gate.slot():
            return await run_in_threadpool(embed_bytes, embedder, data, limits)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness plus what is loaded, so a client can check it talks to the right index and model."""
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
        }

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        """Top-k indexed images nearest to the uploaded one (nearest first)."""
        t0 = time.perf_counter()
        data, fields = await read_upload(request, limits)
        k = parse_k(fields.get("k", request.query_params.get("k")), limits)
        vec = await embed_admitted(data)
        hits = (await run_in_threadpool(index.search_batch, vec, k))[0]
        results = [{**h.to_dict(), "thumbnail": f"/thumb/{h.id}"} for h in hits]
        return {"results": results, "k": k, "took_ms": round((time.perf_counter() - t0) * 1000, 2)}

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
    def thumb(item_id: str) -> Response:
        """Thumbnail of an indexed id. The id is the only input: there is no path to traverse."""
        return thumbnail_response(index, item_id)


def create_app(
    index_dir: str | Path,
    model_path: str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    default_k: int = DEFAULT_K,
    max_k: int = MAX_K,
    embedder: Embedder | None = None,
    warmup: bool = True,
    engine: str = "auto",
    limits: ServiceLimits | None = None,
    verify: bool = True,
) -> FastAPI:
    """Load the index and the model, check they belong together, and return the ASGI app.

    ``limits`` (pixels, concurrency, queue, ...), when given, replaces ``max_upload_mb``, ``default_k`` and
    ``max_k``. ``verify`` False skips checking the index files against their checksums.

    Raises ``ModelMismatchError`` when the model's fingerprint is not the one the index was built with: the
    vectors would live in different spaces and every answer would be silently wrong.
    """
    if embedder is None:
        index, embedder = open_index_and_model(index_dir, model_path, engine=engine, verify=verify)
    else:
        index = ImageIndex.load(index_dir, verify=verify)
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
    _add_routes(app, index, embedder, limits)
    return app
