"""FAISS index building, --add, index types, search and the `index` / `search` CLI, with a tiny real model."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from uniembed.cli import app
from uniembed.export.embedder import ModelError, file_fingerprint, load_embedder
from uniembed.serve import assemble as assemble_mod
from uniembed.serve.index import (
    IVF_MAX_NLIST,
    ImageIndex,
    ImageIndexError,
    ModelMismatchError,
    build_index,
    choose_index_type,
    default_params,
    make_faiss_index,
)
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "saved_model.pt", seed=0)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model2") / "saved_model.pt", seed=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 labels x 4 images of mixed sizes + 3 broken files that must be skipped and counted."""
    root = tmp_path_factory.mktemp("imgs")
    make_synthetic_images(root, labels=3, per_label=4)
    (root / "label0" / "empty.png").write_bytes(b"")
    (root / "label1" / "html.jpg").write_text("<html>404 not found</html>")
    good = (root / "label2" / "0.jpg").read_bytes()
    (root / "label2" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def test_embedder_batches_mixed_sizes_like_single_calls(tiny: Path) -> None:
    e = load_embedder(tiny)
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)
        for h, w in [(40, 30), (64, 64), (40, 30), (20, 90), (64, 64)]
    ]
    batched = e.embed_images(arrays, batch_size=2)
    single = np.concatenate([e.embed_images([a]) for a in arrays])
    assert batched.shape == (5, 64) and e.dim == 64
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-4)
    assert e.fingerprint == hashlib.sha256(tiny.read_bytes()).hexdigest()[:16]


def test_embedder_rejects_non_torchscript(tmp_path: Path) -> None:
    bad = tmp_path / "saved_model.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="TorchScript"):
        load_embedder(bad)
    with pytest.raises(ModelError, match="not found"):
        load_embedder(tmp_path / "missing.pt")


