"""Parity of the exported files against the Python pipeline, on real photos.

Three routes must give the same embedding for the same image:
  * Python:       ``head(backbone.module(preprocessor(x)))`` (eager, what training/eval use),
  * exported:     ``saved_model.pt`` (TorchScript) and ``model.onnx`` (onnxruntime),
  * cached:       ``head(feature)`` with the feature read from the run's feature cache (float16, extracted
                  from the prepared shards' JPEGs, possibly by another engine).
The last one needs the very bytes the extractor saw, so those images are read back from the shards by key.
Original photos (their own sizes) are compared across the first two routes. Anything below the cosine
threshold fails the export loudly.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from uniembed.core.splits import spread_rows

if TYPE_CHECKING:
    from uniembed.export.model import RunModel

COSINE_THRESHOLD = 0.999


class ParityError(RuntimeError):
    """An exported model disagrees with the Python pipeline beyond the threshold."""


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Largest absolute difference and the smallest row cosine between two [N,D] arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cos.min()), "n": int(len(a))}


def _shard_samples(feature_dir: Path, n: int) -> tuple[list[torch.Tensor], np.ndarray, list[str], str]:
    """(images, cached features [n,D] float32, keys, note) for ``n`` rows of the feature cache, the images
    decoded from the prepared shards the features were extracted from."""
    from uniembed.data.shards import decode_sample, iter_samples, load_manifest
    from uniembed.features.store import load_feature_set

    fs = load_feature_set(feature_dir)
    ds = fs.info.get("dataset") or fs.info.get("dataset_dir")
    if not ds or not (Path(ds) / "manifest.json").exists():
        return (
            [],
            np.zeros((0, fs.dim), np.float32),
            [],
            f"prepared dataset {ds!r} of {feature_dir} not found",
        )
    man = load_manifest(ds)
    want_hash = fs.info.get("manifest_hash")
    if want_hash and man.get("hash") != want_hash:
        return (
            [],
            np.zeros((0, fs.dim), np.float32),
            [],
            f"dataset {ds} changed since extraction (manifest hash)",
        )
    rows = spread_rows(fs.domains, n)
    by_key = {fs.keys[r]: r for r in rows}
    found: dict[str, torch.Tensor] = {}
    for s in iter_samples(ds):
        if s.key in by_key:
            found[s.key] = decode_sample(s)[0]
            if len(found) == len(by_key):
                break
    keys = [k for k in by_key if k in found]
    feats = np.asarray(fs.features[[by_key[k] for k in keys]], dtype=np.float32)
    return [found[k] for k in keys], feats, keys, ""


def _photos(paths: list[str], n: int) -> tuple[list[torch.Tensor], list[str], int]:
    """Up to ``n`` decodable photos of ``paths`` (uint8 [3,H,W]); undecodable ones are skipped and counted."""
    from torchvision.transforms.functional import pil_to_tensor

    from uniembed.data.images import BadImageError, load_image

    out, used, bad = [], [], 0
    for p in paths:
        if len(out) >= n:
            break
        try:
            out.append(pil_to_tensor(load_image(p)))
            used.append(str(p))
        except BadImageError:
            bad += 1
    return out, used, bad


def _one_by_one(fn: Any, imgs: list[torch.Tensor]) -> np.ndarray:
    """Each image alone through ``fn`` (its own size, batch of one), stacked."""
    return np.concatenate([np.asarray(fn(x.unsqueeze(0))) for x in imgs]) if imgs else np.zeros((0, 1))


def _add(comparisons: list[dict], name: str, a: np.ndarray, b: np.ndarray) -> None:
    if len(a):
        comparisons.append({"name": name, **compare(a, b)})


def _compare_on_shards(
    run_model: RunModel, ts: Any, onnx: Any, n_images: int, notes: list[str], comparisons: list[dict]
) -> int:
    """Images the feature cache was computed from, through every route, including head(cached feature);
    and a batch through the exported model against one-at-a-time. Returns how many images were used."""
    fdirs = run_model.record.feature_dirs()
    if run_model.finetuned:
        notes.append("fine-tuned backbone: the cached features predate it, cached-feature route not compared")
        return 0
    if not fdirs:
        notes.append("head.pt names no feature dir: cached-feature route not compared")
        return 0
    shard_imgs, feats, _, note = _shard_samples(fdirs[0], n_images)
    if note:
        notes.append(note + ": cached-feature route not compared")
    if shard_imgs:
        py = _one_by_one(run_model.model, shard_imgs)
        cached = run_model.head(torch.from_numpy(feats)).numpy()
        _add(comparisons, "python vs cached features (shard JPEGs)", py, cached)
        _add(comparisons, "torchscript vs cached features (shard JPEGs)", _one_by_one(ts, shard_imgs), cached)
        if onnx is not None:
            _add(comparisons, "onnx vs cached features (shard JPEGs)", _one_by_one(onnx, shard_imgs), cached)
        # batch > 1 through the exported model must match one-at-a-time
        sizes = {tuple(t.shape) for t in shard_imgs}
        if len(sizes) == 1 and len(shard_imgs) > 1:
            _add(
                comparisons,
                "torchscript batch vs python (shard JPEGs)",
                ts(torch.stack(shard_imgs)).numpy(),
                py,
            )
    return len(shard_imgs)


def _compare_on_photos(
    run_model: RunModel,
    ts: Any,
    onnx: Any,
    n_images: int,
    photos: list[str] | None,
    notes: list[str],
    comparisons: list[dict],
) -> tuple[list[torch.Tensor], list[str]]:
    """Original photos at their own sizes, Python against the exported files (default photos: spread over
    the domains of the run's feature cache). Returns (the images used, their paths)."""
    from uniembed.features.store import load_feature_set

    if photos is None:
        photos = []
        fdirs = run_model.record.feature_dirs()
        if fdirs:
            fs = load_feature_set(fdirs[0])
            photos = [fs.paths[i] for i in spread_rows(fs.domains, 4 * n_images)]
    imgs, used, bad = _photos(photos, n_images)
    if bad:
        notes.append(f"{bad} photo(s) could not be decoded and were skipped")
    if not imgs:
        notes.append("no original photos readable: compared on the shard images only")
    py = _one_by_one(run_model.model, imgs)
    _add(comparisons, "torchscript vs python (photos)", _one_by_one(ts, imgs), py)
    if onnx is not None:
        _add(comparisons, "onnx vs python (photos)", _one_by_one(onnx, imgs), py)
    return imgs, used


@torch.no_grad()
def check_parity(
    run_model: RunModel,
    saved_model: str | Path,
    onnx_path: str | Path | None = None,
    n_images: int = 8,
    photos: list[str] | None = None,
    threshold: float = COSINE_THRESHOLD,
) -> dict:
    """Compare saved_model.pt (and model.onnx) with the Python pipeline and the cached-feature path.

    ``photos``: original image paths to use (default: taken from the run's feature cache metadata, spread
    over domains). Returns a JSON-able report with ``passed``; does not raise (``require_parity`` does)."""
    from uniembed.core.runtime import onnx_session
    from uniembed.export.model import quiet_jit
    from uniembed.export.onnx_export import run_onnx

    with quiet_jit():
        ts = torch.jit.load(str(saved_model), map_location="cpu").eval()
    sess = onnx_session(onnx_path) if onnx_path else None
    onnx = (lambda x: run_onnx(sess, x)) if sess is not None else None
    run_model.model.eval()
    run_model.head.eval()
    notes: list[str] = []
    comparisons: list[dict] = []
    n_shard = _compare_on_shards(run_model, ts, onnx, n_images, notes, comparisons)
    imgs, used = _compare_on_photos(run_model, ts, onnx, n_images, photos, notes, comparisons)
    if not comparisons:
        raise ParityError("parity check had no images: neither shard samples nor readable photos were found")
    worst = min(c["min_cosine"] for c in comparisons)
    return {
        "threshold_cosine": threshold,
        "passed": bool(worst >= threshold),
        "min_cosine": worst,
        "max_abs_diff": max(c["max_abs_diff"] for c in comparisons),
        "comparisons": comparisons,
        "images": {"shard_samples": n_shard, "photos": len(imgs), "photo_paths": used},
        "photo_sizes": sorted({f"{t.shape[2]}x{t.shape[1]}" for t in imgs}),
        "notes": notes,
    }


def require_parity(report: dict) -> None:
    """Raise ``ParityError`` naming every comparison below the threshold."""
    if report["passed"]:
        return
    bad = [c for c in report["comparisons"] if c["min_cosine"] < report["threshold_cosine"]]
    lines = ", ".join(f"{c['name']}: min cosine {c['min_cosine']:.6f}" for c in bad)
    raise ParityError(
        f"exported model disagrees with the Python pipeline (need >= {report['threshold_cosine']}): {lines}"
    )
