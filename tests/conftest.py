"""Shared fixtures: the real photo sets beside the checkout, skipped with a clear reason when absent.

Tests live in one folder per stage (tests/data, tests/train, ...), like src/uniembed; shared test helpers
(run_dirs.py) stay here at the top, which is put on sys.path for them."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from uniembed.core.paths import shared_data_dir
from uniembed.data.sources import write_labels_csv

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = shared_data_dir()
NO_SHARED = "../shared/data (real photos) not found beside the checkout; set UNIEMBED_SHARED_DATA to run"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if SHARED is None:
        pytest.skip(NO_SHARED)
    return SHARED


def read_labels(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def small_labels_csv(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real subset as a labels.csv with absolute paths: 4 images each of 6 grocery labels
    (3 packaged, 3 produce) and 6 coil100 objects -> 48 images, 12 labels, 3 domains."""
    out = tmp_path_factory.mktemp("small") / "labels.csv"
    picked: list[dict] = []
    for sub, per_domain in (("grocery_store", {"packaged_goods": 3, "produce": 3}), ("coil100", None)):
        rows = read_labels(shared_data / sub / "labels.csv")
        by_label: dict[str, list[dict]] = {}
        for r in rows:
            by_label.setdefault(r["label"], []).append(r)
        taken: dict[str, int] = {}
        for label in sorted(by_label):
            dom = by_label[label][0]["domain"]
            cap = per_domain[dom] if per_domain else 6
            if taken.get(dom, 0) >= cap:
                continue
            taken[dom] = taken.get(dom, 0) + 1
            for r in by_label[label][:4]:
                picked.append(
                    {"path": str(shared_data / sub / r["path"]), "label": r["label"], "domain": dom}
                )
    write_labels_csv(out, picked)
    return out
