"""Indexed image paths are stored absolute, so search results, thumbnails and ``--add`` duplicates name the
same files from any working directory; an index written with relative paths keeps working."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uniembed.cli import app
from uniembed.core.integrity import CHECKSUMS_KEY
from uniembed.serve.index import ImageIndex, build_index
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "saved_model.pt", seed=0)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """``work/photos/label{0,1}/{0..2}.{jpg,png}`` and an empty sibling ``elsewhere/``."""
    make_synthetic_images(tmp_path / "work" / "photos", labels=2, per_label=3)
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "work"


def _search(index: Path, query: Path, k: int = 6) -> list[str]:
    r = CliRunner().invoke(app, ["search", "--index", str(index), str(query), "-k", str(k), "--json"])
    assert r.exit_code == 0, r.output
    return [h["path"] for h in json.loads(r.output)[0]["results"]]


def _rows(items: Path) -> list[dict[str, str]]:
    with open(items, newline="") as f:
        return list(csv.DictReader(f))


def _index(*args: str) -> None:
    r = CliRunner().invoke(app, ["index", *args])
    assert r.exit_code == 0, r.output


def test_build_with_relative_paths_search_from_another_directory(
    tiny: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = work / "photos"
    lists = work / "lists"
    lists.mkdir()
    with open(lists / "labels.csv", "w", newline="") as f:  # rows relative to the CSV's folder
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([[f"../photos/label1/{i}.{'jpg' if i % 2 == 0 else 'png'}", "label1"] for i in range(3)])
    monkeypatch.chdir(work)
    _index("--model", str(tiny), "--images", "photos/label0", "--out", "idx")
    _index("--model", str(tiny), "--images", "lists/labels.csv", "--out", "idx", "--add")

    monkeypatch.chdir(work.parent / "elsewhere")
    paths = _search(work / "idx", photos / "label0" / "1.png")
    assert len(paths) == 6 and paths[0] == str(photos / "label0" / "1.png")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths), paths
    assert {Path(p).parent.name for p in paths} == {"label0", "label1"}
    info = json.loads((work / "idx" / "index.json").read_text())
    assert all(Path(s).is_absolute() for s in info["sources"])

    # --add from elsewhere, naming the same files another way: every one is already indexed.
    res = build_index(
        tiny, ["../work/photos", str(photos / "label1")], work / "idx", add=True, progress=False
    )
    assert res.added == 0 and res.skipped_counts == {"already indexed": 9}


def test_prepared_dataset_with_relative_paths(
    tiny: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uniembed.data.prepare import prepare

    monkeypatch.chdir(work)
    prepare(["imagefolder:photos"], "ds", size=64, shard_size=4, progress=False, default_domain="syn")
    _index("--model", str(tiny), "--images", "ds", "--out", "idx")
    monkeypatch.chdir(work.parent / "elsewhere")
    paths = _search(work / "idx", work / "photos" / "label1" / "0.jpg")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths), paths


def test_thumbnail_rendered_from_the_indexed_file_from_another_directory(
    tiny: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index without stored thumbnails renders /thumb/<id> from the indexed file's path."""
    from fastapi.testclient import TestClient

    from uniembed.serve.app import create_app

    monkeypatch.chdir(work)
    build_index(tiny, ["photos"], "idx", progress=False)
    shutil.rmtree(work / "idx" / "thumbs")
    monkeypatch.chdir(work.parent / "elsewhere")
    client = TestClient(create_app(work / "idx", warmup=False))
    for i in range(6):
        r = client.get(f"/thumb/{i}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", (i, r.text)


def test_an_index_with_relative_paths_keeps_working(
    tiny: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index written before paths were stored absolute (relative to the build directory, no checksums):
    loaded from that directory its paths resolve; --add finds the duplicates and rewrites them absolute."""
    monkeypatch.chdir(work)
    build_index(tiny, ["photos/label0"], "idx", progress=False)
    items = work / "idx" / "items.csv"
    rows = _rows(items)
    for r in rows:
        r["path"] = str(Path(r["path"]).relative_to(work))
    with open(items, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    info = json.loads((work / "idx" / "index.json").read_text())
    del info[CHECKSUMS_KEY]
    (work / "idx" / "index.json").write_text(json.dumps(info))
    assert rows[0]["path"] == "photos/label0/0.jpg"

    ix = ImageIndex.load("idx")
    assert [it["path"] for it in ix.items] == [str(work / r["path"]) for r in rows]
    res = build_index(tiny, ["photos"], "idx", add=True, progress=False)
    assert res.added == 3 and res.skipped_counts == {"already indexed": 3}
    info = json.loads((work / "idx" / "index.json").read_text())
    assert set(info[CHECKSUMS_KEY]) == {"index.faiss", "items.csv"}
    stored = [r["path"] for r in _rows(items)]
    assert len(stored) == 6 and all(Path(p).is_absolute() and Path(p).is_file() for p in stored)


def test_index_files_honour_the_umask(tiny: Path, work: Path) -> None:
    """An index is built under temp names (mkstemp/mkdtemp: 0600/0700); what lands under the final names must
    get the permissions a plain write would, so a service account in the group can read it."""
    import os

    old = os.umask(0o027)
    try:
        build_index(tiny, [work / "photos"], work / "idx", progress=False)
    finally:
        os.umask(old)
    ix = work / "idx"
    assert ix.stat().st_mode & 0o777 == 0o750
    for name in ("index.faiss", "items.csv", "index.json"):
        assert (ix / name).stat().st_mode & 0o777 == 0o640, name
