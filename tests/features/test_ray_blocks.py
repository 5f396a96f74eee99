"""The cluster extraction's own logic without a cluster: blocks, part files, resume and assembly.

``map_on_ray`` (the only function that talks to Ray) is replaced by an in-process loop that pickles every
row, item and the model factory the way Ray would; the rest of ``extract_ray_with_stats`` runs as it does on
a cluster, and must write exactly the single-process cache. ``test_ray_cluster.py`` does it on a real one."""

from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import uniembed.features.ray_extract as rx
from uniembed.features.extract import extract_files_with_stats, extract_with_stats
from uniembed.features.ray_blocks import Block, file_blocks, part_path, reusable_blocks, shard_blocks

BATCH = 2
OPTS = dict(engine="onnxruntime", batch_size=BATCH, progress=False)
RAY = rx.RayOptions(address="unused", block_batches=2)  # blocks of 4 photos


class _Local:
    """Stand-in for ``map_on_ray``: decode + model in this process, everything through pickle; it can die
    (raise) after ``die_after`` items, like a driver killed mid-run."""

    def __init__(self, die_after: int | None = None):
        self.die_after, self.items, self.rows = die_after, 0, []

    def __call__(self, rows: list, decode: Any, factory: Any, opts: rx.RayOptions) -> Iterator[Any]:
        decode, model = pickle.loads(pickle.dumps(decode)), pickle.loads(pickle.dumps(factory))()
        for row in rows:
            self.rows.append(row)
            for item in decode(pickle.loads(pickle.dumps(row))):
                if self.die_after is not None and self.items >= self.die_after:
                    raise KeyboardInterrupt
                self.items += 1
                yield pickle.loads(pickle.dumps(model(pickle.loads(pickle.dumps(item)))))


