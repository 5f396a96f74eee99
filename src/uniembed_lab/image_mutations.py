"""Seed images and mutations for the fuzz (``uniembed_lab.fuzz``): real JPEG/PNG photos and WebP/TIFF
re-encodings of them, and what can go wrong with image bytes in the wild or on purpose.

Mutations: bit flips, truncation, byte insertions/deletions/overwrites, a forged width/height in the header
(PNG IHDR with or without a valid CRC, JPEG SOF, WebP VP8/VP8L/VP8X, TIFF IFD) and duplicated chunks/segments.
``cases(seeds)`` is the hypothesis strategy the fuzz and its tests draw from.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Claimed sizes worth trying: zero, tiny, around the 16-bit and 24-bit field limits, the 9000x9000 memory
#: attack, and the largest values each header field can hold (the setters clamp to the field's width).
INTERESTING_DIMS = (0, 1, 2, 255, 256, 9000, 16383, 16384, 30000, 65535, 65536, 100_000, 2**24 - 1, 2**32 - 1)


@dataclass(frozen=True)
class Seed:
    """One valid image file to mutate: its name, container format and bytes."""

    name: str
    fmt: str
    data: bytes


# --------------------------------------------------------------------------------------------- seed images
def _reencode(im: Any, fmt: str, **opts: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **opts)
    return buf.getvalue()


def _seed_photos(shared: Path | None) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(JPEG photos, PNG photos) as (name, original bytes): grocery_store and coil100 when present, else
    synthetic stand-ins (noise plus shapes) so the fuzz still runs without ../shared/data."""
    picked: dict[str, list[tuple[str, bytes]]] = {"grocery_store": [], "coil100": []}
    for sub in picked:
        labels = shared / sub / "labels.csv" if shared else None
        if labels is None or not labels.is_file():
            continue
        with open(labels, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows[:: max(1, len(rows) // 2)][:2]:
            p = shared / sub / r["path"]  # type: ignore[operator]
            picked[sub].append((f"{sub}-{p.name}", p.read_bytes()))
    if picked["grocery_store"] and picked["coil100"]:
        return picked["grocery_store"], picked["coil100"]
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    out = []
    for i in range(2):
        im = Image.fromarray(rng.integers(60, 200, (96 + 32 * i, 128, 3), dtype=np.uint8), "RGB")
        ImageDraw.Draw(im).ellipse((20, 10, 90, 70), fill=(200, 40 * i, 30))
        out.append(im)
    return (
        [(f"synthetic-{i}.jpg", _reencode(im, "JPEG", quality=90)) for i, im in enumerate(out)],
        [(f"synthetic-{i}.png", _reencode(im, "PNG")) for i, im in enumerate(out)],
    )


def seed_images(shared: Path | None = None) -> list[Seed]:
    """Real photos and re-encodings of them: original JPEGs + a progressive one, original PNGs + a palette
    one, lossy and lossless WebP, uncompressed and LZW TIFF."""
    from PIL import Image

    if shared is None:
        from uniembed.core.paths import shared_data_dir

        shared = shared_data_dir()
    jpegs, pngs = _seed_photos(shared)
    photo = Image.open(io.BytesIO(jpegs[0][1])).convert("RGB")
    obj = Image.open(io.BytesIO(pngs[0][1])).convert("RGB")
    seeds = [Seed(n, "JPEG", d) for n, d in jpegs] + [Seed(n, "PNG", d) for n, d in pngs]
    seeds += [
        Seed("progressive.jpg", "JPEG", _reencode(photo, "JPEG", quality=85, progressive=True)),
        Seed("palette.png", "PNG", _reencode(obj.convert("P"), "PNG")),
        Seed("lossy.webp", "WEBP", _reencode(photo, "WEBP", quality=80)),
        Seed("lossless.webp", "WEBP", _reencode(obj, "WEBP", lossless=True)),
        Seed("raw.tiff", "TIFF", _reencode(obj, "TIFF")),
        Seed("lzw.tiff", "TIFF", _reencode(photo, "TIFF", compression="tiff_lzw")),
    ]
    return seeds


# ----------------------------------------------------------------------------------------------- mutations
def segments(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the container's chunks: PNG chunks, JPEG marker segments up to SOS, RIFF chunks
    of WebP; fixed 64-byte blocks for anything else (TIFF has no chunk framing)."""
    out: list[tuple[int, int]] = []
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        pos = 8
        while pos + 12 <= len(data):
            (n,) = struct.unpack(">I", data[pos : pos + 4])
            out.append((pos, min(12 + n, len(data) - pos)))
            pos += 12 + n
    elif data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            (n,) = struct.unpack(">H", data[pos + 2 : pos + 4])
            out.append((pos, min(2 + n, len(data) - pos)))
            if data[pos + 1] == 0xDA:  # start of scan: entropy-coded data follows, no more framing
                break
            pos += 2 + n
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        pos = 12
        while pos + 8 <= len(data):
            (n,) = struct.unpack("<I", data[pos + 4 : pos + 8])
            out.append((pos, min(8 + n + (n & 1), len(data) - pos)))
            pos += 8 + n + (n & 1)
    return out or [(i, min(64, len(data) - i)) for i in range(0, len(data), 64)]


def _set_png_dims(data: bytes, w: int, h: int, fix_crc: bool) -> bytes:
    if data[12:16] != b"IHDR" or len(data) < 33:
        return data
    b = bytearray(data)
    b[16:24] = struct.pack(">II", min(w, 2**32 - 1), min(h, 2**32 - 1))
    if fix_crc:  # a forged header with a valid CRC gets past the chunk check to the size check
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def _set_jpeg_dims(data: bytes, w: int, h: int) -> bytes:
    b = bytearray(data)
    for pos, n in segments(data):
        marker = data[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and n >= 9:
            b[pos + 5 : pos + 9] = struct.pack(">HH", min(h, 0xFFFF), min(w, 0xFFFF))
    return bytes(b)


def _set_webp_dims(data: bytes, w: int, h: int) -> bytes:
    b = bytearray(data)
    for pos, n in segments(data):
        kind, body = data[pos : pos + 4], pos + 8
        if kind == b"VP8 " and n >= 18 and data[body + 3 : body + 6] == b"\x9d\x01\x2a":
            b[body + 6 : body + 10] = struct.pack("<HH", min(w, 0x3FFF), min(h, 0x3FFF))
        elif kind == b"VP8L" and n >= 13:
            bits = struct.unpack("<I", data[body + 1 : body + 5])[0] & ~0x0FFFFFFF
            bits |= (min(max(w, 1), 0x4000) - 1) | ((min(max(h, 1), 0x4000) - 1) << 14)
            b[body + 1 : body + 5] = struct.pack("<I", bits)
        elif kind == b"VP8X" and n >= 18:
            b[body + 4 : body + 7] = (min(max(w, 1), 2**24) - 1).to_bytes(3, "little")
            b[body + 7 : body + 10] = (min(max(h, 1), 2**24) - 1).to_bytes(3, "little")
    return bytes(b)


def _set_tiff_dims(data: bytes, w: int, h: int) -> bytes:
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8:
        return data
    b = bytearray(data)
    (ifd,) = struct.unpack(order + "I", data[4:8])
    if ifd + 2 > len(data):
        return data
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    for e in range(ifd + 2, min(ifd + 2 + 12 * count, len(data) - 11), 12):
        tag, typ = struct.unpack(order + "HH", data[e : e + 4])
        value = {256: w, 257: h}.get(tag)
        if value is not None and typ == 3:
            b[e + 8 : e + 10] = struct.pack(order + "H", min(value, 0xFFFF))
        elif value is not None and typ == 4:
            b[e + 8 : e + 12] = struct.pack(order + "I", min(value, 2**32 - 1))
    return bytes(b)


def set_dimensions(data: bytes, w: int, h: int, fix_crc: bool = True) -> bytes:
    """``data`` with the width/height its header declares replaced (clamped to the field's width), whatever
    the container; unchanged when no such header is found."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _set_png_dims(data, w, h, fix_crc)
    if data.startswith(b"\xff\xd8"):
        return _set_jpeg_dims(data, w, h)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _set_webp_dims(data, w, h)
    return _set_tiff_dims(data, w, h)


def apply_op(data: bytes, op: tuple) -> bytes:
    """One mutation; positions are taken modulo the current length so every op applies to any input."""
    kind, n = op[0], len(data)
    at = op[1] % (n + 1) if kind in ("flip", "insert", "delete", "overwrite", "truncate") else 0
    if kind == "flip" and n:
        at %= n
        return data[:at] + bytes([data[at] ^ (1 << op[2])]) + data[at + 1 :]
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + op[2] + data[at:]
    if kind == "delete":
        return data[:at] + data[at + op[2] :]
    if kind == "overwrite":
        return data[:at] + op[2] + data[at + len(op[2]) :]
    if kind == "dims":
        return set_dimensions(data, op[1], op[2], op[3])
    if kind == "dup_chunk" and n:
        segs = segments(data)
        pos, length = segs[op[1] % len(segs)]
        return data[: pos + length] + data[pos : pos + length] * op[2] + data[pos + length :]
    return data


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    for op in ops:
        data = apply_op(data, op)
    return data


def mutation_ops() -> Any:
    """hypothesis strategy: 1-4 mutations, positions biased towards the header (where the sizes live)."""
    from hypothesis import strategies as st

    pos = st.integers(0, 300) | st.integers(0, 2**24)
    dim = st.sampled_from(INTERESTING_DIMS) | st.integers(0, 2**32 - 1)
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=32)),
        st.tuples(st.just("delete"), pos, st.integers(1, 256)),
        st.tuples(st.just("overwrite"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("dims"), dim, dim, st.booleans()),
        st.tuples(st.just("dup_chunk"), st.integers(0, 63), st.integers(1, 3)),
    )
    return st.lists(op, min_size=1, max_size=4)


def cases(seeds: list[Seed]) -> Any:
    """hypothesis strategy of (seed, ops)."""
    from hypothesis import strategies as st

    return st.tuples(st.sampled_from(seeds), mutation_ops())
