"""Features of image files read directly, with no shard pass: ``embed_paths`` (files / bytes / PIL images ->
features in memory) and ``extract_files`` (image sources -> the feature cache, ``uniembed extract
labels.csv``). Same decode, resize and engine as the shard path, so both give the same features."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.fsutil import file_stamp
from uniembed.features.cache import (
    ExtractResult,
    ExtractStats,
    as_backbone,
    cached_result,
    feature_dir_for,
    feature_info,
)
from uniembed.features.engines import ExtractError, make_runner, resolve_engine
from uniembed.features.pixels import default_workers, item_loader
from uniembed.features.store import write_feature_set
from uniembed.models.registry import Backbone


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

    from uniembed.data.images import BadImageError

    if on_bad not in ("skip", "raise"):
        raise ValueError("on_bad must be 'skip' or 'raise'")
    bb = as_backbone(backbone, pretrained=pretrained, pooling=pooling)
    runner = make_runner(bb, engine, threads=threads, device=device)
    n_batches = -(-len(items) // batch_size)
    if workers is None:
        workers = 0 if len(items) < 4 * batch_size else default_workers(n_batches)
    loader = item_loader(items, bb.preprocess, batch_size, workers, draft)
    feats: list[np.ndarray] = []
    ok: list[int] = []
    skipped: list[tuple[int, str]] = []
    with tqdm(total=len(items), unit="img", disable=not progress, desc="embed") as bar:
        for batch in loader:
            for i, reason in batch["bad"]:
                if on_bad == "raise":
                    item = items[i]
                    name = item if isinstance(item, str | os.PathLike) else f"input #{i}"
                    raise BadImageError(reason.split(":", 1)[0], f"{name}: {reason}")
                skipped.append((i, reason.split(":", 1)[0]))
            if batch["pixels"] is not None:
                feats.append(np.asarray(runner(batch["pixels"]), dtype=np.float32))
                ok += batch["idx"]
            bar.update(len(batch["idx"]) + len(batch["bad"]))
    f = np.concatenate(feats) if feats else np.zeros((0, bb.dim), np.float32)
    return EmbedResult(features=f, indices=np.asarray(ok, dtype=np.int64), skipped=skipped)


def files_hash(records: Sequence[Any]) -> str:
    """Identity of a list of image files: path, label, domain, size and mtime of each (so an edited or
    replaced file invalidates the cache, like a new manifest hash does for shards)."""
    h = hashlib.sha256()
    for r in records:
        stamp = file_stamp(r.path, missing="missing")
        h.update(f"{r.path}|{r.label}|{r.domain}|{r.source}|{stamp}\n".encode())
    return h.hexdigest()


def extract_files(
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
) -> Path:
    """Files -> feature cache in one pass; returns the feature directory. See
    :func:`extract_files_with_stats`, which also says what the call did."""
    return extract_files_with_stats(
        sources,
        backbone,
        out_root=out_root,
        pooling=pooling,
        engine=engine,
        batch_size=batch_size,
        threads=threads,
        workers=workers,
        pretrained=pretrained,
        device=device,
        progress=progress,
        draft=draft,
    ).path


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
) -> ExtractResult:
    """Files -> feature cache in one pass, without writing shards first (``uniembed extract labels.csv``).

    ``sources`` are the same specs ``uniembed prepare`` takes (labels.csv, imagefolder:DIR, gldv2:ROOT, ...).
    For a one-off extraction this skips the shard pass (decode + resize + JPEG re-encode); shards still pay
    off when several backbones, fine-tuning or the index read the same images. Same decode/resize/engine
    as :func:`embed_paths`; undecodable files are skipped and counted in ``info.json``."""
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
        return hit
    res = embed_paths(
        [r.path for r in records],
        bb,
        engine=engine,
        batch_size=batch_size,
        threads=threads,
        workers=workers,
        device=device,
        progress=progress,
        draft=draft,
    )
    labels = sorted({r.label for r in records})
    skipped = [{"path": records[i].path, "reason": reason} for i, reason in res.skipped]
    stats = ExtractStats(
        images=len(records),
        seconds=time.perf_counter() - t_start,
        engine=resolve_engine(engine, device),
        skipped=skipped,
    )
    info = feature_info(bb, mhash, None, stats, draft, sources=[str(s) for s in sources])
    write_feature_set(out, res.features, _meta_rows(records, res.indices, labels), info, labels)
    return ExtractResult(out, stats)


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
