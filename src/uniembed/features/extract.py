"""Frozen-feature extraction: prepared shards -> cached float16 features (``features/store.py`` format).

The stages, one module each:

- ``pixels.py``: DataLoader worker processes decode and squash-resize whole shards to float16 pixels.
- ``engines.py``: ONNX Runtime on CPU / torch on GPU turn [B,3,S,S] batches into features.
- this module: the orchestration. A finished directory with the same fingerprint is returned at once
  (``cache.py``). Otherwise each shard's features are written atomically to ``<out>/parts/`` as soon as the
  shard is done, unfinished shards are checkpointed every ``checkpoint_seconds`` and on Ctrl-C, so a killed
  run restarts from there (to the same bytes), and only the end assembles them.
- ``files.py``: the same for image files read directly, with no shard pass.

The names callers use (``extract``, ``extract_files``, ``embed_paths``, ``make_runner`` ...) stay importable
from here.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
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
    CHECKPOINT_SECONDS,
    EmbedResult,
    drop_leftovers,
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
    "CHECKPOINT_SECONDS",
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


def extract(dataset_dir: str | Path, backbone: str | Backbone = "mobilenetv2", **options: Any) -> Path:
    """Like :func:`extract_with_stats` (same options), returning just the feature directory."""
    return extract_with_stats(dataset_dir, backbone, **options).path


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
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> ExtractResult:
    """Extract pooled frozen features for every image of a prepared dataset: the feature directory and the
    call's stats (``stats.cached`` when a finished directory was reused).

    ``backbone`` is a registry name (built with ``pooling``/``pretrained``) or a ready ``Backbone``.
    ``draft=False`` disables reduced-scale decoding of JPEGs >= 2x the input size (slower, exact).
    Re-running with the same backbone, weights, preprocessing, pooling and dataset returns at once.
    Unfinished shards are checkpointed every ``checkpoint_seconds`` (and on Ctrl-C), so a killed run loses
    at most that much work; a rerun with the same batch size gives the same bytes as an uninterrupted run.
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
        drop_leftovers(out)
        return hit

    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    stamp = {"fingerprint": fp, "manifest_hash": mhash, "dim": bb.dim, "pipeline": PIPELINE_VERSION}
    stamp["draft"] = draft
    run = _ShardRun(bb, parts, shards, stamp, batch_size, checkpoint_seconds)
    run.done, todo = _reusable_parts(shards, parts, stamp)
    run.resume_partials(todo)

    stats = ExtractStats(reused_shards=len(run.done))
    n_workers = default_workers(len(todo)) if workers is None else max(0, min(int(workers), len(todo)))
    t0 = time.perf_counter()
    if todo:
        runner = make_runner(bb, engine, threads=threads, device=device, compile=compile)
        stats.engine = runner.engine
        pin = bool(getattr(runner, "cuda", False))
        loader = shard_loader(todo, bb.preprocess, batch_size, n_workers, draft, pin_memory=pin)
        stats.images = run.feed(loader, runner, int(manifest.get("count", 0)), progress)
    else:
        stats.engine = resolve_engine(engine, device)
    stats.seconds = time.perf_counter() - t0

    feats, meta_rows, skipped = _assemble(run.done, len(shards), bb.dim)
    if not meta_rows:
        raise ExtractError(f"no decodable images in {ds} ({len(skipped)} skipped)")
    stats.skipped = skipped
    info = feature_info(
        bb, mhash, str(ds), stats, draft, reused_shards=stats.reused_shards, resumed_images=run.resumed
    )
    drop_leftovers(out)
    write_feature_set(out, feats, meta_rows, info, list(manifest.get("labels", [])))
    shutil.rmtree(parts, ignore_errors=True)
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


def _part_path(parts: Path, shard_name: str, partial: bool = False) -> Path:
    """``parts/shard-N.npz`` (a finished shard) or ``parts/shard-N.partial.npz`` (its checkpoint)."""
    return parts / (Path(shard_name).name.removesuffix(".tar") + (".partial.npz" if partial else ".npz"))


def _write_part(
    path: Path, feats: np.ndarray, meta: list[dict], bad: list[dict], stamp: dict, items: int | None = None
) -> None:
    """A shard's part file, or with ``items`` (loader items it holds) a partial checkpoint."""
    extra = {} if items is None else {"items": np.array(items)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            features=feats.astype(np.float16),
            meta=np.array(json.dumps(meta)),
            bad=np.array(json.dumps(bad)),
            stamp=np.array(json.dumps(stamp, sort_keys=True)),
            **extra,
        )


def _read_part(path: Path, stamp: dict) -> tuple[np.ndarray, list[dict], list[dict]] | None:
    """A finished part, or None if missing, unreadable or written for another feature function."""
    got = _read_npz(path, stamp)
    return None if got is None else got[:3]


def _read_npz(path: Path, stamp: dict) -> tuple[np.ndarray, list[dict], list[dict], int] | None:
    """(features, meta, bad, items or 0) of a part file written with ``stamp``, else None."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            if json.loads(str(z["stamp"])) != json.loads(json.dumps(stamp, sort_keys=True)):
                return None
            feats = z["features"]
            meta = json.loads(str(z["meta"]))
            bad = json.loads(str(z["bad"]))
            items = int(z["items"]) if "items" in z.files else 0
    except Exception:  # noqa: BLE001 - a half-written or foreign file is simply redone
        return None
    if feats.shape[0] != len(meta):
        return None
    return feats, meta, bad, items


# ---------------------------------------------------------------------------------------- the hot loop

_META_KEYS = ("key", "path", "label", "label_id", "domain", "source")


@dataclass
class _Batch:
    """Some consecutive loader items of one shard: features, meta rows, skipped images, how many items they
    were and whether the shard's final item is among them. Appended in one step, so a Ctrl-C between two
    statements never leaves a shard's features and rows out of step."""

    feats: np.ndarray
    meta: list[dict]
    bad: list[dict]
    items: int = 1
    last: bool = False


