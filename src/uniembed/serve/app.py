"""The image-search HTTP service: FastAPI over a loaded index and the GUIE model.

Endpoints: ``POST /search`` and ``POST /embed`` (multipart field ``image``, or a raw ``image/*`` body),
``GET /health``, ``GET /thumb/{id}`` (indexed ids only: no path ever reaches the file system from a
request), ``GET /`` (an offline web page from ``static/``). Every bad input gets a 4xx JSON
``{"detail": ...}``; nothing a client sends can take the process down.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from uniembed.export.embedder import Embedder
from uniembed.serve.index import ImageIndex, open_index_and_model

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
#: Room for multipart boundaries and part headers on top of the image itself.
MULTIPART_SLACK = 64 * 1024


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


class BodySizeLimit:
    """Pure ASGI middleware: answer 413 before the app parses an over-large body.

    Starlette's multipart parser spools any size of upload to disk, so the limit must sit in front of it. The
    declared Content-Length is checked first; bodies without one (chunked) are counted as they arrive.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await _send_json(send, 400, "invalid Content-Length header")
                return
            if n > self.max_bytes:
                await _send_json(send, 413, self._too_large(n))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await _send_json(send, 413, self._too_large(size, at_least=True))
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, n: int, at_least: bool = False) -> str:
        limit_mb = (self.max_bytes - MULTIPART_SLACK) / (1024 * 1024)
        return (
            f"upload too large: {'more than ' if at_least else ''}{n / (1024 * 1024):.1f} MiB; "
            f"the limit is {limit_mb:g} MiB"
        )


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class ServiceLimits:
    """What a request may ask for: upload size and the number of results."""

    max_upload_mb: float = 10.0
    default_k: int = 5
    max_k: int = 100

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def _install_error_handlers(app: FastAPI) -> None:
    """Invalid requests answer 422 with one readable line; any other exception answers 500, not a crash."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse({"detail": f"invalid request: {msgs}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Last line of defence: a bug must become one failed request, not a dead server.
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


async def _request_image(request: Request) -> tuple[str, bytes, dict[str, Any]]:
    """(declared type, bytes, extra form fields) of a multipart ``image`` part or a raw image body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=2, max_fields=16)
        part = form.get("image")
        if part is None:
            raise HTTPException(400, "missing form field 'image' (multipart/form-data file upload)")
        if not isinstance(part, UploadFile):
            raise HTTPException(400, "form field 'image' must be a file, not text")
        declared = (part.content_type or "").split(";")[0].strip().lower()
        data = await part.read()
        return declared, data, {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
    if ctype.startswith("image/") or ctype in NEUTRAL_TYPES:
        return ctype, await request.body(), {}
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


def embed_bytes(embedder: Embedder, data: bytes) -> Any:
    """The embedding [1, D] of an uploaded image; 413 for a decompression bomb, 422 for anything unusable."""
    from uniembed.data.images import BadImageError, load_image

    try:
        im = load_image(data)
    except BadImageError as e:
        code = 413 if e.reason == "decompression bomb" else 422
        raise HTTPException(code, f"cannot decode image: {e}") from e
    vec = embedder.embed_images([im])
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
    if not 1 <= k <= limits.max_k:
        raise HTTPException(422, f"k must be between 1 and {limits.max_k}, got {k}")
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
    if not 0 <= i < len(index):
        raise HTTPException(404, "no such item")
    # Index built without thumbnails: render one from the indexed file (path from items.csv, not the URL).
    try:
        im = load_image(index.items[i]["path"])
    except BadImageError as e:
        raise HTTPException(404, f"thumbnail unavailable: {e.reason}") from e
    im.thumbnail((int(index.info.get("thumb_size", 160)),) * 2)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return Response(buf.getvalue(), media_type="image/jpeg")


def _add_routes(app: FastAPI, index: ImageIndex, embedder: Embedder, limits: ServiceLimits) -> None:
    """/, /health, /search, /embed and /thumb/{id} (in this order in the OpenAPI schema)."""

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
        }

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        """Top-k indexed images nearest to the uploaded one (nearest first)."""
        t0 = time.perf_counter()
        data, fields = await read_upload(request, limits)
        k = parse_k(fields.get("k", request.query_params.get("k")), limits)
        vec = await run_in_threadpool(embed_bytes, embedder, data)
        hits = (await run_in_threadpool(index.search_batch, vec, k))[0]
        results = [{**h.to_dict(), "thumbnail": f"/thumb/{h.id}"} for h in hits]
        return {"results": results, "k": k, "took_ms": round((time.perf_counter() - t0) * 1000, 2)}

    @app.post("/embed")
    async def embed(request: Request) -> dict[str, Any]:
        """The model's embedding of the uploaded image."""
        data, _ = await read_upload(request, limits)
        vec = await run_in_threadpool(embed_bytes, embedder, data)
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
    max_upload_mb: float = 10.0,
    default_k: int = 5,
    max_k: int = 100,
    embedder: Embedder | None = None,
    warmup: bool = True,
    engine: str = "auto",
) -> FastAPI:
    """Load the index and the model, check they belong together, and return the ASGI app.

    Raises ``ModelMismatchError`` when the model's fingerprint is not the one the index was built with: the
    vectors would live in different spaces and every answer would be silently wrong.
    """
    if embedder is None:
        index, embedder = open_index_and_model(index_dir, model_path, engine=engine)
    else:
        index = ImageIndex.load(index_dir)
        index.check_embedder(embedder)
    if warmup:
        embedder.warmup()
    limits = ServiceLimits(max_upload_mb=max_upload_mb, default_k=default_k, max_k=max_k)

    app = FastAPI(title="uniembed image search", version="1", docs_url="/docs", redoc_url=None)
    app.state.index = index
    app.state.embedder = embedder
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_bytes + MULTIPART_SLACK)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app)
    _add_routes(app, index, embedder, limits)
    return app
