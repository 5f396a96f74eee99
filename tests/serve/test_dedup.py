"""`uniembed dedup`: range search + components, exact vs near groups, keep policies, outputs, CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from uniembed.serve.dedup import (
    components,
    duplicate_groups,
    exact_groups,
    index_vectors,
    near_groups,
    range_pairs,
)
from uniembed.serve.dedup_cli import register
from uniembed.serve.dedup_files import FileFacts, choose_keeper
from uniembed.serve.dedup_run import dedup_index, dedup_source
from uniembed.serve.store import ImageIndex
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

#: Tiny-model distances: a 2x upscale of an image ~0.006, other images of one synthetic label >= 0.05.
T = 0.03


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dedup")
    model = make_tiny_model(root / "saved_model.pt", seed=0)
    imgs = make_synthetic_images(root / "imgs", labels=3, per_label=4)
    folder = root / "imgs" / "label0"
    shutil.copy(imgs[0], folder / "copy.jpg")  # same bytes as 0.jpg
    with Image.open(imgs[1]) as im:  # 1.png, 80x80 -> a 160x160 JPEG of the same picture
        im.convert("RGB").resize((160, 160)).save(folder / "big.jpg", quality=95)
    (folder / "broken.jpg").write_bytes(b"this is not an image")
    os.utime(folder / "big.jpg", (1_000_000, 1_000_000))  # the oldest file of its group
    report = dedup_source(
        root / "imgs", root / "out", model=model, threshold=T, progress=False, index_out=root / "idx"
    )
    return {"root": root, "model": model, "folder": folder, "report": report, "index": root / "idx"}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def brute_pairs(x: np.ndarray, t: float) -> set[tuple[int, int]]:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 0))
    i, j = np.nonzero(np.triu(d <= t, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def test_range_search_finds_exactly_the_close_pairs_in_any_batch_size() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[100:110] = x[0] + 0.05 * rng.normal(size=(10, 16))  # a planted cluster
    want = brute_pairs(x, 0.3)
    assert len(want) >= 45
    for batch in (7, 4096):
        i, j, d = range_pairs(x, 0.3, batch=batch)
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == want
        assert (d <= 0.3 + 1e-5).all() and (i < j).all()


def test_groups_are_transitive_components_largest_first() -> None:
    e = np.eye(4, dtype=np.float32)
    x = np.stack([e[0], e[0] + 0.1 * e[1], e[0] + 0.2 * e[1], e[2], e[2] + 0.05 * e[3], e[3]])
    # 0-1 and 1-2 are within 0.15 but 0-2 is not: one chained group; 3-4 a pair; 5 alone.
    assert duplicate_groups(x, 0.15) == [[0, 1, 2], [3, 4]]
    g = near_groups(x, 0.15)[0]
    assert 0.15 < g.max_distance < 0.25 and 0 < g.mean_distance < g.max_distance
    assert duplicate_groups(x, 0.0) == []
    assert components(5, np.array([3]), np.array([1])) == [[1, 3]]


def test_exact_groups_hash_bytes_and_count_unreadable(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"same")
    (tmp_path / "b").write_bytes(b"same")
    (tmp_path / "c").write_bytes(b"diff")
    groups, bad = exact_groups([tmp_path / "a", tmp_path / "c", tmp_path / "missing", tmp_path / "b"])
    assert groups == [[0, 3]]
    assert list(bad) == [2]


def test_keep_policies() -> None:
    facts = {
        0: FileFacts(10, 10, 500, 30.0),
        1: FileFacts(20, 20, 100, 20.0),
        2: FileFacts(20, 20, 900, 20.0),
        3: FileFacts(None, None, None, None),
    }
    assert choose_keeper([0, 1, 2, 3], facts, "largest") == 2  # most pixels, then bytes
    assert choose_keeper([0, 1, 2, 3], facts, "oldest") == 1  # tie on mtime: source order
    assert choose_keeper([3, 2, 1], facts, "first") == 1
    with pytest.raises(ValueError):
        choose_keeper([0], facts, "newest")


def test_folder_report_separates_exact_and_near(env: dict) -> None:
    out = env["root"] / "out"
    s = json.loads((out / "summary.json").read_text())
    assert s["images"] == 14 and s["skipped"] == 1 and s["threshold"] == T
    assert (s["exact_groups"], s["near_groups"], s["would_delete"]) == (1, 1, 2)
    rows = read_csv(out / "groups.csv")
    assert list(rows[0]) == ["group", "kind", "id", "path", "width", "height", "bytes", "mtime", "keep"]
    by_kind = {k: sorted(Path(r["path"]).name for r in rows if r["kind"] == k) for k in ("exact", "near")}
    assert by_kind == {"exact": ["0.jpg", "copy.jpg"], "near": ["1.png", "big.jpg"]}
    near = next(g for g in s["groups"] if g["kind"] == "near")
    assert 0 < near["max_distance"] <= T
    assert (out / "contact_sheet.png").stat().st_size > 1000
    assert not (out / "to_delete.txt").exists()  # only with --keep
    assert env["report"].index_dir == str(env["index"])


def test_keep_writes_to_delete_and_deletes_nothing(env: dict, tmp_path: Path) -> None:
    index = ImageIndex.load(env["index"])
    folder = env["folder"]
    wanted = {"largest": {"copy.jpg", "1.png"}, "oldest": {"1.png"}, "first": {"copy.jpg", "big.jpg"}}
    for policy, dropped in wanted.items():
        report = dedup_index(index, tmp_path / policy, T, keep=policy)
        lines = (tmp_path / policy / "to_delete.txt").read_text().splitlines()
        names = {Path(p).name for p in lines}
        if policy == "oldest":  # 0.jpg and copy.jpg share bytes: the older mtime of the two is kept
            assert "1.png" in names and len(names & {"0.jpg", "copy.jpg"}) == 1
        else:
            assert names == dropped, policy
        assert len(lines) == report.summary()["would_delete"] == 2
    assert all(
        p.exists() for p in (folder / "copy.jpg", folder / "big.jpg", folder / "1.png", folder / "0.jpg")
    )


def test_index_source_reuses_stored_vectors_and_ivf_hnsw_reconstruct(env: dict, tmp_path: Path) -> None:
    import faiss

    report = dedup_source(env["index"], tmp_path / "again", threshold=T)  # no model needed
    assert report.summary()["near_groups"] == 1 and report.index_dir == str(env["index"])
    x = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(8), 8, 4)
    ivf.train(x)
    ivf.add(x)
    hnsw = faiss.IndexHNSWFlat(8, 16)
    hnsw.add(x)
    for index in (ivf, hnsw):
        np.testing.assert_allclose(index_vectors(index), x, rtol=1e-6)


def test_cli_on_index_and_bad_arguments(env: dict, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `dedup` a named sub-command
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(
        app, ["dedup", str(env["index"]), "--threshold", str(T), "--keep", "first", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "would delete" in res.output and "nothing deleted" in res.output
    assert len((out / "to_delete.txt").read_text().splitlines()) == 2
    res = runner.invoke(app, ["dedup", str(env["index"]), "--keep", "newest", "--out", str(out)])
    assert res.exit_code == 2 and "--keep must be one of" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["dedup", str(tmp_path / "nope"), "--out", str(out)])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["dedup", "--help"])
    assert "deletes" in res.output and "nothing" in res.output


@pytest.fixture(scope="module")
def client(env: dict):
    from fastapi.testclient import TestClient

    from uniembed.serve.app import create_app
    from uniembed.serve.dedup_routes import add_duplicate_routes

    app = create_app(env["index"], env["model"])
    if not any(getattr(r, "path", "") == "/duplicates" for r in app.routes):  # until create_app adds them
        add_duplicate_routes(app)
    return TestClient(app)


def test_api_groups_at_threshold_cached_and_following_a_swapped_index(
    env: dict, client, tmp_path: Path
) -> None:
    r = client.get("/duplicates", params={"threshold": T})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["threshold"] == T and body["total"] == 14 and body["group_count"] == 2
    names = [sorted(Path(it["path"]).name for it in g["items"]) for g in body["groups"]]
    assert sorted(names) == [["0.jpg", "copy.jpg"], ["1.png", "big.jpg"]]
    identical = next(g for g in body["groups"] if g["identical"])
    assert identical["max_distance"] == 0.0
    item = body["groups"][0]["items"][0]
    assert client.get(item["thumbnail"]).status_code == 200
    assert client.get("/duplicates", params={"threshold": T}).json()["cached"] is True
    wide = client.get("/duplicates", params={"threshold": 0.2, "limit": 1}).json()
    assert wide["group_count"] == 3 and len(wide["groups"]) == 1 and not wide["cached"]
    default = client.get("/duplicates").json()
    assert default["threshold"] == default["default_threshold"]
    # An edit swaps app.state.index: the next answer must come from the new index, not the cache.
    shutil.copytree(env["index"], tmp_path / "idx")
    old = client.app.state.index
    try:
        client.app.state.index = ImageIndex.load(tmp_path / "idx")
        again = client.get("/duplicates", params={"threshold": T}).json()
        assert again["cached"] is False and again["group_count"] == 2
    finally:
        client.app.state.index = old


def test_api_bad_parameters_and_page(client) -> None:
    for bad in ("abc", "-1", "3", "nan"):
        r = client.get("/duplicates", params={"threshold": bad})
        assert r.status_code == 422 and "threshold" in r.json()["detail"]
    assert client.get("/duplicates", params={"limit": "0"}).status_code == 422
    page = client.get("/duplicates/view")
    assert page.status_code == 200 and "duplicates.js" in page.text
    assert client.get("/static/duplicates.js").status_code == 200
