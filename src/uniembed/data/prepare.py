"""``prepare``: merge image sources into WebDataset shards + ``manifest.json`` (format in docs/design.md).

Order of work, and why:

1. List every source's records (a labels.csv naming missing files fails here, with one error).
2. Drop classes that cannot reach ``min_per_class`` even before decoding, then apply ``cap_per_source`` by
   taking *whole classes* in a seeded random order (a retrieval set needs several images per class; a random
   image-level cap would leave mostly singletons, which is why GLDv2-mini kept whole classes of >10 images).
3. Decode + resize + re-encode every kept image in a process pool; bad files are skipped and recorded with
   their reason. Results go to a staging file so nothing large is held in memory.
4. Filter classes again on the *decoded* count (bad images may push a class under ``min_per_class``), then
   assign label ids: per source, sorted label names, contiguous ids starting at that source's offset.
5. Shuffle deterministically by ``seed``, write ``shard-NNNNNN.tar`` files, ``manifest.json`` and the report
   into a temporary sibling folder, then rename it into place, so a half-written dataset is never mistaken for
   a finished one. A run killed on the way leaves that folder behind; the next run removes it (it holds a
   copy of every decoded image), telling it from a live run's by a lock only a live process holds.

A second call with the same inputs (paths, sizes, mtimes) and options returns the existing manifest at once.

Steps 1-2 live in ``select.py`` and step 3 in ``decode.py``; this module runs the steps, assigns labels and
writes the shards and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniembed.core.fsutil import building_dir, drop_dead_builds, file_stamp
from uniembed.data.decode import (
    JPEG_QUALITY,
    Decoded,
    decode_to_staging,
    default_workers,
    progress_bar,
)
from uniembed.data.images import DEFAULT_MAX_PIXELS, RESIZE_MODES
from uniembed.data.report import print_summary
from uniembed.data.select import REASON_SMALL_CLASS, Selection, select_records
from uniembed.data.shards import MANIFEST_NAME
from uniembed.data.sources import DataError, Record, Source, parse_sources

__all__ = [
    "JPEG_QUALITY",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "REASON_SMALL_CLASS",
    "SHARD_PATTERN",
    "EmptyDatasetError",
    "default_workers",
    "prepare",
    "print_summary",
]

MANIFEST_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"


class EmptyDatasetError(DataError):
    """Nothing survived decoding and filtering."""


def _input_hash(sources: list[Source], records: list[Record], options: dict) -> str:
    """Identifies the inputs (files' paths, sizes, mtimes + labels) and options, for the up-to-date check."""
    h = hashlib.sha256()
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(json.dumps([s.describe() + "|" + s.name for s in sources]).encode())
    for r in records:
        stamp = file_stamp(r.path, missing="?")
        h.update(f"{r.path}\t{r.label}\t{r.domain}\t{r.source}\t{stamp}\n".encode())
    return h.hexdigest()


def _existing_manifest(out_dir: Path, input_hash: str) -> dict | None:
    mpath = out_dir / MANIFEST_NAME
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("input_hash") != input_hash:
        return None
    if not all((out_dir / s).is_file() for s in manifest.get("shards", [])):
        return None
    return manifest


def prepare(
    sources: list[str | os.PathLike | Source],
    out_dir: str | os.PathLike,
    resize: str = "longest",
    size: int = 336,
    min_per_class: int = 2,
    cap_per_source: int | None = None,
    seed: int = 0,
    shard_size: int = 1000,
    workers: int | None = None,
    default_domain: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    force: bool = False,
    progress: bool = True,
    console: Any = None,
) -> dict:
    """Build a prepared dataset in ``out_dir`` and return its manifest (see module docstring for the steps).

    ``sources`` are spec strings (``gldv2:/root``, ``/x/labels.csv``, ...) or ``Source`` objects;
    ``default_domain`` is the domain of ``imagefolder`` sources that name none.
    Raises ``DataError`` subclasses for bad input (missing files, nothing left, unknown source kind).
    With ``workers > 1`` decoding runs in spawned processes, so a script calling this needs the usual
    ``if __name__ == "__main__":`` guard (the ``uniembed`` CLI has it).
    """
    from rich.console import Console

    console = console or Console(quiet=not progress)
    t0 = time.perf_counter()
    if resize not in RESIZE_MODES:
        raise DataError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    if shard_size < 1:
        raise DataError("shard_size must be at least 1")
    if not sources:
        raise DataError("no sources given")
    min_per_class = max(1, int(min_per_class))
    workers = default_workers() if workers is None else max(1, int(workers))
    out_dir = Path(out_dir).expanduser().resolve()
    options = {
        "resize": resize,
        "size": size,
        "min_per_class": min_per_class,
        "cap_per_source": cap_per_source,
        "seed": seed,
        "shard_size": shard_size,
        "max_pixels": max_pixels,
        "jpeg_quality": JPEG_QUALITY,
    }
    srcs = parse_sources(list(sources), default_domain=default_domain)
    rng = random.Random(seed)
    selection = select_records(srcs, min_per_class, cap_per_source, rng, console)

    input_hash = _input_hash(srcs, selection.records, options)
    drop_dead_builds(out_dir)  # also when the dataset is up to date
    if not force:
        existing = _existing_manifest(out_dir, input_hash)
        if existing is not None:
            console.print(
                f"[green]Up to date:[/] {out_dir} ({existing['count']} images); use --force to rebuild"
            )
            return existing

    if out_dir.exists():  # refuse before the work, not after it
        _refuse_foreign_dir(out_dir)
    with building_dir(out_dir, check=_refuse_foreign_dir) as tmp:
        manifest = _build(srcs, selection, tmp, options, input_hash, workers, progress, rng)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        from uniembed.data.report import write_report

        write_report(manifest, tmp)
    print_summary(manifest, out_dir, console)
    return manifest


def _refuse_foreign_dir(out_dir: Path) -> None:
    """Only a prepared dataset (or an empty folder) may be replaced by ``prepare``."""
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists()):
        raise DataError(
            f"{out_dir} exists, is not empty and is not a prepared dataset; refusing to replace it"
        )


