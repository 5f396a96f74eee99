"""Cache joint RGB colour histograms of the shared photo sets (research only; issue #6).

Why: the universality sweeps found a plain colour histogram to be the block that helps unseen domains most
(packaged goods, toys: the exact colours of one object). This computes it straight from the files, the same
rows and order as ``cache_features.py``, so ``universality.py --feats mobilenetv2-224-flip,colour@h8s``
joins it to the CNN blocks. The library's own block (``pooling: <...>+colour``, models/colour.py) computes
the 8x8x8 sqrt histogram inside the model from its 224 px input; this research version resizes the file to
64x64 instead (same bins, slightly different pixels).

Keys: ``h4`` / ``h8`` joint histograms with 4 / 8 bins a channel, ``h4g`` a 2x2 grid of 4x4x4 histograms;
``*s`` the same square-rooted (Hellinger), which is what the sweeps use.

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


def histograms(path: str) -> dict[str, np.ndarray]:
    with Image.open(path) as im:
        a = np.asarray(ImageOps.exif_transpose(im).convert("RGB").resize((64, 64), Image.BILINEAR), np.int32)
    out = {}
    for name, b in (("h4", 4), ("h8", 8)):
        q = (a * b) // 256
        idx = (q[..., 0] * b + q[..., 1]) * b + q[..., 2]
        out[name] = np.bincount(idx.ravel(), minlength=b**3) / idx.size
    q = (a * 4) // 256
    idx = (q[..., 0] * 4 + q[..., 1]) * 4 + q[..., 2]
    cells = [idx[i : i + 32, j : j + 32] for i in (0, 32) for j in (0, 32)]
    out["h4g"] = np.concatenate([np.bincount(c.ravel(), minlength=64) / c.size for c in cells])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=None, help="shared data dir (default: paths.shared_data_dir())")
    ap.add_argument("--out", default="/tmp/research/feats")
    args = ap.parse_args()
    from tqdm import tqdm

    from uniembed.paths import shared_data_dir

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
