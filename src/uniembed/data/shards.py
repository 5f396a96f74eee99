"""Read a prepared dataset: ``manifest.json`` + WebDataset tar shards (format in docs/design.md).

Deliberately plain: tar members are read with the standard ``tarfile`` module in stream mode and grouped by
key (the WebDataset convention: ``<key>.<ext>``, members of one sample adjacent). That keeps this reader free
of pipeline machinery, so a DataLoader can hand each worker its own ``shard_paths(...)`` slice and call
``iter_samples(ds, shards=...)``.
"""

from __future__ import annotations

import json
import lzma
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniembed.core.integrity import DamagedFileError, read_json_object, reading
from uniembed.data.sources import DataError

MANIFEST_NAME = "manifest.json"
#: What the tar reader raises on a truncated or garbled shard (stream mode detects the compression itself).
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError)


class DamagedDataError(DataError, DamagedFileError):
    """A prepared dataset's manifest or shard is missing, truncated or garbled: prepare it again."""


def reprepare_hint(ds_dir: str | Path) -> str:
    """What to do about a damaged prepared dataset."""
    return f"prepare it again with `uniembed prepare SOURCES --out {ds_dir} --force`"


@dataclass(frozen=True)
class Sample:
    """One stored image: ``key`` ("00000042"), the RGB JPEG bytes, and the metadata dict
    (label, label_id, domain, source, path)."""

    key: str
    image_bytes: bytes
    meta: dict


def load_manifest(ds_dir: str | Path) -> dict:
    """The dataset's manifest; a clear ``DataError`` when the folder is not a finished prepared dataset, a
    ``DamagedDataError`` (one line, what to do) when the manifest is unreadable or lacks its shard list."""
    path = Path(ds_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{ds_dir} is not a prepared dataset (no {MANIFEST_NAME}); run `uniembed prepare` first"
        )
    manifest = read_json_object(path, reprepare_hint(ds_dir), DamagedDataError)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
        raise DamagedDataError(f"{path} is damaged (no valid 'shards' list); {reprepare_hint(ds_dir)}")
    return manifest


def shard_paths(ds_dir: str | Path) -> list[Path]:
    """Absolute shard paths in manifest order (sample keys increase along this list)."""
    ds = Path(ds_dir)
    paths = [ds / name for name in load_manifest(ds)["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DamagedDataError(
            f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}; "
            f"{reprepare_hint(ds)}"
        )
    return paths


def _sample(path: str | Path, key: str | None, parts: dict[str, bytes]) -> Sample:
    """One sample from its tar members; its .json must be an object."""
    if "jpg" not in parts or "json" not in parts:
        raise DataError(f"{path}: sample {key} lacks a .jpg or .json member (has {sorted(parts)})")
    meta = json.loads(parts["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"sample {key}: metadata is {type(meta).__name__}, not an object")
    return Sample(str(key), parts["jpg"], meta)


def _members(path: str | Path) -> Iterator[tuple[str, str, bytes]]:
    """``(key, extension, bytes)`` of each file member of a tar shard, in stored order."""
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            f = tar.extractfile(member)
            assert f is not None
            yield k, ext, f.read()


def iter_shard(path: str | Path) -> Iterator[Sample]:
    """Samples of one tar shard in stored order; a truncated or garbled shard raises ``DamagedDataError``
    naming it (samples before the damage have been yielded by then)."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    fix = reprepare_hint(Path(path).parent)
    with reading(path, fix, DamagedDataError, what="is a damaged shard", catch=_TAR_ERRORS):
        for k, ext, data in _members(path):
            if key is not None and k != key:
                yield _sample(path, key, parts)
                parts = {}
            key = k
            parts[ext] = data
        if key is not None:
            yield _sample(path, key, parts)


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
