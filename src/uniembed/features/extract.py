"""Frozen-feature extraction: prepared shards -> cached float16 features (``features/store.py`` format).

The stages, one module each:

- ``pixels.py``: DataLoader worker processes decode and squash-resize whole shards to float16 pixels.
- ``engines.py``: ONNX Runtime on CPU / torch on GPU turn [B,3,S,S] batches into features.
- this module: the orchestration. A finished directory with the same fingerprint is returned at once
  (``cache.py``). Otherwise each shard's features are written atomically to ``<out>/parts/`` as soon as the
  shard is done, so a killed run restarts from the finished parts, and only the end assembles them.
- ``files.py``: the same for image files read directly, with no shard pass.

The names callers use (``extract``, ``extract_files``, ``embed_paths``, ``make_runner`` ...) stay importable
from here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.fsutil import atomic_path
from uniembed.features.cache import (
    ExtractResult,
    ExtractStats,
    as_backbone,
    backbone_slug,
    cached_result,
    feature_dir_for,
    feature_info,
)
from uniembed.features.engines import (
    _RUNNERS,
    ENGINES,
    ExtractError,
    OrtRunner,
    PixelEmbedder,
    TorchRunner,
    clear_runner_cache,
    default_threads,
    export_onnx,
    make_runner,
    onnx_cache_path,
    resolve_engine,
)
from uniembed.features.files import (
    EmbedResult,
    embed_paths,
    extract_files,
    extract_files_with_stats,
    files_hash,
)
from uniembed.features.pixels import (
    DRAFT_FACTOR,
    PIPELINE_VERSION,
    _draft_decode,
    decode_resized,
    default_workers,
    shard_loader,
)
from uniembed.features.store import write_feature_set
from uniembed.models.registry import Backbone

__all__ = [
    "DRAFT_FACTOR",
    "ENGINES",
    "PIPELINE_VERSION",
    "_RUNNERS",
    "EmbedResult",
    "ExtractError",
    "ExtractResult",
    "ExtractStats",
    "OrtRunner",
    "PixelEmbedder",
    "TorchRunner",
    "_draft_decode",
    "as_backbone",
    "backbone_slug",
    "clear_runner_cache",
    "decode_resized",
    "default_threads",
    "default_workers",
    "embed_paths",
    "export_onnx",
    "extract",
    "extract_files",
    "extract_files_with_stats",
    "extract_with_stats",
    "feature_dir_for",
    "files_hash",
    "make_runner",
    "onnx_cache_path",
    "resolve_engine",
]

#: Finished shards: shard index -> (float16 features, meta rows, skipped images).
Parts = dict[int, tuple[np.ndarray, list[dict], list[dict]]]


def extract(
    dataset_dir: str | Path,
    backbone: str | Backbone = "mobilenetv2",
    out_root: str | Path = "artifacts/features",
    pooling: str = "avg",
    engine: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
    workers: int | None = None,
    pretrained: bool = True,
    device: str | None = None,
    compile: bool = False,
    progress: bool = True,
    draft: bool = True,
) -> Path:
    """Extract pooled frozen features for every image of a prepared dataset; returns the feature directory.
    See :func:`extract_with_stats`, which also says what the call did."""
    return extract_with_stats(
        dataset_dir,
        backbone,
        out_root=out_root,
        pooling=pooling,
        engine=engine,
        batch_size=batch_size,
        threads=threads,
        workers=workers,
        pretrained=pretrained,
        device=device,
        compile=compile,
        progress=progress,
        draft=draft,
    ).path


def extract_with_stats(
    dataset_dir: str | Path,
    backbone: str | Backbone = "mobilenetv2",
    out_root: str | Path = "artifacts/features",
    pooling: str = "avg",
    engine: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
    workers: int | None = None,
    pretrained: bool = True,
    device: str | None = None,
    compile: bool = False,
    progress: bool = True,
    draft: bool = True,
) -> ExtractResult:
    """Extract pooled frozen features for every image of a prepared dataset: the feature directory and the
    call's stats (``stats.cached`` when a finished directory was reused).

    ``backbone`` is a registry name (built with ``pooling``/``pretrained``) or a ready ``Backbone``.
    ``draft=False`` disables reduced-scale decoding of JPEGs >= 2x the input size (slower, exact).
    Re-running with the same backbone, weights, preprocessing, pooling and dataset returns at once.
    """
    t_start = time.perf_counter()
    if batch_size < 1:
        raise ExtractError("batch_size must be at least 1")
    ds, manifest, shards, mhash = _open_dataset(dataset_dir)
    bb = as_backbone(backbone, pretrained=pretrained, pooling=pooling)
    fp = bb.fingerprint()
    out = feature_dir_for(out_root, bb, mhash)
    hit = cached_result(out, fp, mhash, draft, t_start)
    if hit is not None:
        return hit

    out.mkdir(parents=True, exist_ok=True)
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    stamp = {"fingerprint": fp, "manifest_hash": mhash, "dim": bb.dim, "pipeline": PIPELINE_VERSION}
    stamp["draft"] = draft
    done, todo = _reusable_parts(shards, parts, stamp)
    reused = len(done)

    stats = ExtractStats(reused_shards=reused)
    n_workers = default_workers(len(todo)) if workers is None else max(0, min(int(workers), len(todo)))
    t0 = time.perf_counter()
    if todo:
        runner = make_runner(bb, engine, threads=threads, device=device, compile=compile)
        stats.engine = runner.engine
        stats.images = _run_shards(
            todo, shards, bb, runner, batch_size, n_workers, parts, stamp, done, manifest, progress, draft
        )
    else:
        stats.engine = resolve_engine(engine, device)
    stats.seconds = time.perf_counter() - t0

    feats, meta_rows, skipped = _assemble(done, len(shards), bb.dim)
    if not meta_rows:
        raise ExtractError(f"no decodable images in {ds} ({len(skipped)} skipped)")
    stats.skipped = skipped
    info = feature_info(bb, mhash, str(ds), stats, draft, reused_shards=reused)
    write_feature_set(out, feats, meta_rows, info, list(manifest.get("labels", [])))
    for p in parts.glob("*"):
        p.unlink()
    parts.rmdir()
    return ExtractResult(out, stats)


def _open_dataset(dataset_dir: str | Path) -> tuple[Path, dict, list[Path], str]:
    """(resolved folder, manifest, shard paths, manifest hash) of a prepared dataset, or ExtractError."""
    from uniembed.data.shards import load_manifest, shard_paths
    from uniembed.data.sources import DataError

    ds = Path(dataset_dir).expanduser().resolve()
    try:
        manifest = load_manifest(ds)
        shards = shard_paths(ds)
    except DataError as e:
        raise ExtractError(str(e)) from e
    mhash = str(manifest.get("hash", ""))
    if not mhash:
        raise ExtractError(f"{ds}/manifest.json has no 'hash'; re-run `uniembed prepare`")
    return ds, manifest, shards, mhash


def _reusable_parts(shards: list[Path], parts: Path, stamp: dict) -> tuple[Parts, list[tuple[int, str]]]:
    """Shards an earlier run of this feature function finished (read back), and the (index, path) to do."""
    done: Parts = {}
    todo: list[tuple[int, str]] = []
    for i, sp in enumerate(shards):
        part = _read_part(_part_path(parts, sp.name), stamp)
        if part is not None:
            done[i] = part
        else:
            todo.append((i, str(sp)))
    return done, todo


def _assemble(done: Parts, n_shards: int, dim: int) -> tuple[np.ndarray, list[dict], list[dict]]:
    """All shards' features, meta rows and skipped images, in shard order (== key order of the manifest)."""
    feats_l, meta_rows, skipped = [], [], []
    for i in range(n_shards):
        f, m, b = done[i]
        feats_l.append(np.asarray(f, dtype=np.float16).reshape(-1, dim))
        meta_rows += m
        skipped += b
    feats = np.concatenate(feats_l) if feats_l else np.zeros((0, dim), np.float16)
    return feats, meta_rows, skipped


