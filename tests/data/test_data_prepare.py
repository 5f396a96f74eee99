"""``prepare`` end to end: real photos -> shards + manifest + report; filters, caps, determinism, CLI."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from uniembed.data.commands import register
from uniembed.data.prepare import REASON_SMALL_CLASS, EmptyDatasetError, prepare
from uniembed.data.shards import Sample, decode_sample, iter_samples, load_manifest, shard_paths
from uniembed.data.sources import DataError


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def write_labels(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "domain"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def real_ds(small_labels_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("real") / "ds"
    manifest = prepare([small_labels_csv], out, shard_size=30, workers=2, seed=3, progress=False)
    return out, manifest


def test_real_photos_manifest(real_ds: tuple[Path, dict], small_labels_csv: Path) -> None:
    out, m = real_ds
    assert m == load_manifest(out)
    assert m["version"] == 1 and len(m["hash"]) == 64
    # conftest: 4 images each of 6 grocery labels (3 packaged, 3 produce) and 6 coil100 objects.
    assert m["count"] == 48 and len(m["labels"]) == 12
    assert m["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert set(m["domains"]) == {"packaged_goods", "produce", "toys_household_objects"}
    assert m["domains"]["toys_household_objects"] == {"images": 24, "classes": 6}
    assert m["domains"]["produce"] == {"images": 12, "classes": 3}
    assert sum(d["images"] for d in m["domains"].values()) == 48
    assert sum(r["images"] for r in m["per_source_domain"]) == 48
    (src,) = m["sources"]
    assert src["label_offset"] == 0 and src["n_labels"] == 12 and src["n_images"] == 48
    assert m["skipped"] == [] and m["skipped_counts"] == {}
    assert m["options"]["size"] == 336 and m["options"]["seed"] == 3
    assert (out / "report.png").stat().st_size > 5000
    md = (out / "report.md").read_text()
    src_name = small_labels_csv.parent.name  # a labels.csv source is named after its folder
    assert f"| {src_name} | toys_household_objects | 24 | 6 |" in md
    assert not list(out.parent.glob(".ds.*")), "temporary folders left behind"


def test_real_photos_shards_readable(real_ds: tuple[Path, dict], small_labels_csv: Path) -> None:
    out, m = real_ds
    samples = list(iter_samples(out))
    assert [s.key for s in samples] == [f"{i:08d}" for i in range(48)]
    with open(small_labels_csv) as f:
        expected = {r["path"]: (r["label"], r["domain"]) for r in csv.DictReader(f)}
    assert {s.meta["path"] for s in samples} == set(expected)
    for s in samples:
        assert m["labels"][s.meta["label_id"]] == s.meta["label"]
        assert expected[s.meta["path"]] == (s.meta["label"], s.meta["domain"])
        assert s.meta["source"] == small_labels_csv.parent.name
    # Labels get ids 0..11 and each id has its 4 images.
    assert Counter(s.meta["label_id"] for s in samples) == {i: 4 for i in range(12)}
    tensor, meta = decode_sample(samples[0])
    assert tensor.dtype.__str__() == "torch.uint8" and tensor.shape[0] == 3
    assert max(tensor.shape[1:]) <= 336
    im, _ = decode_sample(samples[0], as_tensor=False)
    assert im.mode == "RGB" and (im.height, im.width) == tuple(tensor.shape[1:])
    # The tar members follow the WebDataset naming of docs/design.md.
    with tarfile.open(shard_paths(out)[0]) as tar:
        names = tar.getnames()
    assert names[:2] == ["00000000.jpg", "00000000.json"]
    # A subset of shards can be read on its own (how DataLoader workers split the work).
    part = list(iter_samples(out, shards=shard_paths(out)[1:2]))
    assert [s.key for s in part] == [f"{i:08d}" for i in range(30, 48)]


def test_same_seed_same_dataset_and_up_to_date(
    real_ds: tuple[Path, dict], small_labels_csv: Path, tmp_path: Path
) -> None:
    out, m = real_ds
    again = prepare([small_labels_csv], tmp_path / "again", shard_size=30, workers=1, seed=3, progress=False)
    assert again["hash"] == m["hash"]
    order = [s.meta["path"] for s in iter_samples(out)]
    assert [s.meta["path"] for s in iter_samples(tmp_path / "again")] == order
    other = prepare([small_labels_csv], tmp_path / "other", shard_size=30, workers=1, seed=4, progress=False)
    assert other["hash"] != m["hash"]
    assert [s.meta["path"] for s in iter_samples(tmp_path / "other")] != order
    # Same inputs and options again: the existing dataset is returned untouched.
    mtime = (out / "manifest.json").stat().st_mtime_ns
    same = prepare([small_labels_csv], out, shard_size=30, workers=2, seed=3, progress=False)
    assert same == m and (out / "manifest.json").stat().st_mtime_ns == mtime


def test_bad_images_skipped_and_small_classes_filtered(tmp_path: Path) -> None:
    d = tmp_path / "raw"
    rows = []
    for i in range(3):
        rows.append((str(write_jpeg(d / f"a{i}.jpg", i)), "a", "dom1"))
    for i in range(2):
        rows.append((str(write_jpeg(d / f"b{i}.jpg", 10 + i)), "b", "dom1"))
    (d / "b_empty.jpg").write_bytes(b"")
    (d / "b_text.jpg").write_text("not an image")
    rows += [(str(d / "b_empty.jpg"), "b", "dom1"), (str(d / "b_text.jpg"), "b", "dom1")]
    rows.append((str(write_jpeg(d / "c0.jpg", 20)), "c", "dom2"))  # a singleton class
    for i in range(3):
        rows.append((str(write_jpeg(d / f"e{i}.jpg", 30 + i, (500, 250))), "e", "dom2"))
    csv_path = write_labels(d / "labels.csv", rows)
    m = prepare([csv_path], tmp_path / "ds", min_per_class=3, workers=1, progress=False, size=100)
    # b: 4 listed (passes the pre-check), 2 decodable -> dropped after decoding; c: dropped before decoding.
    assert m["labels"] == ["a", "e"] and m["count"] == 6
    reasons = {Path(e["path"]).name: e["reason"] for e in m["skipped"]}
    assert reasons == {
        "b_empty.jpg": "empty file",
        "b_text.jpg": "not an image",
        "b0.jpg": REASON_SMALL_CLASS,
        "b1.jpg": REASON_SMALL_CLASS,
        "c0.jpg": REASON_SMALL_CLASS,
    }
    assert m["skipped_counts"] == {"empty file": 1, "not an image": 1, REASON_SMALL_CLASS: 3}
    assert m["sources"][0]["n_skipped"] == 5
    sizes = {
        s.meta["label"]: Image.open(io.BytesIO(s.image_bytes)).size for s in iter_samples(tmp_path / "ds")
    }
    assert sizes["e"] == (100, 50) and sizes["a"] == (40, 30)  # longest side 100, aspect kept, no upscaling
    assert "empty file | 1" in (tmp_path / "ds" / "report.md").read_text()


def test_merge_sources_offsets_cap_and_square(tmp_path: Path) -> None:
    toys = tmp_path / "toys"
    for c in range(3):
        for i in range(2):
            write_jpeg(toys / f"cls{c}" / f"{i}.jpg", c * 10 + i)
    omni = tmp_path / "omni"
    for realm in ("aves", "device"):
        for c in range(4):
            for i in range(3):
                write_jpeg(omni / realm / f"k{c}" / f"{i}.jpg", 100 + c * 10 + i)
    m = prepare(
        [f"imagefolder:{toys}", f"omnibenchmark:{omni}"],
        tmp_path / "ds",
        resize="square",
        size=32,
        cap_per_source=7,
        default_domain="household",
        workers=1,
        progress=False,
    )
    srcs = {s["name"]: s for s in m["sources"]}
    # Whole classes under the cap: toys has 3 classes x 2 (6 <= 7, all kept); omni 8 x 3 -> 2 classes (6).
    assert srcs["toys"]["n_images"] == 6 and srcs["toys"]["n_capped"] == 0
    assert srcs["omnibenchmark"]["n_images"] == 6 and srcs["omnibenchmark"]["n_capped"] == 18
    assert srcs["toys"]["label_offset"] == 0 and srcs["omnibenchmark"]["label_offset"] == 3
    assert m["labels"][:3] == ["toys:cls0", "toys:cls1", "toys:cls2"]
    assert all(lab.startswith("omnibenchmark:") for lab in m["labels"][3:])
    samples = list(iter_samples(tmp_path / "ds"))
    assert {Image.open(io.BytesIO(s.image_bytes)).size for s in samples} == {(32, 32)}
    assert {s.meta["domain"] for s in samples if s.meta["source"] == "toys"} == {"household"}
    for s in samples:
        lo = srcs[s.meta["source"]]["label_offset"]
        assert lo <= s.meta["label_id"] < lo + srcs[s.meta["source"]]["n_labels"]


def test_label_collision_and_empty_and_foreign_dir(tmp_path: Path) -> None:
    a = write_labels(tmp_path / "a" / "labels.csv", [(str(write_jpeg(tmp_path / "x.jpg")), "same", "d")] * 2)
    b = write_labels(tmp_path / "b" / "labels.csv", [(str(write_jpeg(tmp_path / "y.jpg")), "same", "d")] * 2)
    with pytest.raises(DataError, match="occurs in sources"):
        prepare([a, b], tmp_path / "ds", workers=1, progress=False)
    (tmp_path / "bad.jpg").write_bytes(b"")
    bad = write_labels(tmp_path / "c" / "labels.csv", [(str(tmp_path / "bad.jpg"), "l", "d")] * 2)
    with pytest.raises(EmptyDatasetError, match="empty file"):
        prepare([bad], tmp_path / "ds", workers=1, progress=False)
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to replace"):
        prepare([a], foreign, workers=1, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _main() -> None:
        """uniembed (data stage)."""

    register(app)
    return app


def test_cli_prepare_and_missing_files_error(tmp_path: Path) -> None:
    rows = [(f"img/{i}.jpg", f"l{i % 2}", "d") for i in range(4)]
    for i in range(4):
        write_jpeg(tmp_path / "img" / f"{i}.jpg", i)
    csv_path = write_labels(tmp_path / "labels.csv", rows)
    runner = CliRunner()
    res = runner.invoke(
        _cli(), ["prepare", str(csv_path), "--out", str(tmp_path / "ds"), "--size", "32", "-j", "1"]
    )
    assert res.exit_code == 0, res.output
    assert "Skipped 0 files" in res.output
    assert load_manifest(tmp_path / "ds")["count"] == 4

    missing = write_labels(tmp_path / "m" / "labels.csv", rows)  # img/ does not exist beside this CSV
    res = runner.invoke(_cli(), ["prepare", str(missing), "--out", str(tmp_path / "ds2")])
    assert res.exit_code == 2
    assert "4 file(s) named in" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "ds2").exists()

    res = runner.invoke(_cli(), ["prepare", "--help"])
    assert res.exit_code == 0
    for opt in (
        "--resize",
        "--size",
        "--min-per-class",
        "--cap-per-source",
        "--seed",
        "--shard-size",
        "--workers",
    ):
        assert opt in res.output


def test_reader_rejects_non_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a prepared dataset"):
        list(iter_samples(tmp_path))
    s = Sample("00000001", b"", {})
    with pytest.raises(Exception, match="empty file"):
        decode_sample(s)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": ["shard-000000.tar"]}))
    with pytest.raises(DataError, match="missing"):
        shard_paths(tmp_path)
