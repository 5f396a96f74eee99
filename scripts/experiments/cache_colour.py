"""Cache joint RGB colour histograms of the shared photo sets (research only; issue #6).

Why: the universality sweeps found a plain colour histogram to be the block that helps unseen domains most
(packaged goods, toys: the exact colours of one object). This computes it straight from the files, the same
rows and order as ``cache_features.py``, so ``universality.py --feats mobilenetv2-224-flip,colour@h8s``
joins it to the CNN blocks. The library's own block (``pooling: <...>+colour``, models/colour.py) computes
the 8x8x8 sqrt histogram inside the model from its 224 px input; this research version resizes the file to
64x64 instead (same bins, slightly different pixels).

Keys: ``h4`` / ``h8`` / ``h16`` joint histograms with 4 / 8 / 16 bins a channel, ``h4g`` / ``h8g`` a 2x2 grid
of them, ``h8c`` the centre quarter only, ``hsv`` 18 hue x 3 saturation x 3 value bins; ``*s`` the same
square-rooted (Hellinger), which is what the sweeps use.

Example::

    python scripts/experiments/cache_colour.py --out /tmp/r2/feats
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_features import read_rows  # noqa: E402


def joint(a: np.ndarray, b: int) -> np.ndarray:
    """Joint RGB histogram of uint8 pixels [..., 3] with ``b`` bins a channel (sums to 1)."""
    q = (a * b) // 256
    idx = (q[..., 0] * b + q[..., 1]) * b + q[..., 2]
    return np.bincount(idx.ravel(), minlength=b**3) / idx.size


def histograms(path: str) -> dict[str, np.ndarray]:
    with Image.open(path) as im:
        small = ImageOps.exif_transpose(im).convert("RGB").resize((64, 64), Image.BILINEAR)
        hsv = np.asarray(small.convert("HSV"), np.int32)
    a = np.asarray(small, np.int32)
    quads = [(i, j) for i in (0, 32) for j in (0, 32)]
    h = hsv[..., 0] * 18 // 256
    s = hsv[..., 1] * 3 // 256
    v = hsv[..., 2] * 3 // 256
    return {
        "h4": joint(a, 4),
        "h8": joint(a, 8),
        "h16": joint(a, 16),
        "h4g": np.concatenate([joint(a[i : i + 32, j : j + 32], 4) for i, j in quads]),  # 2x2 grid
        "h8g": np.concatenate([joint(a[i : i + 32, j : j + 32], 8) for i, j in quads]),
        "h8c": joint(a[16:48, 16:48], 8),  # centre quarter only
        "hsv": np.bincount(((h * 3 + s) * 3 + v).ravel(), minlength=162) / h.size,  # 18 hue x 3 sat x 3 val
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=None, help="shared data dir (default: paths.shared_data_dir())")
    ap.add_argument("--out", default="/tmp/research/feats")
    args = ap.parse_args()
    from tqdm import tqdm

    from uniembed.core.paths import shared_data_dir

    rows = read_rows(Path(args.shared) if args.shared else shared_data_dir())
    hists: dict[str, list[np.ndarray]] = {}
    for r in tqdm(rows, desc="colour histograms"):
        for k, v in histograms(r["path"]).items():
            hists.setdefault(k, []).append(v)
    arrays = {k: np.array(v, np.float32) for k, v in hists.items()}
    arrays.update({f"{k}s": np.sqrt(v) for k, v in list(arrays.items())})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / "colour.npz",
        labels=np.array([r["label"] for r in rows]),
        domains=np.array([r["domain"] for r in rows]),
        paths=np.array([r["path"] for r in rows]),
        **arrays,
    )
    print(f"wrote {out / 'colour.npz'}: {len(rows)} images, keys {sorted(arrays)}")


if __name__ == "__main__":
    main()