# ----------------------------------------------------------------------------------------- part files


def _part_path(parts: Path, shard_name: str) -> Path:
    return parts / (Path(shard_name).name.removesuffix(".tar") + ".npz")


def _write_part(path: Path, feats: np.ndarray, meta: list[dict], bad: list[dict], stamp: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            features=feats.astype(np.float16),
            meta=np.array(json.dumps(meta)),
            bad=np.array(json.dumps(bad)),
            stamp=np.array(json.dumps(stamp, sort_keys=True)),
        )


def _read_part(path: Path, stamp: dict) -> tuple[np.ndarray, list[dict], list[dict]] | None:
    """A finished part, or None if missing, unreadable or written for another feature function."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            if json.loads(str(z["stamp"])) != json.loads(json.dumps(stamp, sort_keys=True)):
                return None
            feats = z["features"]
            meta = json.loads(str(z["meta"]))
            bad = json.loads(str(z["bad"]))
    except Exception:  # noqa: BLE001 - a half-written or foreign file is simply redone
        return None
    if feats.shape[0] != len(meta):
        return None
    return feats, meta, bad


# ---------------------------------------------------------------------------------------- the hot loop

_META_KEYS = ("key", "path", "label", "label_id", "domain", "source")


def _run_shards(
    todo: list[tuple[int, str]],
    shards: list[Path],
    bb: Backbone,
    runner: Any,
    batch_size: int,
    n_workers: int,
    parts: Path,
    stamp: dict,
    done: Parts,
    manifest: dict,
    progress: bool,
    draft: bool,
) -> int:
    """Feed the remaining shards through the runner, writing each shard's part as soon as it is complete.
    Returns the number of images embedded."""
    from tqdm.auto import tqdm

    finished = sum(len(m) + len(b) for _, m, b in done.values())
    total = max(0, int(manifest.get("count", 0)) - finished)
    pin = getattr(runner, "cuda", False)
    loader = shard_loader(todo, bb.preprocess, batch_size, n_workers, draft, pin_memory=pin)
    acc: dict[int, tuple[list[np.ndarray], list[dict], list[dict]]] = {}
    n_images = 0
    bar = tqdm(
        total=total or None, unit="img", desc=f"extract {bb.name}", disable=not progress, smoothing=0.1
    )
    try:
        for item in loader:
            i = int(item["shard"])
            if "error" in item:
                raise ExtractError(f"cannot read shard: {item['error']}")
            f_l, m_l, b_l = acc.setdefault(i, ([], [], []))
            x = item["pixels"]
            if x.shape[0]:
                f_l.append(np.asarray(runner(x), dtype=np.float32))
                m_l += item["meta"]
            b_l += item["bad"]
            bar.update(x.shape[0] + len(item["bad"]))
            n_images += int(x.shape[0])
            if item["last"]:
                done[i] = _finish_shard(bb, acc.pop(i), _part_path(parts, shards[i].name), stamp)
    finally:
        bar.close()
    return n_images


def _finish_shard(
    bb: Backbone, acc: tuple[list[np.ndarray], list[dict], list[dict]], part: Path, stamp: dict
) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Join a shard's batches, write its part file, and return it as the assembly keeps it (float16)."""
    f_l, m_l, b_l = acc
    feats = np.concatenate(f_l) if f_l else np.zeros((0, bb.dim), np.float32)
    if feats.shape[1] != bb.dim:
        raise ExtractError(f"{bb.name} produced {feats.shape[1]}-d features, expected {bb.dim}")
    meta = [{k: m.get(k, "") for k in _META_KEYS} for m in m_l]
    _write_part(part, feats, meta, b_l, stamp)
    return feats.astype(np.float16), meta, b_l
