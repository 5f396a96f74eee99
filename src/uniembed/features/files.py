"""Features of image files read directly, with no shard pass: ``embed_paths`` (files / bytes / PIL images ->
features in memory) and ``extract_files`` (image sources -> the feature cache, ``uniembed extract
labels.csv``). Same decode, resize and engine as the shard path, so both give the same features."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.fsutil import atomic_path, file_stamp
from uniembed.features.cache import (
    ExtractResult,
    ExtractStats,
    as_backbone,
    cached_result,
    feature_dir_for,
    feature_info,
)
from uniembed.features.engines import ExtractError, make_runner, resolve_engine
from uniembed.features.pixels import PIPELINE_VERSION, default_workers, item_loader
from uniembed.features.store import is_complete, write_feature_set
from uniembed.models.registry import Backbone

#: Default time between checkpoints of an unfinished extraction (files here, shards in ``extract.py``).
CHECKPOINT_SECONDS = 30.0


@dataclass
class EmbedResult:
    """Features of the images that decoded (rows follow ``indices`` into the input) + the skipped ones."""

    features: np.ndarray  # float32 [n_ok, D]
    indices: np.ndarray  # int64 [n_ok], positions in the input sequence
    skipped: list[tuple[int, str]]  # (position, reason)

    def __len__(self) -> int:
        return int(self.features.shape[0])


def embed_paths(
    items: Sequence[Any],
    backbone: str | Backbone = "mobilenetv2",
    pooling: str = "avg",
    engine: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
    workers: int | None = None,
    pretrained: bool = True,
    on_bad: str = "skip",
    device: str | None = None,
    progress: bool = False,
    draft: bool = True,
) -> EmbedResult:
    """Embed image files / bytes / PIL images with exactly the extraction pipeline (same decode, resize and
    engine), e.g. to evaluate raw features on files that were never prepared into shards.

    ``backbone`` is a registry name or a ready ``Backbone`` (reuse one across calls: the engine session is
    cached per backbone). ``workers`` decode processes (default: none for short lists).
    ``on_bad="skip"`` skips undecodable inputs and lists ``(position, reason)`` in ``skipped``; ``"raise"``
    raises ``BadImageError`` naming the input."""
    from tqdm.auto import tqdm

    if on_bad not in ("skip", "raise"):
        raise ValueError("on_bad must be 'skip' or 'raise'")
    bb = as_backbone(backbone, pretrained=pretrained, pooling=pooling)
    runner = make_runner(bb, engine, threads=threads, device=device)
    parts: list[EmbedResult] = []
    with tqdm(total=len(items), unit="img", disable=not progress, desc="embed") as bar:
        for part in _embed_batches(items, bb, runner, batch_size, workers, draft, on_bad):
            parts.append(part)
            bar.update(len(part) + len(part.skipped))
    return _concat(parts, bb.dim)


def _embed_batches(
    items: Sequence[Any],
    bb: Backbone,
    runner: Any,
    batch_size: int,
    workers: int | None,
    draft: bool,
    on_bad: str = "skip",
    offset: int = 0,
) -> Iterator[EmbedResult]:
    """One ``EmbedResult`` per batch of ``batch_size`` consecutive inputs (positions counted from ``offset``).

    Batch k holds the decodable inputs among positions [k*b, (k+1)*b), so embedding the list from a multiple
    of ``batch_size`` on gives the same batches, hence the same features, as embedding all of it."""
    from uniembed.data.images import BadImageError

    if workers is None:
        workers = 0 if len(items) < 4 * batch_size else default_workers(-(-len(items) // batch_size))
    for batch in item_loader(items, bb.preprocess, batch_size, workers, draft):
        skipped = []
        for i, reason in batch["bad"]:
            if on_bad == "raise":
                item = items[i]
                name = item if isinstance(item, str | os.PathLike) else f"input #{i}"
                raise BadImageError(reason.split(":", 1)[0], f"{name}: {reason}")
            skipped.append((i + offset, reason.split(":", 1)[0]))
        pixels = batch["pixels"]
        feats = np.zeros((0, bb.dim), np.float32)
        if pixels is not None:
            feats = np.asarray(runner(pixels), dtype=np.float32)
        idx = np.asarray(batch["idx"], dtype=np.int64) + offset
        yield EmbedResult(features=feats, indices=idx, skipped=skipped)


def _concat(parts: Sequence[EmbedResult], dim: int) -> EmbedResult:
    """Batches (or a checkpoint followed by batches) as one result, in order."""
    feats = [p.features for p in parts if len(p)]
    return EmbedResult(
        features=np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, dim), np.float32),
        indices=np.concatenate([p.indices for p in parts] + [np.zeros(0, np.int64)]).astype(np.int64),
        skipped=[s for p in parts for s in p.skipped],
    )


def files_hash(records: Sequence[Any]) -> str:
    """Identity of a list of image files: path, label, domain, size and mtime of each (so an edited or
    replaced file invalidates the cache, like a new manifest hash does for shards)."""
    h = hashlib.sha256()
    for r in records:
        stamp = file_stamp(r.path, missing="missing")
        h.update(f"{r.path}|{r.label}|{r.domain}|{r.source}|{stamp}\n".encode())
    return h.hexdigest()


def extract_files(sources: Sequence[Any], backbone: str | Backbone = "mobilenetv2", **options: Any) -> Path:
    """Like :func:`extract_files_with_stats` (same options), returning just the feature directory."""
    return extract_files_with_stats(sources, backbone, **options).path


def extract_files_with_stats(
    sources: Sequence[Any],
    backbone: str | Backbone = "mobilenetv2",
    out_root: str | Path = "artifacts/features",
    pooling: str = "avg",
    engine: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
    workers: int | None = None,
    pretrained: bool = True,
    device: str | None = None,
    progress: bool = True,
    draft: bool = True,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> ExtractResult:
    """Files -> feature cache in one pass, without writing shards first (``uniembed extract labels.csv``).

    ``sources`` are the same specs ``uniembed prepare`` takes (labels.csv, imagefolder:DIR, gldv2:ROOT, ...).
    For a one-off extraction this skips the shard pass (decode + resize + JPEG re-encode); shards still pay
    off when several backbones, fine-tuning or the index read the same images. Same decode/resize/engine
    as :func:`embed_paths`; undecodable files are skipped and counted in ``info.json``. Progress is saved
    every ``checkpoint_seconds`` and on Ctrl-C; a rerun continues from it to the same bytes."""
    from uniembed.data.sources import DataError, parse_sources

    t_start = time.perf_counter()
    try:
        records = [r for s in parse_sources(list(sources)) for r in s.records()]
    except DataError as e:
        raise ExtractError(str(e)) from e
    if not records:
        raise ExtractError(f"no images found in {', '.join(map(str, sources))}")
    bb = as_backbone(backbone, pretrained=pretrained, pooling=pooling)
    mhash = "files-" + files_hash(records)
    out = feature_dir_for(out_root, bb, mhash)
    hit = cached_result(out, bb.fingerprint(), mhash, draft, t_start)
    if hit is not None:
        drop_leftovers(out)
        return hit
    ck = _FilesCheckpoint(out / "parts" / "files.partial.npz", bb, mhash, draft, batch_size)
    start = ck.load()
    runner = make_runner(bb, engine, threads=threads, device=device)
    todo = [r.path for r in records[start:]]
    res = ck.run(
        _embed_batches(todo, bb, runner, batch_size, workers, draft, offset=start),
        len(records),
        checkpoint_seconds,
        progress,
    )
    labels = sorted({r.label for r in records})
    skipped = [{"path": records[i].path, "reason": reason} for i, reason in res.skipped]
    stats = ExtractStats(
        images=len(records) - start,
        seconds=time.perf_counter() - t_start,
        engine=resolve_engine(engine, device),
        skipped=skipped,
    )
    info = feature_info(
        bb, mhash, None, stats, draft, sources=[str(s) for s in sources], resumed_images=start
    )
    drop_leftovers(out)
    write_feature_set(out, res.features, _meta_rows(records, res.indices, labels), info, labels)
    shutil.rmtree(out / "parts", ignore_errors=True)
    return ExtractResult(out, stats)


def drop_leftovers(out: Path) -> None:
    """Remove what killed runs left in a feature directory: temporary files of their atomic writes and,
    once the directory is complete, their checkpoints."""
    for p in out.glob(".*.tmp*"):
        with contextlib.suppress(OSError):
            p.unlink()
    if is_complete(out):
        shutil.rmtree(out / "parts", ignore_errors=True)


class _FilesCheckpoint:
    """Progress of a files extraction in one atomic file: the results for the first ``done`` inputs, a
    multiple of the batch size, so the rest are embedded in exactly the batches of an uninterrupted run."""

    def __init__(self, path: Path, bb: Backbone, mhash: str, draft: bool, batch_size: int):
        self.path, self.dim, self.batch_size = path, bb.dim, int(batch_size)
        stamp = {"fingerprint": bb.fingerprint(), "manifest_hash": mhash, "dim": bb.dim, "draft": draft}
        self.stamp = json.dumps(
            dict(stamp, pipeline=PIPELINE_VERSION, batch_size=self.batch_size), sort_keys=True
        )
        # (results, inputs they cover); appended in one step, so a Ctrl-C never splits the two.
        self.parts: list[tuple[EmbedResult, int]] = []

    @property
    def done(self) -> int:
        return sum(n for _, n in self.parts)

    def load(self) -> int:
        """Take over an earlier run's checkpoint of this extraction; returns how many inputs it covers."""
        try:
            with np.load(self.path) as z:
                if str(z["stamp"]) != self.stamp:
                    return 0
                skipped = [(int(i), str(r)) for i, r in json.loads(str(z["skipped"]))]
                part = EmbedResult(np.asarray(z["features"]), np.asarray(z["indices"]), skipped)
                done = int(z["done"])
        except Exception:  # noqa: BLE001 - missing, half-written or foreign: start from the beginning
            return 0
        if part.features.shape != (len(part.indices), self.dim) or done % self.batch_size:
            return 0
        self.parts = [(part, done)]
        return done

    def run(self, batches: Iterator[EmbedResult], total: int, every: float, progress: bool) -> EmbedResult:
        """Consume ``batches`` (the inputs after ``done``), saving every ``every`` seconds and on Ctrl-C."""
        from tqdm.auto import tqdm

        saved_at = time.monotonic()
        done = self.done
        with tqdm(total=total, initial=done, unit="img", disable=not progress, desc="extract") as bar:
            try:
                for part in batches:
                    n = min(self.batch_size, total - done)
                    self.parts.append((part, n))
                    done += n
                    bar.update(n)
                    if time.monotonic() - saved_at >= every and done < total:
                        self.save()
                        saved_at = time.monotonic()
            except KeyboardInterrupt:
                self.save()
                raise
        return _concat([p for p, _ in self.parts], self.dim)

    def save(self) -> None:
        """Write the results so far (float16, what the cache keeps: the final bytes do not change)."""
        res = _concat([p for p, _ in self.parts], self.dim)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                features=res.features.astype(np.float16),
                indices=res.indices,
                skipped=np.array(json.dumps(res.skipped)),
                done=np.array(self.done),
                stamp=np.array(self.stamp),
            )


def _meta_rows(records: Sequence[Any], indices: np.ndarray, labels: list[str]) -> list[dict]:
    """One meta row per embedded record (``indices`` into ``records``), keyed by its input position."""
    label_id = {lab: i for i, lab in enumerate(labels)}
    rows = []
    for i in indices.tolist():
        r = records[i]
        rows.append(
            {
                "key": f"{i:08d}",
                "path": r.path,
                "label": r.label,
                "label_id": label_id[r.label],
                "domain": r.domain,
                "source": r.source,
            }
        )
    return rows
