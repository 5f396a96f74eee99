"""What a client uploads to the service: reading the image part of a request, checking its type and size,
decoding it within the pixel budget and embedding it. Shared by /search, /embed and POST /items."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from uniembed.export.embedder import Embedder
from uniembed.serve.admission import release_memory
from uniembed.serve.limits import ServiceLimits, pixels_message

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
        fields: dict[str, Any] = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
        fields["filter"] = [v for v in form.getlist("filter") if isinstance(v, str)]
        return declared, data, fields
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
