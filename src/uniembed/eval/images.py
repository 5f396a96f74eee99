"""Image streams for the evaluations that embed images with a model: the selected images of a prepared dataset
or a labels.csv, or the images behind a feature dir's rows. Streams are generators (bounded memory) that
record what they yield; undecodable images are skipped and counted."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from uniembed.eval.inputs import EvalError, Items

Keep = Callable[[str, str, str], bool]


def _decode(src: str | bytes, skipped: Counter) -> Any | None:
    """uint8 [3,H,W] tensor of an image file or its bytes; None (counted in ``skipped``) if undecodable."""
    from torchvision.transforms.functional import pil_to_tensor

    from uniembed.data.images import BadImageError, load_image

    try:
        return pil_to_tensor(load_image(src))
    except BadImageError as e:
        skipped[f"bad image: {e.reason}"] += 1
        return None


def _read_csv_rows(data: Path) -> list[tuple[str, str, str]]:
    """(path, label, domain) of a labels.csv (or a folder holding one); an empty domain is ``default``."""
    from uniembed.data.sources import DataError, read_labels_csv

    try:
        rows = read_labels_csv(data, default_domain="default")
    except DataError as e:
        raise EvalError(str(e)) from None
    return [(r.path, r.label, r.domain) for r in rows]


def _dataset_stream(data: Path, keep: Keep, items: Items, skipped: Counter) -> tuple[Iterator[Any], int]:
    from uniembed.data.shards import iter_samples, load_manifest

    man = load_manifest(data)
    items.dataset_dir = str(data)
    total = int(man.get("count", 0)) or None

    def gen() -> Iterator[Any]:
        for s in iter_samples(data):
            m = s.meta
            if not keep(m["label"], m.get("domain", "default"), m.get("path", "")):
                continue
            t = _decode(s.image_bytes, skipped)
            if t is None:
                continue
            items.labels.append(m["label"])
            items.domains.append(m.get("domain", "default"))
            items.paths.append(m.get("path", ""))
            items.keys.append(s.key)
            yield t

    return gen(), total or 0


def _csv_stream(data: Path, keep: Keep, items: Items, skipped: Counter) -> tuple[Iterator[Any], int]:
    rows = [r for r in _read_csv_rows(data) if keep(r[1], r[2], r[0])]

    def gen() -> Iterator[Any]:
        for path, label, domain in rows:
            t = _decode(path, skipped)
            if t is None:
                continue
            items.labels.append(label)
            items.domains.append(domain)
            items.paths.append(path)
            items.keys.append("")
            yield t

    return gen(), len(rows)


def image_stream(
    data: Path, kind: str, keep: Keep, items: Items, skipped: Counter
) -> tuple[Iterator[Any], int]:
    """(generator of uint8 [3,H,W] tensors, expected count) over the selected images of a dataset dir
    (``kind == "dataset"``) or a labels.csv; ``items`` is filled as images are yielded."""
    if kind == "dataset":
        return _dataset_stream(data, keep, items, skipped)
    return _csv_stream(data, keep, items, skipped)


def keyed_stream(
    dataset_dir: str, want: set[str], got: dict[str, int], bad: set[str], skipped: Counter
) -> Iterator[Any]:
    """The images of the prepared dataset whose sample key is in ``want``, in shard order; ``got`` maps each
    yielded key to its output row, ``bad`` collects the keys of undecodable images."""
    from uniembed.data.shards import iter_samples

    for s in iter_samples(dataset_dir):
        if s.key not in want:
            continue
        t = _decode(s.image_bytes, skipped)
        if t is None:
            bad.add(s.key)
            continue
        got[s.key] = len(got)
        yield t
