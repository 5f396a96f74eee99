"""Sharded IVF-PQ indexes: shards filled in-process and as Ray tasks give the index a single IVF-PQ with the
same trained quantizers gives, the merged lists are memory-mapped read-only, the folder can move, and
``/search`` answers from it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from uniembed.core.integrity import CHECKSUMS_KEY, checksums
from uniembed.serve.faiss_index import SHARDED_TYPE, apply_search_params, read_faiss_file
from uniembed.serve.sharded import ShardedBuild, build_sharded, empty_trained, extend_sharded
from uniembed.serve.sharded_io import IVFDATA_FILE, ondisk_lists

#: Small enough that training takes a second or two: 32 lists, 16 bytes a vector with 4-bit codes.
PARAMS = {"nlist": 32, "pq_m": 16, "pq_bits": 4, "train_size": 4000}
N, DIM = 20_000, 64


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 200 centres, like embeddings of 200 objects."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    x = centres[rng.integers(0, 200, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(N, DIM)


@pytest.fixture(scope="module")
def local(vectors: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> ShardedBuild:
    return build_sharded(vectors, tmp_path_factory.mktemp("local"), 4, None, PARAMS, False, 400)


@pytest.fixture(scope="module")
def ray_local() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def unsharded(build: ShardedBuild, vectors: np.ndarray) -> Any:
    """A plain in-memory IVF-PQ with the very same trained quantizers, holding every vector."""
    import faiss

    ref = faiss.deserialize_index(empty_trained(build.index))
    ref.add(vectors)
    apply_search_params(ref, SHARDED_TYPE, build.params)
    return ref


def test_sharded_matches_one_unsharded_index(local: ShardedBuild, vectors: np.ndarray) -> None:
    assert local.index.ntotal == N and local.params["shards"] == 4
    q = vectors[::97]
    d, i = local.index.search(q, 5)
    d_ref, i_ref = unsharded(local, vectors).search(q, 5)
    assert np.array_equal(i, i_ref) and np.allclose(d, d_ref)
    assert (i[:, 0] == np.arange(0, N, 97)).mean() > 0.9  # global ids: a stored vector finds its own row


def test_recall_is_measured_and_nprobe_tuned(local: ShardedBuild) -> None:
    r = local.recall
    assert r["k"] == 5 and r["queries"] == 200 and r["tune_queries"] == 200
    assert 0.15 < r["recall"] <= 1.0  # 4-bit codes: coarse; wrong ids would give ~0
    assert local.params["nprobe"] == r["nprobe"] and r["nprobe"] in {s["nprobe"] for s in r["sweep"]}
    assert [s["nprobe"] for s in r["sweep"]][:2] == [1, 2]


def test_lists_are_memory_mapped_and_the_folder_moves(
    local: ShardedBuild, vectors: np.ndarray, tmp_path: Path
) -> None:
    src = Path(ondisk_lists(local.index).filename).parent
    assert sorted(p.name for p in src.iterdir()) == ["index.faiss", IVFDATA_FILE]
    moved = tmp_path / "elsewhere"
    shutil.copytree(src, moved)
    (src / IVFDATA_FILE).rename(src / "hidden")  # the old location must not be used
    try:
        ix = read_faiss_file(moved / "index.faiss", SHARDED_TYPE)
    finally:
        (src / "hidden").rename(src / IVFDATA_FILE)
    lists = ondisk_lists(ix)
    assert lists is not None and lists.read_only and Path(lists.filename) == moved / IVFDATA_FILE
    apply_search_params(ix, SHARDED_TYPE, local.params)
    assert np.array_equal(ix.search(vectors[:50], 5)[1], local.index.search(vectors[:50], 5)[1])


def test_ray_tasks_build_the_same_index(
    ray_local: Any, local: ShardedBuild, vectors: np.ndarray, tmp_path: Path
) -> None:
    built = build_sharded(vectors, tmp_path, 4, "auto", PARAMS, False, 400)
    assert built.params == local.params and built.recall["recall"] == local.recall["recall"]
    assert (tmp_path / IVFDATA_FILE).read_bytes() == (Path(ondisk_lists(local.index).filename).read_bytes())
    assert not (tmp_path / "shards.tmp").exists()


def test_add_continues_ids_without_touching_the_old_folder(
    local: ShardedBuild, vectors: np.ndarray, tmp_path: Path
) -> None:
    extra = clustered(3000, DIM, seed=1)
    old = Path(ondisk_lists(local.index).filename)
    before = old.read_bytes()
    os.link(old, tmp_path / IVFDATA_FILE)  # as an edit links unchanged files: must not be written through
    ix = extend_sharded(local.index, extra, tmp_path, shards=2, progress=False)
    assert ix.ntotal == N + 3000 and old.read_bytes() == before
    apply_search_params(ix, SHARDED_TYPE, local.params)
    ref = unsharded(local, np.concatenate([vectors, extra]))
    assert np.array_equal(ix.search(extra[:40], 5)[1], ref.search(extra[:40], 5)[1])


def _shard_index_dir(index_dir: Path) -> dict[str, Any]:
    """Turn a built (flat) index folder into a sharded one, as ``uniembed index --type ivfpq_sharded`` does:
    same items and vectors, index.faiss + index.ivfdata from ``build_sharded``, index.json updated."""
    import faiss

    flat = faiss.read_index(str(index_dir / "index.faiss"))
    x = flat.reconstruct_n(0, flat.ntotal)
    params = {"nlist": 2, "pq_m": 8, "pq_bits": 4}
    built = build_sharded(x, index_dir, 2, None, params, False, len(x))
    info = json.loads((index_dir / "index.json").read_text())
    info["index"] = {"type": SHARDED_TYPE, "params": built.params, "metric": "l2", "recall": built.recall}
    names = sorted(p.name for p in index_dir.iterdir() if p.is_file() and p.name != "index.json")
    info[CHECKSUMS_KEY] = checksums(index_dir, names)
    (index_dir / "index.json").write_text(json.dumps(info))
    return info


def test_search_endpoint_serves_a_moved_sharded_index(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from uniembed.serve.app import create_app
    from uniembed.serve.index import build_index
    from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

    model = make_tiny_model(tmp_path / "saved_model.pt", seed=0)
    images = make_synthetic_images(tmp_path / "imgs", labels=4, per_label=8)
    build_index(model, [tmp_path / "imgs"], tmp_path / "idx", index_type="flat", progress=False)
    info = _shard_index_dir(tmp_path / "idx")
    assert set(info[CHECKSUMS_KEY]) >= {"index.faiss", IVFDATA_FILE, "items.csv"}
    shutil.move(tmp_path / "idx", tmp_path / "moved")
    app = create_app(tmp_path / "moved", model, warmup=False)
    lists = ondisk_lists(app.state.index.index)
    assert lists is not None and lists.read_only and Path(lists.filename).parent == tmp_path / "moved"
    q = images[9]
    r = TestClient(app).post(
        "/search", files={"image": (q.name, q.read_bytes(), "image/png")}, data={"k": "3"}
    )
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 3 and res[0]["path"] == str(q) and res[0]["label"] == q.parent.name
