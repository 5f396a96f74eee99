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
   a finished one.

A second call with the same inputs (paths, sizes, mtimes) and options returns the existing manifest at once.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniembed.core.fsutil import building_dir, file_stamp
from uniembed.data.images import (
    DEFAULT_MAX_PIXELS,
    RESIZE_MODES,
    BadImageError,
    encode_jpeg,
    load_image,
    resize_image,
)
from uniembed.data.sources import DataError, Record, Source, parse_sources

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
JPEG_QUALITY = 95

REASON_SMALL_CLASS = "class below min_per_class"


class EmptyDatasetError(DataError):
    """Nothing survived decoding and filtering."""


@dataclass
class _Decoded:
    record: Record
    offset: int
    length: int
    width: int
    height: int


def _decode_job(job: tuple[int, str, str, int, int]) -> tuple[int, bytes | None, str, str, int, int]:
    """Worker: decode, resize and re-encode one file. Returns (index, jpeg or None, reason, detail, w, h)."""
    idx, path, resize, size, max_pixels = job
    try:
        draft = size if resize != "none" else None
        im = resize_image(load_image(path, max_pixels=max_pixels, draft_size=draft), resize, size)
        data = encode_jpeg(im, JPEG_QUALITY)
        return idx, data, "", "", im.width, im.height
    except BadImageError as e:
        return idx, None, e.reason, e.detail[:200], 0, 0
    except Exception as e:  # noqa: BLE001 - one pathological file must not kill a multi-hour job
        return idx, None, "corrupt image", f"{type(e).__name__}: {e}"[:200], 0, 0


