#!/usr/bin/env python
"""Acceptance check of an exported GUIE model, using nothing but torch, torchvision and Pillow.

Loads ``saved_model.pt`` with ``torch.jit.load`` and feeds each photo as ``PILToTensor()(img).unsqueeze(0)``
(uint8 [1,3,H,W], the photo's own size; grayscale/palette/alpha images are converted to RGB first), then a
batch of two; prints shape, dtype and whether the output is finite. Exit status 0 only if every output is
float32 [B,64] and finite.

Usage::

    python scripts/check_saved_model.py artifacts/model/saved_model.pt photo1.jpg photo2.png
    python scripts/check_saved_model.py artifacts/model            # a folder holding saved_model.pt

Without photos, a few from ../shared/data are used when present, plus a synthetic 97x301 image and a
grayscale one.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import PILToTensor

EXPECTED_DIM = 64


def default_photos() -> list[Path]:
    """One grocery JPEG and one COIL-100 PNG from the shared photo sets, when present."""
    here = Path(__file__).resolve().parent.parent
    out = []
    for sub, pattern in (("grocery_store", "train/**/*.jpg"), ("coil100", "images/*.png")):
        base = here.parent / "shared" / "data" / sub
        found = sorted(base.glob(pattern))[:1] if base.exists() else []
        out += found
    return out


def synthetic_images() -> list[tuple[str, Image.Image]]:
    """A 97x301 colour gradient and an 'L' (grayscale) image converted to RGB by the caller, as required."""
    w, h = 97, 301
    grad = Image.new("RGB", (w, h))
    grad.putdata([(x * 255 // w, y * 255 // h, 128) for y in range(h) for x in range(w)])
    gray = Image.effect_noise((160, 120), 40).convert("L")
    return [("synthetic 97x301", grad), ("grayscale 160x120 -> RGB", gray.convert("RGB"))]


def check(out: torch.Tensor, batch: int) -> tuple[bool, str]:
    finite = bool(torch.isfinite(out).all())
    ok = out.dtype == torch.float32 and tuple(out.shape) == (batch, EXPECTED_DIM) and finite
    return ok, f"shape {tuple(out.shape)} dtype {out.dtype} finite {finite}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="saved_model.pt, or a folder holding it")
    ap.add_argument("images", nargs="*", type=Path, help="photos to embed (default: a few shared photos)")
    args = ap.parse_args(argv)

    path = args.model / "saved_model.pt" if args.model.is_dir() else args.model
    if not path.is_file():
        print(f"error: {path} not found", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* deprecation notices
        model = torch.jit.load(str(path), map_location="cpu").eval()
    to_tensor = PILToTensor()

    inputs: list[tuple[str, Image.Image]] = []
    for p in args.images or default_photos():
        try:
            with Image.open(p) as im:
                inputs.append((f"{p} ({im.width}x{im.height} {im.mode})", im.convert("RGB")))
        except OSError as e:
            print(f"SKIP {p}: cannot open ({e})")
    inputs += synthetic_images()

    all_ok = True
    with torch.no_grad():
        for name, im in inputs:
            x = to_tensor(im).unsqueeze(0)
            ok, msg = check(model(x), 1)
            all_ok &= ok
            print(f"{'OK  ' if ok else 'FAIL'} {name}: input {tuple(x.shape)} {x.dtype} -> {msg}")
        # batch > 1: two images of the same size stacked
        name, im = inputs[0]
        x = torch.stack([to_tensor(im), to_tensor(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
        out = model(x)
        ok, msg = check(out, 2)
        same = torch.allclose(out[0], model(x[:1])[0], atol=1e-5)
        all_ok &= ok and same
        print(
            f"{'OK  ' if ok and same else 'FAIL'} batch of 2: input {tuple(x.shape)} -> {msg}, "
            f"row 0 equals single-image output: {same}"
        )
    print("PASS" if all_ok else "FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
