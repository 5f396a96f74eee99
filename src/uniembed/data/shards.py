"""Read a prepared dataset: ``manifest.json`` + WebDataset tar shards (format in docs/design.md).

Deliberately plain: tar members are read with the standard ``tarfile`` module in stream mode and grouped by
key (the WebDataset convention: ``<key>.<ext>``, members of one sample adjacent). That keeps this reader free
of pipeline machinery, so a DataLoader can hand each worker its own ``shard_paths(...)`` slice and call
``iter_samples(ds, shards=...)``.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniembed.data.sources import DataError

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Sample:
    """One stored image: ``key`` ("00000042"), the RGB JPEG bytes, and the metadata dict
    (label, label_id, domain, source, path)."""

    key: str
    image_bytes: bytes
    meta: dict


def load_manifest(ds_dir: str | Path) -> dict:
    """The dataset's manifest; a clear ``DataError`` when the folder is not a finished prepared dataset."""
    path = Path(ds_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{ds_dir} is not a prepared dataset (no {MANIFEST_NAME}); run `uniembed prepare` first"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e


def shard_paths(ds_dir: str | Path) -> list[Path]:
    """Absolute shard paths in manifest order (sample keys increase along this list)."""
    ds = Path(ds_dir)
    paths = [ds / name for name in load_manifest(ds)["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}")
    return paths


def iter_shard(path: str | Path) -> Iterator[Sample]:
    """Samples of one tar shard in stored order."""
    key: str | None = None
    parts: dict[str, bytes] = {}

    def emit() -> Sample:
        if "jpg" not in parts or "json" not in parts:
            raise DataError(f"{path}: sample {key} lacks a .jpg or .json member (has {sorted(parts)})")
        return Sample(str(key), parts["jpg"], json.loads(parts["json"]))

    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            if key is not None and k != key:
                yield emit()
                parts = {}
            key = k
            f = tar.extractfile(member)
            assert f is not None
            parts[ext] = f.read()
    if key is not None:
        yield emit()


def iter_samples(ds_dir: str | Path, shards: Iterable[str | Path] | None = None) -> Iterator[Sample]:
    """Every sample of the dataset (or of the given ``shards`` only), in key order."""
    for p in shards if shards is not None else shard_paths(ds_dir):
        yield from iter_shard(p)


def decode_sample(sample: Sample, as_tensor: bool = True) -> tuple[Any, dict]:
    """``(uint8 [3,H,W] torch tensor, meta)`` (the model-input contract), or ``(PIL RGB image, meta)``."""
    from uniembed.data.images import load_image

    im = load_image(sample.image_bytes)
    if not as_tensor:
        return im, sample.meta
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(im), sample.meta