def _build(
    srcs: list[Source],
    selection: Selection,
    tmp: Path,
    options: dict,
    input_hash: str,
    workers: int,
    progress: bool,
    rng: random.Random,
) -> dict:
    """Steps 3-5 inside the temporary folder ``tmp``; returns the manifest (without ``build_seconds``)."""
    skipped = selection.skipped
    staging = tmp / "staging.bin"
    decoded = decode_to_staging(selection.records, options, staging, workers, progress, skipped)
    labels = _assign_labels(srcs, decoded, skipped, selection.src_stats, options["min_per_class"])
    if not labels.kept:
        reasons = Counter(e["reason"] for e in skipped)
        raise EmptyDatasetError(
            "no images left after decoding and filtering"
            + (f" (skipped: {dict(reasons)})" if reasons else " (the sources list no images)")
        )
    # 5. deterministic shuffle, shards, content hash.
    rng.shuffle(labels.kept)
    tally = _write_shards(labels.kept, labels.label_id, staging, tmp, options, progress)
    staging.unlink()
    shards = sorted(p.name for p in tmp.glob("shard-*.tar"))
    return _manifest(srcs, labels, tally, shards, options, input_hash, skipped)


@dataclass
class _Labels:
    """Step 4: the images that survive the class filter, the label space, and the per-source summary."""

    kept: list[Decoded] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    label_id: dict[str, int] = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)


