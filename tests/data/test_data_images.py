"""Safe decoding: every kind of bad or unusual file either decodes correctly or fails with a short reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniembed.data.images import BadImageError, TooManyPixelsError, encode_jpeg, load_image, resize_image


def noisy_rgb(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    # IHDR data starts at byte 16 (8-byte signature + 4 length + 4 type); CRC covers type + data.
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def reason_of(src) -> str:
    with pytest.raises(BadImageError) as info:
        load_image(src)
    return info.value.reason


def test_valid_jpeg_path_and_bytes(tmp_path: Path) -> None:
    p = tmp_path / "ok.jpg"
    p.write_bytes(jpeg_bytes(noisy_rgb()))
    for src in (p, str(p), p.read_bytes()):
        im = load_image(src)
        assert im.mode == "RGB" and im.size == (64, 48)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert reason_of(p) == "empty file"
    assert reason_of(b"") == "empty file"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert reason_of(tmp_path / "nope.jpg") == "missing file"
    assert reason_of(tmp_path) == "not an image"


def test_text_file_named_jpg(tmp_path: Path) -> None:
    p = tmp_path / "page.jpg"
    p.write_text("<html><body>403 Forbidden</body></html>\n")
    assert reason_of(p) == "not an image"


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = jpeg_bytes(noisy_rgb(256, 256))
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    assert reason_of(p) == "truncated"


def test_truncated_png_is_rejected(tmp_path: Path) -> None:
    data = png_bytes(noisy_rgb(128, 128))
    with pytest.raises(BadImageError) as info:
        load_image(data[: len(data) // 2])
    assert info.value.reason in ("truncated", "corrupt image")


def test_decompression_bomb_header() -> None:
    data = bomb_png(100_000, 100_000)
    assert len(data) < 200
    assert reason_of(data) == "decompression bomb"


def test_custom_pixel_limit() -> None:
    data = png_bytes(noisy_rgb(100, 100))
    with pytest.raises(BadImageError) as info:
        load_image(data, max_pixels=5_000)
    assert info.value.reason == "decompression bomb"
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def test_cmyk_jpeg_colours() -> None:
    red = Image.new("RGB", (32, 32), (220, 30, 30)).convert("CMYK")
    assert red.mode == "CMYK"
    im = load_image(jpeg_bytes(red, quality=95))
    assert im.mode == "RGB"
    r, g, b = np.asarray(im).reshape(-1, 3).mean(0)
    assert r > 180 and g < 80 and b < 80


def test_sixteen_bit_png_is_rescaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    src = Image.fromarray(ramp)
    assert src.mode.startswith("I;16")
    im = load_image(png_bytes(src))
    arr = np.asarray(im)
    assert im.mode == "RGB" and im.size == (64, 16)
    assert arr[:, 0].max() <= 2 and arr[:, -1].min() >= 253  # full range kept
    assert 100 < arr.mean() < 155  # a ramp, not a clipped white image


def test_palette_with_transparency_goes_on_white() -> None:
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 255] + [255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 5, 10))  # left half red, right half index 0 (blue) made transparent
    pal.info["transparency"] = 0
    im = load_image(png_bytes(pal, transparency=0))
    arr = np.asarray(im)
    assert tuple(arr[5, 2]) == (255, 0, 0)
    assert tuple(arr[5, 8]) == (255, 255, 255)


def test_rgba_half_transparent_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    arr = np.asarray(load_image(png_bytes(rgba)))
    r, g, b = arr[4, 4]
    assert r == 255 and 120 <= g <= 135 and 120 <= b <= 135


def test_la_and_bilevel_and_gray(tmp_path: Path) -> None:
    for mode in ("LA", "1", "L"):
        im = load_image(png_bytes(Image.new(mode, (6, 5))))
        assert im.mode == "RGB" and im.size == (6, 5)


def test_exif_orientation_6_is_rotated() -> None:
    src = noisy_rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = jpeg_bytes(src, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    assert load_image(data).size == (20, 40)


def test_resize_modes() -> None:
    im = noisy_rgb(400, 200)
    assert resize_image(im, "longest", 100).size == (100, 50)
    assert resize_image(im, "square", 64).size == (64, 64)
    assert resize_image(im, "none", 10).size == (400, 200)
    small = noisy_rgb(50, 30)
    assert resize_image(small, "longest", 336).size == (50, 30)  # never enlarged
    with pytest.raises(ValueError):
        resize_image(im, "crop", 10)


def test_encode_jpeg_roundtrip() -> None:
    data = encode_jpeg(noisy_rgb(30, 20))
    assert data[:2] == b"\xff\xd8"
    assert load_image(data).size == (30, 20)


def test_draft_decoding_of_large_jpeg_keeps_enough_pixels() -> None:
    big = Image.fromarray(np.kron(np.asarray(noisy_rgb(40, 30)), np.ones((50, 50, 1), dtype=np.uint8)))
    data = jpeg_bytes(big)  # 2000 x 1500
    assert load_image(data).size == (2000, 1500)
    im = load_image(data, draft_size=336)
    assert im.size == (500, 375)  # decoded at 1/4 scale: the largest that keeps both sides >= 336
    assert resize_image(im, "longest", 336).size == (336, 252)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert load_image(jpeg_bytes(big, exif=exif.tobytes()), draft_size=336).size == (375, 500)


def test_pixel_budget_error_says_the_size() -> None:
    with pytest.raises(TooManyPixelsError) as info:
        load_image(bomb_png(9000, 9000), max_pixels=40_000_000)
    assert info.value.size == (9000, 9000) and info.value.max_pixels == 40_000_000
    assert info.value.reason == "decompression bomb"  # the reason prepare counts is unchanged
    with pytest.raises(TooManyPixelsError) as info:  # over twice Pillow's own limit: refused at open
        load_image(bomb_png(100_000, 100_000))
    assert info.value.size is None


def test_reduce_to_shrinks_each_axis_by_a_whole_factor() -> None:
    im = Image.fromarray(np.kron(np.asarray(noisy_rgb(30, 20)), np.ones((100, 100, 1), dtype=np.uint8)))
    data = png_bytes(im)  # 3000 x 2000, blocks of 100 x 100 pixels of one colour
    out = load_image(data, reduce_to=256)
    assert out.mode == "RGB" and out.size == (273, 286)  # 3000 / 11 and 2000 / 7, rounded up
    assert load_image(data, reduce_to=4000).size == (3000, 2000)  # never enlarged
    assert load_image(data, reduce_to=1000).size == (1000, 1000)  # squashed: the model squares it anyway
    # A box filter: a pixel well inside a block keeps that block's colour.
    assert tuple(np.asarray(out)[150, 140]) == tuple(np.asarray(im)[1050, 1545])  # rows 1050-56, cols 1540-50
    tall = png_bytes(Image.new("RGB", (100, 40_000), (10, 200, 30)))
    assert load_image(tall, reduce_to=64).size == (100, 64)  # any aspect ratio: area < 4 * side^2


def test_reduce_to_keeps_colours_of_special_modes() -> None:
    ramp = np.tile(np.linspace(0, 65535, 2000).astype(np.uint16), (500, 1))
    arr = np.asarray(load_image(png_bytes(Image.fromarray(ramp)), reduce_to=100))
    assert arr.shape == (100, 100, 3)
    assert arr[:, 0].max() <= 2 and arr[:, -1].min() >= 253 and 100 < arr.mean() < 155  # rescaled 16-bit
    pal = Image.new("P", (1000, 1000), 0)
    pal.putpalette([0, 0, 255] + [255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 500, 1000))  # left half red, right half index 0 (blue) made transparent
    arr = np.asarray(load_image(png_bytes(pal, transparency=0), reduce_to=100))
    assert arr.shape == (100, 100, 3)
    assert tuple(arr[50, 20]) == (255, 0, 0) and tuple(arr[50, 80]) == (255, 255, 255)
    bilevel = Image.new("1", (800, 800), 1)
    assert tuple(np.asarray(load_image(png_bytes(bilevel), reduce_to=100))[5, 5]) == (255, 255, 255)


def test_reduce_to_keeps_exif_orientation_and_drafts_jpeg() -> None:
    big = Image.fromarray(np.kron(np.asarray(noisy_rgb(40, 30)), np.ones((50, 50, 1), dtype=np.uint8)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = jpeg_bytes(big, exif=exif.tobytes())  # 2000 x 1500 stored, 1500 x 2000 shown
    assert load_image(data).size == (1500, 2000)
    # Drafted to 1/4 (500 x 375), then reduced to 250 x 187 (factors 2 and 2), then turned upright.
    assert load_image(data, reduce_to=160).size == (188, 250)
    png = Image.new("RGB", (1200, 600))
    png_exif = Image.Exif()
    png_exif[0x0112] = 8
    assert load_image(png_bytes(png, exif=png_exif.tobytes()), reduce_to=100).size == (100, 100)
    assert load_image(png_bytes(png, exif=png_exif.tobytes()), reduce_to=400).size == (600, 400)


def test_jpeg_header_without_its_data_is_refused_before_decoding() -> None:
    """A 9000x9000 SOF over a few KB of scan data would decode to 81 MP of grey padding (2 s, +616 MiB);
    it is refused as truncated. A real flat-colour JPEG of that size (about 64 pixels a byte) still loads."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="JPEG")
    small = buf.getvalue()
    sof = small.index(b"\xff\xc0")
    forged = small[: sof + 5] + struct.pack(">HH", 9000, 9000) + small[sof + 9 :]
    with pytest.raises(BadImageError) as e:
        load_image(forged)
    assert e.value.reason == "truncated" and "9000x9000" in str(e.value)
    buf = io.BytesIO()
    Image.new("RGB", (3000, 3000), (255, 255, 255)).save(buf, format="JPEG", quality=10)
    assert load_image(buf.getvalue()).size == (3000, 3000)