class _ShardRun:
    """Feeds the loader's batches through the runner: a shard's part file is written as soon as it is
    complete, unfinished shards are checkpointed to ``*.partial.npz`` every ``every`` seconds and on Ctrl-C.

    A partial checkpoint holds the first k loader items of its shard. The loader yields the same items for
    a shard on every run (same batch size, recorded in the partial's stamp), so a resumed run drops the
    first k items and the shard's batches, hence its features, are exactly those of an uninterrupted run."""

    def __init__(self, bb: Backbone, parts: Path, shards: list[Path], stamp: dict, batch: int, every: float):
        self.bb, self.parts, self.shards, self.stamp = bb, parts, shards, stamp
        self.done: Parts = {}
        self.partial_stamp = dict(stamp, batch_size=int(batch))
        self.every = max(0.0, float(every))
        self.open: dict[int, list[_Batch]] = {}
        self.skip: dict[int, int] = {}  # shard -> loader items already held by its partial checkpoint
        self.seen: dict[int, int] = {}  # shard -> loader items received in this run
        self.resumed = 0  # images whose features came from partial checkpoints
        self.saved_at = time.monotonic()

    def resume_partials(self, todo: list[tuple[int, str]]) -> None:
        """Start each unfinished shard from its partial checkpoint, where one of this run's kind exists."""
        for i, _ in todo:
            got = _read_npz(_part_path(self.parts, self.shards[i].name, True), self.partial_stamp)
            if got is not None and got[3] > 0:
                feats, meta, bad, items = got
                self.open[i] = [_Batch(feats, meta, bad, items=items)]
                self.skip[i] = items
                self.resumed += len(meta) + len(bad)

    def feed(self, loader: Any, runner: Any, count: int, progress: bool) -> int:
        """Run every batch of ``loader``; returns the number of images embedded."""
        from tqdm.auto import tqdm

        finished = sum(len(m) + len(b) for _, m, b in self.done.values())
        total = max(0, count - finished - self.resumed)
        desc = f"extract {self.bb.name}"
        bar = tqdm(total=total or None, unit="img", desc=desc, disable=not progress, smoothing=0.1)
        n_images = 0
        try:
            for item in loader:
                n_images += self._take(item, runner, bar)
        except KeyboardInterrupt:
            self.checkpoint()
            raise
        finally:
            bar.close()
        return n_images

    def _take(self, item: dict, runner: Any, bar: Any) -> int:
        """One loader item: embed it (unless a partial checkpoint holds it), then finish or checkpoint."""
        i = int(item["shard"])
        if "error" in item:
            raise ExtractError(f"cannot read shard: {item['error']}")
        self.seen[i] = self.seen.get(i, 0) + 1
        if self.seen[i] <= self.skip.get(i, 0):
            return 0
        x = item["pixels"]
        n = int(x.shape[0])
        feats = np.asarray(runner(x), dtype=np.float32) if n else np.zeros((0, self.bb.dim), np.float32)
        meta = [{k: m.get(k, "") for k in _META_KEYS} for m in item["meta"]]
        self.open.setdefault(i, []).append(_Batch(feats, meta, list(item["bad"]), last=bool(item["last"])))
        bar.update(n + len(item["bad"]))
        if item["last"]:
            self._finish(i)
        elif time.monotonic() - self.saved_at >= self.every:
            self.checkpoint()
        return n

    def _finish(self, i: int) -> None:
        """Write shard ``i``'s part file and drop its partial checkpoint."""
        joined = _join(self.open[i], self.bb.dim)
        if joined.feats.shape[1] != self.bb.dim:
            raise ExtractError(
                f"{self.bb.name} produced {joined.feats.shape[1]}-d features, expected {self.bb.dim}"
            )
        _write_part(
            _part_path(self.parts, self.shards[i].name), joined.feats, joined.meta, joined.bad, self.stamp
        )
        self.done[i] = (joined.feats.astype(np.float16), joined.meta, joined.bad)
        del self.open[i]
        _part_path(self.parts, self.shards[i].name, partial=True).unlink(missing_ok=True)

    def checkpoint(self) -> None:
        """Write every unfinished shard's batches so far to its partial checkpoint (atomically)."""
        for i in list(self.open):
            if i in self.done:
                continue
            if self.open[i][-1].last:  # interrupted between its final batch and its part file
                self._finish(i)
                continue
            j = _join(self.open[i], self.bb.dim)
            path = _part_path(self.parts, self.shards[i].name, partial=True)
            _write_part(path, j.feats, j.meta, j.bad, self.partial_stamp, items=j.items)
        self.saved_at = time.monotonic()


def _join(batches: list[_Batch], dim: int) -> _Batch:
    """One shard's batches as one (float32 features: float16 checkpoints widen exactly)."""
    f_l = [b.feats for b in batches if b.feats.shape[0]]
    feats = np.concatenate(f_l).astype(np.float32) if f_l else np.zeros((0, dim), np.float32)
    return _Batch(
        feats,
        [m for b in batches for m in b.meta],
        [x for b in batches for x in b.bad],
        items=sum(b.items for b in batches),
        last=bool(batches) and batches[-1].last,
    )