@pytest.fixture(scope="module")
def photos(small_labels_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 real photos with a broken file as the 4th: 3 blocks of 4 (the last one short)."""
    root = tmp_path_factory.mktemp("rayblocks")
    with open(small_labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))[::5][:10]
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows.insert(3, dict(rows[2], path=str(root / "broken.jpg")))
    out = root / "labels.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.fixture(scope="module")
def backbone():
    from uniembed.models import create_backbone

    return create_backbone("mobilenetv2")


@pytest.fixture(scope="module")
def single(photos: Path, backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract_files_with_stats(
        [str(photos)], backbone, out_root=tmp_path_factory.mktemp("one"), **OPTS
    ).path


def _same(a: Path, b: Path) -> None:
    assert a.name == b.name
    for name in ("features.npy", "meta.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ia, ib = (json.loads((d / "info.json").read_text()) for d in (a, b))
    assert ia["skipped"] == ib["skipped"] and ia["skipped_counts"] == ib["skipped_counts"]
    assert ia["count"] == ib["count"]


def test_file_blocks_start_on_batch_boundaries() -> None:
    blocks = file_blocks([f"p{i}" for i in range(11)], batch_size=2, block_batches=2)
    assert [(b.index, b.start, len(b.inputs)) for b in blocks] == [(0, 0, 4), (1, 4, 4), (2, 8, 3)]
    assert Block.from_json(blocks[1].to_json()) == blocks[1]
    assert [b.inputs for b in shard_blocks([Path("a.tar"), Path("b.tar")])] == [("a.tar",), ("b.tar",)]


def test_files_on_the_cluster_path_equal_single_process(
    photos: Path, backbone, single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = _Local()
    monkeypatch.setattr(rx, "map_on_ray", local)
    got = rx.extract_ray_with_stats([str(photos)], backbone, ray=RAY, out_root=tmp_path, **OPTS)
    _same(got.path, single)
    assert len(local.rows) == 3 and [s["path"] for s in got.stats.skipped] == [
        str(photos.parent / "broken.jpg")
    ]
    info = json.loads((got.path / "info.json").read_text())
    assert info["ray"]["blocks"] == 3 and info["ray"]["reused_blocks"] == 0
    again = rx.extract_ray_with_stats([str(photos)], backbone, ray=RAY, out_root=tmp_path, **OPTS)
    assert again.stats.cached and len(local.rows) == 3  # a finished cache is returned, nothing recomputed


def test_a_killed_run_resumes_from_its_finished_blocks(
    photos: Path, backbone, single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Block 0 is 2 batches (items); the run dies while block 1 is half done.
    monkeypatch.setattr(rx, "map_on_ray", _Local(die_after=3))
    with pytest.raises(KeyboardInterrupt):
        rx.extract_ray_with_stats([str(photos)], backbone, ray=RAY, out_root=tmp_path, **OPTS)
    parts = next(tmp_path.glob("*/parts"))
    assert sorted(p.name for p in parts.iterdir()) == ["block-000000.npz"]
    rerun = _Local()
    monkeypatch.setattr(rx, "map_on_ray", rerun)
    got = rx.extract_ray_with_stats([str(photos)], backbone, ray=RAY, out_root=tmp_path, **OPTS)
    assert [b.index for b in rerun.rows] == [1, 2]  # block 0 was not recomputed
    _same(got.path, single)
    info = json.loads((got.path / "info.json").read_text())
    assert info["ray"]["reused_blocks"] == 1 and info["resumed_images"] == 4 and not parts.exists()


def test_parts_of_another_feature_function_are_recomputed(tmp_path: Path) -> None:
    import numpy as np

    from uniembed.features.extract import _write_part

    blocks = file_blocks(["a", "b", "c"], batch_size=2, block_batches=1)
    _write_part(
        part_path(tmp_path, 0), np.zeros((1, 4), np.float32), [{"key": "0"}], [], {"fingerprint": "x"}
    )
    done, todo = reusable_blocks(blocks, tmp_path, {"fingerprint": "x"})
    assert list(done) == [0] and [b.index for b in todo] == [1]
    done, todo = reusable_blocks(blocks, tmp_path, {"fingerprint": "y"})
    assert not done and [b.index for b in todo] == [0, 1]


def test_prepared_shards_on_the_cluster_path_equal_single_process(
    photos: Path, backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uniembed.data.prepare import prepare

    ds = tmp_path / "ds"
    prepare([str(photos)], ds, shard_size=4, min_per_class=1, workers=0, progress=False)
    want = extract_with_stats(ds, backbone, out_root=tmp_path / "one", workers=0, **OPTS).path
    monkeypatch.setattr(rx, "map_on_ray", _Local())
    got = rx.extract_ray_with_stats(ds, backbone, ray=RAY, out_root=tmp_path / "ray", **OPTS)
    _same(got.path, want)


def test_ray_is_imported_only_when_used() -> None:
    code = (
        "import sys, uniembed.cli, uniembed.features.commands, uniembed.features.ray_extract;"
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]


def test_bad_ray_options_are_one_line(photos: Path, tmp_path: Path) -> None:
    with pytest.raises(rx.ExtractError, match="--ray-actors"):
        rx.extract_ray_with_stats(
            [str(photos)], "mobilenetv2", ray=rx.RayOptions(actors=0), out_root=tmp_path
        )


def test_an_unreachable_cluster_fails_in_seconds_with_one_line(photos: Path, tmp_path: Path) -> None:
    """Nothing listens at the address: the CLI says so at once (Ray alone retries for minutes)."""
    import socket
    import time

    with socket.socket() as s:  # a port that was free a moment ago, and nothing listens on it now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "uniembed.cli", "extract", str(photos), "-o", str(tmp_path / "f"), "-q"]
        + ["--ray", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and time.monotonic() - t0 < 60, r.stdout + r.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").rglob("features.npy"))


def test_index_embedding_on_the_cluster_path_equals_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``index --ray``: same items, ids, vectors, thumbnails and skip entries (broken files, a duplicate)."""
    from uniembed.serve.index import build_index
    from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

    model = make_tiny_model(tmp_path / "saved_model.pt", seed=0)
    root = tmp_path / "imgs"
    make_synthetic_images(root, labels=3, per_label=4)
    (root / "label1" / "html.jpg").write_text("<html>404</html>")
    images = [root, root / "label0" / "1.png"]  # the single file repeats one of the folder's
    opts = dict(batch_size=2, progress=False, engine="torch")
    local = build_index(model, images, tmp_path / "local", **opts)
    rerun = _Local()
    monkeypatch.setattr(rx, "map_on_ray", rerun)
    ray = dict(address="unused", actors=1)
    got = build_index(model, images, tmp_path / "ray", ray=ray, **opts)
    assert len(rerun.rows) == 2  # 12 images in chunks of 8
    assert got.skipped == local.skipped and {s["reason"] for s in got.skipped} >= {"duplicate path"}
    for name in ("items.csv", "index.faiss"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    thumbs = sorted(p.name for p in (tmp_path / "local" / "thumbs").iterdir())
    assert thumbs == sorted(p.name for p in (tmp_path / "ray" / "thumbs").iterdir()) and len(thumbs) == 12
    assert all(
        (tmp_path / "ray" / "thumbs" / t).read_bytes() == (tmp_path / "local" / "thumbs" / t).read_bytes()
        for t in thumbs
    )


def test_bench_compares_the_two_caches_and_prints_per_worker_throughput(tmp_path: Path) -> None:
    import numpy as np

    from uniembed.features.store import write_feature_set
    from uniembed_lab.bench.common import BenchConfig
    from uniembed_lab.bench.ray_extract import same_features
    from uniembed_lab.bench.report import _measure_note

    rows = [{"key": "0", "path": "a", "label": "x", "label_id": 0, "domain": "d", "source": "s"}]
    feats = np.ones((1, 4), np.float16)
    for name, f in (("a", feats), ("b", feats), ("c", feats * 2)):
        write_feature_set(tmp_path / name, f, rows, {}, ["x"])

    def result(project: str) -> dict:
        details = {"feature_dir": str(tmp_path / project), "images_per_s_per_worker": 10.4, "workers": 2}
        details.update(threads_per_worker=1, engine="onnxruntime", images=1, seconds=1.0, cluster_start_s=2.0)
        return {
            "project": {"details": details},
            "baseline": {"details": {"feature_dir": str(tmp_path / "a")}},
        }

    cfg = BenchConfig.make(quick=True, out=tmp_path)
    same, other = result("b"), result("c")
    same["checks"], other["checks"] = same_features(cfg, same), same_features(cfg, other)
    assert same["checks"] == {"features_identical": True, "max_abs_diff": 0.0}
    assert other["checks"] == {"features_identical": False, "max_abs_diff": 1.0}
    assert "10.4 images/s/worker" in _measure_note(
        cfg, "extract_ray", same
    ) and "byte-identical" in _measure_note(cfg, "extract_ray", same)
    assert "max |diff| 1.0" in _measure_note(cfg, "extract_ray", other)
