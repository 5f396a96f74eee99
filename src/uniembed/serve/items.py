"""What goes into an index: image records from ``--images`` sources, and the items.csv table they become.

A source is a labels.csv, a folder holding labels.csv, a prepared shards folder (manifest.json), a plain
folder of images labelled by parent folder name, or one image file (labelled the same way).

Paths are stored absolute (``absolute_path``): a relative ``--images`` argument, a labels.csv row relative
to its CSV and a relative path in a prepared dataset's metadata are all taken from the directory the build
runs in, so results printed, thumbnails rendered and ``--add`` duplicates found from any other directory
name the same files. An older index with relative paths is read against the current directory, as before.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from uniembed.serve.errors import ImageIndexError

ITEM_FIELDS = ["id", "path", "label", "domain", "source"]
#: Optional last items.csv column: an item's extra labels.csv columns as a JSON object (absent in older
#: indexes and in indexes without any; readers treat a missing or empty cell as no metadata).
META_FIELD = "meta"
#: labels.csv columns that become item fields; any other column is kept as item metadata.
LABELS_CSV_COLUMNS = ("path", "label", "domain")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageRecord:
    """One image to index: where it came from (``path``), its label and domain, and how to read it."""

    path: str
    label: str
    domain: str
    source: str
    file: Path | None = None  # read from disk ...
    data: bytes | None = None  # ... or already in memory (shards)
    meta: dict[str, str] | None = None  # the labels.csv columns beyond path,label,domain (filters)


def absolute_path(path: str) -> str:
    """``path`` made absolute against the current directory and normalised (``a/../b`` -> ``b``), without
    following symlinks, so the name a user gave stays recognisable; '' stays ''."""
    return os.path.abspath(path) if path else path


def _read_labels_csv(csv_path: Path) -> list[ImageRecord]:
    """labels.csv rows (path,label[,domain]) via the shared reader; relative paths are relative to the CSV's
    folder, and an empty domain stays empty in items.csv. A row without a path keeps the CSV's folder as its
    path so it is reported as skipped ("empty path") rather than dropped."""
    from uniembed.data.sources import DataError, read_labels_csv

    try:
        rows = read_labels_csv(csv_path, default_domain="")
        extra = _extra_columns(csv_path) if rows else []
    except DataError as e:
        raise ImageIndexError(str(e)) from e
    return [
        ImageRecord(
            path=absolute_path(row.path or str(csv_path.parent)),
            label=row.label,
            domain=row.domain,
            source=absolute_path(str(csv_path)),
            file=Path(absolute_path(row.path)) if row.path else None,
            meta=meta or None,
        )
        for row, meta in zip(rows, extra, strict=True)
    ]


def _extra_columns(csv_path: Path) -> list[dict[str, str]]:
    """Per row of a labels.csv (same order as ``read_labels_csv``), its cells beyond path,label,domain,
    stripped; empty cells are left out."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        return [
            {
                str(k).strip(): str(v).strip()
                for k, v in row.items()
                if k is not None and k not in LABELS_CSV_COLUMNS and isinstance(v, str) and v.strip()
            }
            for row in reader
        ]


def _read_folder(root: Path, domain: str) -> list[ImageRecord]:
    """Every image file under ``root`` (sorted), labelled by its parent folder's name."""
    out = []
    for p in sorted(root.rglob("*")):
        if (
            p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ):
            out.append(ImageRecord(path=str(p), label=p.parent.name, domain=domain, source=str(root), file=p))
    return out


def _iter_shards(ds_dir: Path) -> Iterator[ImageRecord]:
    """Samples of a prepared WebDataset directory (design.md contract), with their original paths."""
    from uniembed.data.shards import iter_samples
    from uniembed.data.sources import DataError

    try:
        for s in iter_samples(ds_dir):
            meta = s.meta or {}
            yield ImageRecord(
                path=absolute_path(str(meta.get("path") or f"{ds_dir}#{s.key}")),
                label=str(meta.get("label", "")),
                domain=str(meta.get("domain", "")),
                source=str(ds_dir),
                data=s.image_bytes,
            )
    except (
        DataError,
        OSError,
        tarfile.TarError,
    ) as e:  # a broken or missing shard: stop with the reason, not a tar traceback
        raise ImageIndexError(f"cannot read prepared dataset {ds_dir}: {e}") from e


def _shards_count(ds_dir: Path) -> int:
    """The sample count a prepared shards folder's manifest announces (for the progress bar)."""
    from uniembed.data.shards import load_manifest
    from uniembed.data.sources import DataError

    try:
        return int(load_manifest(ds_dir).get("count", 0))
    except (DataError, TypeError, ValueError) as e:
        raise ImageIndexError(str(e)) from e


def _source_records(arg: Path, domain: str) -> tuple[Iterable[ImageRecord], int]:
    """The records of one ``--images`` argument and how many there are (paths absolute)."""
    p = Path(absolute_path(str(arg)))
    if p.is_file() and p.suffix.lower() == ".csv":
        recs = _read_labels_csv(p)
    elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
        recs = [ImageRecord(path=str(p), label=p.parent.name, domain=domain, source=str(p), file=p)]
    elif p.is_dir() and (p / "manifest.json").is_file():
        count = _shards_count(p)
        return _iter_shards(p), count
    elif p.is_dir() and (p / "labels.csv").is_file():
        recs = _read_labels_csv(p / "labels.csv")
    elif p.is_dir():
        recs = _read_folder(p, domain)
    else:
        raise ImageIndexError(
            f"--images {arg}: not a labels.csv, an image folder or a prepared shards folder"
        )
    return recs, len(recs)


def open_sources(images: Sequence[str | Path], domain: str = "") -> tuple[Iterator[ImageRecord], int]:
    """Turn ``--images`` arguments into one record stream and its length (for the progress bar).

    Each argument is a labels.csv, a folder holding labels.csv, a prepared shards folder (manifest.json), a
    plain folder of images labelled by parent folder name, or one image file (labelled the same way).
    """
    streams: list[Iterable[ImageRecord]] = []
    total = 0
    for arg in images:
        recs, count = _source_records(Path(arg), domain)
        streams.append(recs)
        total += count

    def chain() -> Iterator[ImageRecord]:
        for s in streams:
            yield from s

    return chain(), total


def read_items(path: Path) -> list[dict[str, str]]:
    """The rows of an index's items.csv (row i describes FAISS id i), as stored (``ImageIndex.load`` checks
    them and resolves relative paths)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def meta_cell(meta: dict[str, str] | None) -> str:
    """An item's metadata as its items.csv ``meta`` cell ('' for none)."""
    return json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else ""


def write_items(path: Path, items: Iterable[dict[str, str]]) -> None:
    """Write an index's items.csv (id,path,label,domain,source, plus ``meta`` when any item has some)."""
    rows = list(items)
    fields = ITEM_FIELDS + [META_FIELD] * any(r.get(META_FIELD) for r in rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