def _iter_decoded(
    jobs: list[tuple[int, str, str, int, int]], workers: int
) -> Iterator[tuple[int, bytes | None, str, str, int, int]]:
    """Decode in a spawn-context process pool (safe even when the caller has imported torch and its threads);
    small jobs run in-process where pool start-up would cost more than it saves."""
    if workers <= 1 or len(jobs) < 64:
        for j in jobs:
            yield _decode_job(j)
        return
    ctx = mp.get_context("spawn")
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_decode_job, jobs, chunksize=chunk)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def _group_by_label(records: Iterable[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.label].append(r)
    return groups


def _cap_whole_classes(records: list[Record], cap: int, rng: random.Random) -> tuple[list[Record], int]:
    """Keep whole classes, visited in seeded random order, while they fit under ``cap`` images."""
    groups = _group_by_label(records)
    labels = sorted(groups)
    rng.shuffle(labels)
    keep: set[str] = set()
    total = 0
    for lab in labels:
        n = len(groups[lab])
        if total + n <= cap:
            keep.add(lab)
            total += n
        if total >= cap:
            break
    kept = [r for r in records if r.label in keep]
    return kept, len(records) - len(kept)


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


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


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

    # 1-2. list, pre-filter impossible classes, cap whole classes per source.
    skipped: list[dict] = []
    selected: list[Record] = []
    src_stats: dict[str, dict] = {}
    label_owner: dict[str, str] = {}
    with console.status("Listing sources..."):
        for s in srcs:
            recs = s.records()
            for lab in {r.label for r in recs}:
                other = label_owner.setdefault(lab, s.name)
                if other != s.name:
                    raise DataError(
                        f"label {lab!r} occurs in sources {other!r} and {s.name!r}; labels must be unique "
                        "across sources (give one of them prefix=... or name=...)"
                    )
            groups = _group_by_label(recs)
            small = {lab for lab, rs in groups.items() if len(rs) < min_per_class}
            for r in recs:
                if r.label in small:
                    skipped.append({"path": r.path, "reason": REASON_SMALL_CLASS, "source": s.name})
            recs = [r for r in recs if r.label not in small]
            n_capped = 0
            if cap_per_source is not None and len(recs) > cap_per_source:
                recs, n_capped = _cap_whole_classes(recs, int(cap_per_source), rng)
            src_stats[s.name] = {"listed": sum(len(v) for v in groups.values()), "n_capped": n_capped}
            selected.extend(recs)
            console.print(
                f"  source [bold]{s.name}[/] ({s.kind}, {s.root}): {src_stats[s.name]['listed']} listed"
                + (f", {s.n_missing} listed but missing on disk" if s.n_missing else "")
                + (f", {n_capped} over the cap" if n_capped else "")
            )

    input_hash = _input_hash(srcs, selected, options)
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
        manifest = _build(
            srcs, selected, skipped, src_stats, tmp, options, input_hash, workers, progress, console, rng
        )
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
    selected: list[Record],
    skipped: list[dict],
    src_stats: dict[str, dict],
    tmp: Path,
    options: dict,
    input_hash: str,
    workers: int,
    progress: bool,
    console: Any,
    rng: random.Random,
) -> dict:
    import webdataset as wds

    # 3. decode into a staging file.
    jobs = [
        (i, r.path, options["resize"], options["size"], options["max_pixels"]) for i, r in enumerate(selected)
    ]
    decoded: list[_Decoded] = []
    staging = tmp / "staging.bin"
    offset = 0
    with open(staging, "wb") as blob, _progress(progress) as bar:
        task = bar.add_task(f"Decoding ({workers} workers)", total=len(jobs))
        for idx, data, reason, detail, w, h in _iter_decoded(jobs, workers):
            r = selected[idx]
            if data is None:
                entry = {"path": r.path, "reason": reason, "source": r.source}
                if detail:
                    entry["detail"] = detail
                skipped.append(entry)
            else:
                blob.write(data)
                decoded.append(_Decoded(r, offset, len(data), w, h))
                offset += len(data)
            bar.advance(task)
    decoded.sort(key=lambda d: d.offset)  # imap preserves order already; this makes it explicit

    # 4. post-decode class filter and label ids (per source: sorted names, contiguous ids from the offset).
    by_source: dict[str, list[_Decoded]] = defaultdict(list)
    for d in decoded:
        by_source[d.record.source].append(d)
    labels: list[str] = []
    label_id: dict[str, int] = {}
    kept: list[_Decoded] = []
    sources_out: list[dict] = []
    for s in srcs:
        items = by_source.get(s.name, [])
        counts = Counter(d.record.label for d in items)
        for d in items:
            if counts[d.record.label] < options["min_per_class"]:
                skipped.append({"path": d.record.path, "reason": REASON_SMALL_CLASS, "source": s.name})
        items = [d for d in items if counts[d.record.label] >= options["min_per_class"]]
        names = sorted({d.record.label for d in items})
        offset_id = len(labels)
        for n in names:
            label_id[n] = len(labels)
            labels.append(n)
        kept.extend(items)
        n_skipped = sum(1 for e in skipped if e.get("source") == s.name)
        sources_out.append(
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
    if not kept:
        reasons = Counter(e["reason"] for e in skipped)
        raise EmptyDatasetError(
            "no images left after decoding and filtering"
            + (f" (skipped: {dict(reasons)})" if reasons else " (the sources list no images)")
        )

    # 5. deterministic shuffle, shards, content hash.
    rng.shuffle(kept)
    content = hashlib.sha256()
    content.update(json.dumps(options, sort_keys=True).encode())
    per_domain_images: Counter = Counter()
    per_domain_classes: dict[str, set] = defaultdict(set)
    psd_images: Counter = Counter()
    psd_classes: dict[tuple[str, str], set] = defaultdict(set)
    with open(staging, "rb") as blob, _progress(progress) as bar:
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
                per_domain_images[r.domain] += 1
                per_domain_classes[r.domain].add(r.label)
                psd_images[(r.source, r.domain)] += 1
                psd_classes[(r.source, r.domain)].add(r.label)
                bar.advance(task)
        finally:
            writer.close()
    staging.unlink()
    shards = sorted(p.name for p in tmp.glob("shard-*.tar"))

    return {
        "version": MANIFEST_VERSION,
        "hash": content.hexdigest(),
        "input_hash": input_hash,
        "count": len(kept),
        "shards": shards,
        "labels": labels,
        "sources": sources_out,
        "domains": {
            dom: {"images": per_domain_images[dom], "classes": len(per_domain_classes[dom])}
            for dom in sorted(per_domain_images)
        },
        "per_source_domain": [
            {
                "source": s,
                "domain": dom,
                "images": psd_images[(s, dom)],
                "classes": len(psd_classes[(s, dom)]),
            }
            for (s, dom) in sorted(psd_images, key=lambda k: ([x.name for x in srcs].index(k[0]), k[1]))
        ],
        "options": options,
        "skipped": skipped,
        "skipped_counts": dict(sorted(Counter(e["reason"] for e in skipped).items())),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def print_summary(manifest: dict, out_dir: Path, console: Any) -> None:
    """A short table: images, labels, domains, skipped by reason, and where the files are."""
    from rich.table import Table

    table = Table(title=f"Prepared dataset {out_dir}", show_lines=False)
    for col in ("source", "domain", "images", "classes"):
        table.add_column(col, justify="right" if col in ("images", "classes") else "left")
    for row in manifest["per_source_domain"]:
        table.add_row(row["source"], row["domain"], str(row["images"]), str(row["classes"]))
    table.add_row(
        "[bold]total",
        f"{len(manifest['domains'])} domains",
        f"[bold]{manifest['count']}",
        f"[bold]{len(manifest['labels'])}",
    )
    console.print(table)
    if manifest["skipped_counts"]:
        parts = ", ".join(f"{k}: {v}" for k, v in manifest["skipped_counts"].items())
        console.print(f"Skipped {len(manifest['skipped'])} files ({parts}); see 'skipped' in the manifest.")
    else:
        console.print("Skipped 0 files.")
    console.print(
        f"{len(manifest['shards'])} shard(s), manifest {out_dir / MANIFEST_NAME}, "
        f"report {out_dir / 'report.png'} + report.md, content hash {manifest['hash'][:12]}"
        + (f", built in {manifest['build_seconds']} s" if "build_seconds" in manifest else "")
    )