def _assign_labels(
    srcs: list[Source],
    decoded: list[Decoded],
    skipped: list[dict],
    src_stats: dict[str, dict],
    min_per_class: int,
) -> _Labels:
    """4. post-decode class filter and label ids (per source: sorted names, contiguous ids from the offset).
    Classes that fell under ``min_per_class`` are appended to ``skipped``."""
    by_source: dict[str, list[Decoded]] = defaultdict(list)
    for d in decoded:
        by_source[d.record.source].append(d)
    out = _Labels()
    for s in srcs:
        items = by_source.get(s.name, [])
        counts = Counter(d.record.label for d in items)
        for d in items:
            if counts[d.record.label] < min_per_class:
                skipped.append({"path": d.record.path, "reason": REASON_SMALL_CLASS, "source": s.name})
        items = [d for d in items if counts[d.record.label] >= min_per_class]
        names = sorted({d.record.label for d in items})
        offset_id = len(out.names)
        for n in names:
            out.label_id[n] = len(out.names)
            out.names.append(n)
        out.kept.extend(items)
        n_skipped = sum(1 for e in skipped if e.get("source") == s.name)
        out.sources.append(
            {
                "name": s.name,
                "kind": s.kind,
                "root": str(s.root),
                "options": dict(s.options),
                "label_offset": offset_id,
                "n_labels": len(names),
                "n_images": len(items),
                "n_listed": src_stats[s.name]["listed"],
                "n_skipped": n_skipped,
                "n_capped": src_stats[s.name]["n_capped"],
                "n_missing": s.n_missing,
            }
        )
    return out


@dataclass
class _ShardTally:
    """What writing the shards counted: the content hash and images/classes per domain and source."""

    content_hash: str = ""
    domain_images: Counter = field(default_factory=Counter)
    domain_classes: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    psd_images: Counter = field(default_factory=Counter)
    psd_classes: dict[tuple[str, str], set] = field(default_factory=lambda: defaultdict(set))


def _write_shards(
    kept: list[Decoded], label_id: dict[str, int], staging: Path, tmp: Path, options: dict, progress: bool
) -> _ShardTally:
    """Write ``kept`` (in this order, keys 00000000, ...) from the staging file into tar shards in ``tmp``.

    The content hash covers the options and every sample's key, metadata and JPEG bytes, so it names
    exactly what the shards hold."""
    import webdataset as wds

    content = hashlib.sha256()
    content.update(json.dumps(options, sort_keys=True).encode())
    tally = _ShardTally()
    with open(staging, "rb") as blob, progress_bar(progress) as bar:
        task = bar.add_task("Writing shards", total=len(kept))
        writer = wds.ShardWriter(
            str(tmp / SHARD_PATTERN), maxcount=options["shard_size"], verbose=0, mtime=0.0
        )
        try:
            for idx, d in enumerate(kept):
                r = d.record
                blob.seek(d.offset)
                jpg = blob.read(d.length)
                meta = {
                    "label": r.label,
                    "label_id": label_id[r.label],
                    "domain": r.domain,
                    "source": r.source,
                    "path": r.path,
                }
                meta_bytes = json.dumps(meta, sort_keys=True).encode()
                key = f"{idx:08d}"
                writer.write({"__key__": key, "jpg": jpg, "json": meta_bytes})
                content.update(key.encode() + b"\0" + meta_bytes + b"\0" + hashlib.sha256(jpg).digest())
                tally.domain_images[r.domain] += 1
                tally.domain_classes[r.domain].add(r.label)
                tally.psd_images[(r.source, r.domain)] += 1
                tally.psd_classes[(r.source, r.domain)].add(r.label)
                bar.advance(task)
        finally:
            writer.close()
    tally.content_hash = content.hexdigest()
    return tally


def _manifest(
    srcs: list[Source],
    labels: _Labels,
    tally: _ShardTally,
    shards: list[str],
    options: dict,
    input_hash: str,
    skipped: list[dict],
) -> dict:
    """``manifest.json`` of the finished dataset (format in docs/design.md)."""
    source_order = [x.name for x in srcs]
    return {
        "version": MANIFEST_VERSION,
        "hash": tally.content_hash,
        "input_hash": input_hash,
        "count": len(labels.kept),
        "shards": shards,
        "labels": labels.names,
        "sources": labels.sources,
        "domains": {
            dom: {"images": tally.domain_images[dom], "classes": len(tally.domain_classes[dom])}
            for dom in sorted(tally.domain_images)
        },
        "per_source_domain": [
            {
                "source": s,
                "domain": dom,
                "images": tally.psd_images[(s, dom)],
                "classes": len(tally.psd_classes[(s, dom)]),
            }
            for (s, dom) in sorted(tally.psd_images, key=lambda k: (source_order.index(k[0]), k[1]))
        ],
        "options": options,
        "skipped": skipped,
        "skipped_counts": dict(sorted(Counter(e["reason"] for e in skipped).items())),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