def test_build_from_folder_skips_and_counts_bad_images(tiny: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    res = build_index(tiny, [folder], out, batch_size=3, progress=False)
    assert res.count == 12 and res.added == 12 and res.index_type == "flat"
    assert len(res.skipped) == 3
    info = json.loads((out / "index.json").read_text())
    assert info["model"]["fingerprint"] == file_fingerprint(tiny) == res.fingerprint
    assert info["count"] == 12 and info["dim"] == 64 and info["index"]["type"] == "flat"
    # the tiny model has no model.onnx twin and no exposed preprocessor: TorchScript, batches by image size
    assert info["embedder"]["engine"] == "torch" and info["embedder"]["batching"] == "by image size"
    assert res.embedder == info["embedder"] and info["embedder"]["threads"] >= 1
    reasons = {Path(s["path"]).name: s["reason"] for s in info["skipped"]}
    assert reasons.pop("truncated.jpg") in {"truncated", "corrupt image"}
    assert reasons == {"empty.png": "empty file", "html.jpg": "not an image"}
    assert sum(info["skipped_counts"].values()) == 3
    with open(out / "items.csv") as f:
        items = list(csv.DictReader(f))
    assert [int(r["id"]) for r in items] == list(range(12))
    assert {r["label"] for r in items} == {"label0", "label1", "label2"}
    assert all((out / "thumbs" / f"{i}.jpg").is_file() for i in range(12))
    assert not list(tmp_path.glob(".idx.tmp-*")), "temp dir left behind"

    # Every indexed image finds itself first, at distance ~0, in one batched search.
    ix = ImageIndex.load(out)
    from uniembed.data.images import load_image

    vecs = load_embedder(tiny).embed_images([load_image(r["path"]) for r in items])
    hits = ix.search_batch(vecs, k=3)
    assert [h[0].id for h in hits] == list(range(12))
    assert max(h[0].distance for h in hits) < 1e-3
    assert all(h[0].distance <= h[1].distance <= h[2].distance for h in hits)
    # Same-label neighbours: the synthetic labels are well separated even for the tiny model.
    assert sum(h[1].label == h[0].label for h in hits) >= 10


def test_add_appends_without_reembedding_and_checks_model(
    tiny: Path, other_model: Path, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "idx"
    build_index(tiny, [folder / "label0", folder / "label1"], out, progress=False)
    before = ImageIndex.load(out)
    old_vecs = before.index.reconstruct_n(0, len(before))
    assert len(before) == 8

    res = build_index(tiny, [folder], out, add=True, progress=False)
    after = ImageIndex.load(out)
    assert res.added == 4 and len(after) == 12
    np.testing.assert_array_equal(after.index.reconstruct_n(0, 8), old_vecs)  # old rows untouched
    assert {it["label"] for it in after.items[8:]} == {"label2"}
    assert res.skipped_counts.get("already indexed") == 8
    assert (out / "thumbs" / "11.jpg").is_file() and (out / "thumbs" / "0.jpg").is_file()

    snapshot = (out / "index.json").read_bytes()
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        build_index(other_model, [folder], out, add=True, progress=False)
    assert (out / "index.json").read_bytes() == snapshot  # refused before touching anything

    with pytest.raises(ImageIndexError, match="no index"):
        build_index(tiny, [folder], tmp_path / "nothing", add=True, progress=False)


def test_failed_build_leaves_previous_index_intact(
    tiny: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    build_index(tiny, [folder / "label0"], out, progress=False)
    snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("simulated crash while building")

    monkeypatch.setattr(assemble_mod, "make_faiss_index", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        build_index(tiny, [folder], out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == snapshot
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_refuses_to_clobber_other_folders_and_bad_inputs(tiny: Path, folder: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ImageIndexError, match="not an index directory"):
        build_index(tiny, [folder], precious, progress=False)
    with pytest.raises(ImageIndexError, match="not a labels.csv"):
        build_index(tiny, [tmp_path / "missing"], tmp_path / "i", progress=False)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,class\na.jpg,x\n")
    with pytest.raises(ImageIndexError, match="path,label"):
        build_index(tiny, [bad_csv], tmp_path / "i", progress=False)
    only_bad = tmp_path / "onlybad" / "x"
    only_bad.mkdir(parents=True)
    (only_bad / "a.jpg").write_bytes(b"junk")
    with pytest.raises(ImageIndexError, match="no image could be indexed"):
        build_index(tiny, [only_bad.parent], tmp_path / "i", progress=False)
    with pytest.raises(ImageIndexError, match="not an index directory"):
        ImageIndex.load(precious)


def test_auto_type_and_default_params() -> None:
    assert choose_index_type(100) == "flat"
    assert choose_index_type(19_999) == "flat"
    assert choose_index_type(50_000) == "hnsw"
    assert choose_index_type(2_000_000) == "ivf"
    p = default_params("ivf", 1_000_000, 64)
    # 4*sqrt(N) = 4000 lists, capped so k-means training stays affordable; nprobe = nlist/32
    assert p["nlist"] == IVF_MAX_NLIST == 1024 and p["nprobe"] == 32
    assert default_params("ivf", 1000, 64)["nlist"] == 1000 // 39  # enough training points per list
    assert default_params("ivfpq", 100_000, 64)["pq_m"] == 16
    assert default_params("ivfpq", 100_000, 64)["pq_bits"] == 8
    assert default_params("ivfpq", 3_000, 64)["pq_bits"] == 6
    assert default_params("hnsw", 10, 64) == {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64}


@pytest.mark.parametrize("kind,min_recall", [("ivf", 0.95), ("hnsw", 0.95), ("ivfpq", 0.85)])
def test_approximate_indexes_keep_recall(kind: str, min_recall: float) -> None:
    """Default parameters must find the true nearest neighbour in the top 10 for nearly every query."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(60, 64))
    x = centers[rng.integers(0, 60, size=3000)] + 0.35 * rng.normal(size=(3000, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[:300] + 0.05 * rng.normal(size=(300, 64)).astype(np.float32)
    exact = make_faiss_index(x, "flat", {})
    _, truth = exact.search(q, 1)
    params = default_params(kind, len(x), 64)
    approx = make_faiss_index(x, kind, params)
    _, found = approx.search(q, 10)
    recall = float(np.mean([truth[i, 0] in found[i] for i in range(len(q))]))
    assert recall >= min_recall, f"{kind} {params}: 1-recall@10 = {recall:.3f}"


def test_hnsw_and_ivf_through_build_add_and_load(tiny: Path, folder: Path, tmp_path: Path) -> None:
    import faiss

    from uniembed.data.images import load_image

    for kind, params in (("hnsw", {"ef_search": 20}), ("ivf", {"nlist": 2, "nprobe": 2})):
        out = tmp_path / kind
        res = build_index(
            tiny, [folder / "label0", folder / "label1"], out, index_type=kind, params=params, progress=False
        )
        assert res.index_type == kind and res.count == 8
        res = build_index(tiny, [folder], out, add=True, progress=False)  # keeps type and params
        assert res.index_type == kind and res.count == 12
        ix = ImageIndex.load(out)
        assert ix.info["index"]["type"] == kind
        assert ix.info["index"]["params"].items() >= params.items()
        if kind == "hnsw":
            assert ix.index.hnsw.efSearch == 20
        else:
            assert faiss.extract_index_ivf(ix.index).nprobe == 2
        # An added image (id >= 8) is found first when it is the query.
        vec = load_embedder(tiny).embed_images([load_image(ix.items[10]["path"])])
        assert ix.search_batch(vec, 3)[0][0].id == 10
        with pytest.raises(ImageIndexError, match="keeps the existing index type"):
            build_index(tiny, [folder], out, add=True, index_type="flat", progress=False)


def test_build_from_real_labels_csv(tiny: Path, small_labels_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "real"
    res = build_index(tiny, [small_labels_csv], out, progress=False)
    with open(small_labels_csv) as f:
        n_rows = sum(1 for _ in csv.DictReader(f))
    assert res.count == n_rows and not res.skipped
    ix = ImageIndex.load(out)
    assert {it["domain"] for it in ix.items} == {"packaged_goods", "produce", "toys_household_objects"}
    assert len({it["label"] for it in ix.items}) == n_rows // 4  # 4 images per label


def test_build_from_prepared_shards(tiny: Path, folder: Path, tmp_path: Path) -> None:
    prepare_mod = pytest.importorskip("uniembed.data.prepare", reason="data stage not available")
    ds = tmp_path / "ds"
    manifest = prepare_mod.prepare(
        [f"imagefolder:{folder}"], ds, size=64, shard_size=5, progress=False, default_domain="synthetic"
    )
    res = build_index(tiny, [ds], tmp_path / "idx", progress=False)
    assert res.count == manifest["count"] == 12
    ix = ImageIndex.load(tmp_path / "idx")
    assert {it["label"] for it in ix.items} == set(manifest["labels"])
    assert all(Path(it["path"]).is_file() for it in ix.items)  # original paths kept from the shard metadata


def test_cli_index_search_json_and_grid(tiny: Path, other_model: Path, folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "idx"
    r = runner.invoke(app, ["index", "--model", str(tiny), "--images", str(folder), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "12" in r.output and "skipped" in r.output

    query = folder / "label1" / "2.jpg"
    r = runner.invoke(app, ["search", "--index", str(out), str(query), "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res[0]["query"] == str(query)
    assert len(res[0]["results"]) == 3 and res[0]["results"][0]["path"] == str(query)
    assert res[0]["results"][0]["distance"] < 1e-3

    grid = tmp_path / "grid.png"
    r = runner.invoke(
        app,
        ["search", "--index", str(out), str(query), str(folder / "label0" / "1.png"), "--grid", str(grid)],
    )
    assert r.exit_code == 0, r.output
    assert "label1" in r.output
    from PIL import Image

    with Image.open(grid) as im:
        assert im.width > 400 and im.height > 300  # two rows of query + 5 results

    r = runner.invoke(app, ["search", "--index", str(out), str(folder / "label1" / "html.jpg")])
    assert r.exit_code == 1 and "not an image" in r.output
    r = runner.invoke(app, ["search", "--index", str(out), "--model", str(other_model), str(query)])
    assert r.exit_code == 2 and "fingerprint" in r.output
    r = runner.invoke(app, ["search", "--index", str(tmp_path / "nope"), str(query)])
    assert r.exit_code == 2 and "not an index directory" in r.output
    r = runner.invoke(
        app, ["index", "--model", str(tiny), "--images", str(folder), "--out", str(out), "--type", "bogus"]
    )
    assert r.exit_code == 2 and "--type" in r.output
    r = runner.invoke(
        app, ["index", "--model", str(other_model), "--images", str(folder), "--out", str(out), "--add"]
    )
    assert r.exit_code == 2 and "fingerprint" in r.output


def test_single_files_and_duplicates_are_counted(tiny: Path, folder: Path, tmp_path: Path) -> None:
    one = folder / "label2" / "1.png"
    res = build_index(tiny, [one, folder / "label2", one], tmp_path / "idx", progress=False)
    assert res.count == 4  # label2 holds 4 good images (+ truncated.jpg, skipped)
    assert res.skipped_counts["duplicate path"] == 2
    assert ImageIndex.load(tmp_path / "idx").items[0]["path"] == str(one)


def test_library_search_paths_and_bare_source(tiny: Path, folder: Path, tmp_path: Path) -> None:
    from uniembed.data.images import BadImageError
    from uniembed.serve.index import search_paths

    build_index(tiny, str(folder / "label1"), tmp_path / "idx", progress=False)  # one source, not a list
    q = folder / "label1" / "3.png"
    res = search_paths(tmp_path / "idx", [q, folder / "label1" / "0.jpg"], k=2)
    assert len(res) == 2 and [len(r) for r in res] == [2, 2]
    assert res[0][0]["path"] == str(q) and res[0][0]["distance"] < 1e-3
    assert set(res[0][0]) == {"id", "path", "label", "domain", "distance"}
    with pytest.raises(BadImageError, match="html.jpg"):
        search_paths(tmp_path / "idx", [folder / "label1" / "html.jpg"])
