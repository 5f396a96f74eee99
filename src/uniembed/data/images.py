"""Safe image decoding: every file becomes an RGB ``PIL.Image`` or a ``BadImageError`` with a short reason.

Why this exists: real collections contain 0-byte downloads, truncated JPEGs, HTML error pages saved as
``.jpg``, CMYK scans, 16-bit PNGs, palette GIFs with transparency and phone photos stored sideways with an
EXIF orientation tag. Pillow handles each differently (some silently give wrong colours, some raise deep
inside ``load()``), so the rules live here once and every stage (prepare, index, serve) uses them.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Largest accepted image area. Pillow's own default (~89.5 Mpx, a 0.25 GB RGB buffer) is a sane guard against
#: decompression bombs (a few KB of PNG that claim 100k x 100k pixels) while still admitting large photos.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

#: Background colour that transparent pixels are composited onto (white, like a product page).
BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
#: Modes whose pixels ``Image.reduce`` may average as they are (not palette indices, 1-bit or 16-bit data).
_REDUCIBLE_MODES = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "I", "F"}
#: EXIF orientation -> the transpose that shows the image upright (what ``ImageOps.exif_transpose`` applies).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadImageError(ValueError):
    """An input that cannot be decoded into a usable RGB image; ``reason`` is a short, countable string."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TooManyPixelsError(BadImageError):
    """More pixels than the caller's budget (reason ``decompression bomb``, as before): a subclass so a
    service can say how many pixels it got and how many it accepts. ``size`` is None when Pillow refused
    the image at open (over twice its own limit), before the size could be read."""

    def __init__(self, size: tuple[int, int] | None, max_pixels: int, detail: str = "") -> None:
        self.size = size
        self.max_pixels = max_pixels
        if not detail and size is not None:
            detail = f"{size[0]}x{size[1]} exceeds {max_pixels} pixels"
        super().__init__("decompression bomb", detail)


ImageSource = str | os.PathLike | bytes | bytearray | memoryview


def _read_bytes(src: ImageSource) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    path = Path(src)
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise BadImageError("missing file", str(path)) from e
    except IsADirectoryError as e:
        raise BadImageError("not an image", f"{path} is a directory") from e
    except OSError as e:
        raise BadImageError("unreadable file", f"{path}: {e.strerror or e}") from e


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB with correct-looking colours."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        # Pillow's convert("L") clips 16-bit values at 255 (a white image); rescale the real range instead.
        arr = np.asarray(im, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        if mode == "F":
            lo = float(arr.min()) if arr.size else 0.0
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        elif hi > 255.0:
            arr = arr / (65535.0 if hi <= 65535.0 else hi) * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P":
        # Palette images may carry transparency in info["transparency"]; go through RGBA to honour it.
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode == "RGB":
            return im
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (Pillow undoes Adobe's inverted CMYK JPEGs on open), YCbCr, LAB, HSV, L, 1 ...
    return im.convert("RGB")


#: A JPEG with fewer bytes than (pixels / this) is a header without its image data.
JPEG_MIN_PIXELS_PER_BYTE = 1000


def _decode(data: bytes, max_pixels: int, draft_size: int | None) -> Image.Image:
    """Open and decode the bytes; an image over ``max_pixels`` is refused from its header, before decoding."""
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w <= 0 or h <= 0:
                raise BadImageError("corrupt image", f"size {w}x{h}")
            if w * h > max_pixels:
                raise TooManyPixelsError((w, h), max_pixels)
            if im.format == "JPEG" and len(data) * JPEG_MIN_PIXELS_PER_BYTE < w * h:
                # libjpeg pads missing scan data with grey and Pillow does not call it truncated, so a 22 KB
                # file claiming 9000x9000 would decode to 81 MP (2 s, +616 MiB measured). Even a flat colour
                # needs a few bits per 8x8 block, i.e. well over one byte per 1,000 pixels.
                raise BadImageError("truncated", f"{len(data)} bytes cannot hold a {w}x{h} JPEG")
            if draft_size and im.format == "JPEG":
                im.draft(None, (draft_size, draft_size))
            im.load()
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise TooManyPixelsError(None, max_pixels, str(e)) from e
    except UnidentifiedImageError as e:
        raise BadImageError("not an image") from e
    except OSError as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg or "premature end" in msg.lower():
            raise BadImageError("truncated", msg) from e
        raise BadImageError("corrupt image", msg) from e
    except (SyntaxError, ValueError, TypeError, IndexError, struct.error, EOFError, MemoryError) as e:
        raise BadImageError("corrupt image", f"{type(e).__name__}: {e}") from e
    return im


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 = upright; also for a missing or broken EXIF block)."""
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost us an otherwise fine image
        return 1


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos stored sideways)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost us an otherwise fine image
        return im


def _reduce_upright(im: Image.Image, side: int) -> Image.Image:
    """``_reduce``, then the EXIF orientation read from the full image (the reduced copy has no EXIF)."""
    orientation = _orientation(im)
    im = _reduce(im, side)
    return im.transpose(_ORIENTATION[orientation]) if orientation in _ORIENTATION else im


def _reduce(im: Image.Image, side: int) -> Image.Image:
    """Shrink by a whole factor per axis (a box filter, ``Image.reduce``) keeping both sides >= ``side``.

    The model squash-resizes to a square anyway, so each axis is reduced on its own: the result has fewer than
    4 * side^2 pixels at any aspect ratio.
    """
    w, h = im.size
    fx, fy = max(1, w // side), max(1, h // side)
    if fx == 1 and fy == 1:
        return im
    if im.mode.startswith("I;16"):
        im = im.convert("I")  # 16-bit values averaged as 32-bit ints; _to_rgb rescales them afterwards
    elif im.mode not in _REDUCIBLE_MODES:
        im = _to_rgb(im)  # palette indices or 1-bit pixels cannot be averaged
    return im.reduce((fx, fy))


def load_image(
    src: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    reduce_to: int | None = None,
) -> Image.Image:
    """Decode ``src`` (a path or the file's bytes) into an upright RGB image, or raise ``BadImageError``.

    Reasons: ``missing file``, ``unreadable file``, ``empty file``, ``not an image``, ``decompression bomb``
    (a ``TooManyPixelsError``: more than ``max_pixels``), ``truncated``, ``corrupt image``.
    ``draft_size``: the caller will shrink the image to about this side anyway, so a large JPEG may be decoded
    at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling; both sides stay >= draft_size): several times faster on
    multi-megapixel photos.
    ``reduce_to``: the caller only needs about this many pixels a side and squashes to a square (a model's
    input): JPEGs are drafted to it and any image is then reduced per axis right after decoding (see
    ``_reduce``), so no full-resolution copy outlives this call. Other formats are still decoded at full size
    once (Pillow has no scaled decoding for them): ``max_pixels`` is what bounds that.
    """
    data = _read_bytes(src)
    if len(data) == 0:
        raise BadImageError("empty file")
    im = _decode(data, max_pixels, draft_size or reduce_to)
    try:
        rgb = _to_rgb(_reduce_upright(im, reduce_to) if reduce_to else _upright(im))
    except (OSError, ValueError) as e:
        raise BadImageError("corrupt image", f"cannot convert mode {im.mode}: {e}") from e
    rgb.load()
    return rgb


RESIZE_MODES = ("longest", "square", "none")


def resize_image(im: Image.Image, mode: str = "longest", size: int = 336) -> Image.Image:
    """Resize for storage.

    ``longest``: shrink so the longest side is at most ``size`` keeping the aspect ratio (never upscale: that
    would only store interpolated pixels). ``square``: squash to exactly ``size`` x ``size`` (what the model
    preprocessing does anyway). ``none``: keep the decoded size.
    """
    if mode == "none":
        return im
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    w, h = im.size
    if mode == "longest":
        longest = max(w, h)
        if longest <= size:
            return im
        scale = size / longest
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        return im.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if mode == "square":
        if (w, h) == (size, size):
            return im
        return im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")


def encode_jpeg(im: Image.Image, quality: int = 95) -> bytes:
    """RGB JPEG bytes (the shard format in docs/design.md)."""
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
