"""Index edits: `uniembed index --remove`, POST /items and DELETE /items/{id}, stable ids, every index type,
adapted indexes, tokens, searches running during edits, and SIGKILL at every step of an edit."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from uniembed.cli import app as cli_app
from uniembed.core.fsutil import restore_interrupted_swap
from uniembed.export.embedder import load_embedder
from uniembed.serve.app import create_app
from uniembed.serve.edit_routes import add_edit_routes
from uniembed.serve.edits import (
    STEP_SLEEP_ENV,
    AlreadyIndexedError,
    NewImage,
    UnknownItemsError,
    add_images,
    remove_items,
)
from uniembed.serve.filters import item_meta
from uniembed.serve.index import ImageIndex, build_index
from uniembed.serve.limits import ServiceLimits
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

TOKEN = "s3cret-edit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = ServiceLimits(max_concurrent=4, queue=64)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, 3 labels x 4 images, a flat index over them and two images that are not indexed."""
    root = tmp_path_factory.mktemp("edits")
    model = make_tiny_model(root / "saved_model.pt", seed=0)
    make_synthetic_images(root / "imgs", labels=3, per_label=4)
    extra = make_synthetic_images(root / "extra", labels=1, per_label=2, seed=7)
    build_index(model, [root / "imgs"], root / "base", progress=False)
    return {"root": root, "model": model, "base": root / "base", "extra0": extra[0], "extra1": extra[1]}


def copy_index(env: dict[str, Path], dst: Path) -> Path:
    shutil.copytree(env["base"], dst)
    return dst


def thumbs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((d / "thumbs").iterdir())}


def vectors(ix: ImageIndex) -> np.ndarray:
    return ix.index.reconstruct_n(0, len(ix)) if ix.info["index"]["type"] in ("flat", "hnsw") else None


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", size, colour)
    im.paste((255 - colour[0], colour[1] // 2, 40), (8, 8, 30, 24))
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_remove_by_id_and_path_keeps_other_ids_and_thumbnails(
    env: dict[str, Path], tmp_path: Path
) -> None:
    d = copy_index(env, tmp_path / "idx")
    old = ImageIndex.load(d)
    before, old_vecs = thumbs(d), vectors(old)
    by_path = old.items[5]["path"]
    r = CliRunner().invoke(cli_app, ["index", "--out", str(d), "--remove", "3", "--remove", by_path])
    assert r.exit_code == 0, r.output
    assert "removed 2 item(s)" in r.output and "10 left, next id 12" in r.output
    ix = ImageIndex.load(d, verify=True)
    assert [it["id"] for it in ix.items] == [str(i) for i in range(12) if i not in (3, 5)]
    assert all(ix.item(i) == old.item(i) for i in range(12) if i not in (3, 5))
    assert ix.item(3) is None and ix.item(5) is None and ix.next_id == 12
    after = thumbs(d)
    assert set(after) == set(before) - {"3.jpg", "5.jpg"}
    assert all(after[n] == before[n] for n in after)  # same thumbnail under the same id
    for i in (0, 4, 6, 11):  # each kept item's own vector finds itself, under its old id
        assert ix.search_batch(old_vecs[i], k=1)[0][0].id == i


def test_cli_remove_unknown_changes_nothing_and_remove_from_file(
    env: dict[str, Path], tmp_path: Path
) -> None:
    d = copy_index(env, tmp_path / "idx")
    items_csv = (d / "items.csv").read_bytes()
    r = CliRunner().invoke(
        cli_app, ["index", "-o", str(d), "--remove", "2", "--remove", "99", "--remove", "no.jpg"]
    )
    assert r.exit_code == 2
    assert "id 99" in r.output and "no.jpg" in r.output and "nothing was removed" in r.output
    assert "Traceback" not in r.output and (d / "items.csv").read_bytes() == items_csv
    listing = tmp_path / "to_delete.txt"
    ix = ImageIndex.load(d)
    listing.write_text(f"# from dedup\n{ix.items[0]['path']}\n\n{ix.items[1]['path']}\n7\n")
    r = CliRunner().invoke(cli_app, ["index", "-o", str(d), "--remove-from", str(listing)])
    assert r.exit_code == 0, r.output
    assert [it["id"] for it in ImageIndex.load(d).items] == ["2", "3", "4", "5", "6", "8", "9", "10", "11"]
    r = CliRunner().invoke(cli_app, ["index", "-o", str(d), "--remove", "4", "-i", str(env["extra0"])])
    assert r.exit_code == 2 and "without --images/--add" in r.output
    r = CliRunner().invoke(cli_app, ["index", "-o", str(d)])
    assert r.exit_code == 2 and "--images" in r.output


# ---------------------------------------------------------------------------------------------- library


@pytest.mark.parametrize(
    "kind,params", [("flat", {}), ("ivf", {"nlist": 2, "nprobe": 2}), ("hnsw", {"hnsw_m": 8})]
)
def test_remove_then_add_keeps_rows_and_ids_for_every_index_type(
    env: dict[str, Path], tmp_path: Path, kind: str, params: dict[str, int]
) -> None:
    d = tmp_path / "idx"
    build_index(env["model"], [env["root"] / "imgs"], d, index_type=kind, params=params, progress=False)
    old = ImageIndex.load(d)
    embedder = load_embedder(env["model"])
    own = embedder.embed_images([Image.open(it["path"]).convert("RGB") for it in old.items])
    res = remove_items(d, ids=[0, 7], paths=[old.items[9]["path"]])
    assert sorted(int(it["id"]) for it in res.removed) == [0, 7, 9] and res.count == 9
    ix = ImageIndex.load(d)
    assert ix.info["index"]["type"] == kind and ix.info["index"]["params"] == old.info["index"]["params"]
    for i in (1, 5, 8, 11):
        hit = ix.search_batch(own[i], k=1)[0][0]
        assert hit.id == i and hit.distance < 1e-3, (kind, i, hit)
    with pytest.raises(UnknownItemsError, match="id 7"):
        remove_items(d, ids=[7])
    res = add_images(d, [NewImage(jpeg((20, 200, 90)), "new", "upload", {"shop": "a"})], embedder=embedder)
    (new,) = res.added
    assert new["id"] == "12" and res.count == 10  # never a removed id
    ix = ImageIndex.load(d)
    vec = embedder.embed_images([Image.open(io.BytesIO(jpeg((20, 200, 90))))])
    assert ix.search_batch(vec, k=1)[0][0].id == 12
    assert (d / "thumbs" / "12.jpg").is_file() and Path(ix.item(12)["path"]).read_bytes() == jpeg(
        (20, 200, 90)
    )
    with pytest.raises(AlreadyIndexedError, match="id 12"):
        add_images(d, [(jpeg((20, 200, 90)), "again", "", {})], embedder=embedder)


def test_adapted_index_remove_and_add_keep_features_and_projection(
    env: dict[str, Path], tmp_path: Path
) -> None:
    from test_index_adapt import tiny_backbone

    from uniembed.serve import adapt as ad

    d = tmp_path / "adapted"
    bb = tiny_backbone()
    build_index(None, [env["root"] / "imgs"], d, adapt="pcaw8", backbone=bb, progress=False)
    feats = np.load(d / ad.FEATURES_FILE)
    proj = (d / ad.PROJECTION_FILE).read_bytes()
    remove_items(d, ids=[2, 3])
    assert np.array_equal(np.load(d / ad.FEATURES_FILE), np.delete(feats, [2, 3], axis=0))
    assert (d / ad.PROJECTION_FILE).read_bytes() == proj
    res = add_images(d, [(env["extra0"], "x", "files", {})], backbone=bb)
    assert res.added[0]["id"] == "12" and res.added[0]["path"] == str(env["extra0"])
    ix = ImageIndex.load(d, verify=True)
    assert np.load(d / ad.FEATURES_FILE).shape[0] == len(ix) == 11
    assert (d / ad.PROJECTION_FILE).read_bytes() == proj  # projected with the stored projection, not refitted
    query = load_embedder(ix.query_model_path())
    hit = ix.search_batch(query.embed_images([Image.open(env["extra0"]).convert("RGB")]), k=1)[0][0]
    assert hit.id == 12 and hit.distance < 1e-2


# -------------------------------------------------------------------------------------------------- API


def make_client(index: Path, model: Path, token: str | None) -> TestClient:
    app = create_app(index, model, limits=LIMITS)
    add_edit_routes(app, app.state.embedder, LIMITS, token)
    return TestClient(app)


def search_ids(client: TestClient, data: bytes, k: int = 3) -> list[int]:
    r = client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": str(k)})
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


def test_edits_are_off_by_default_and_need_the_token(env: dict[str, Path], tmp_path: Path) -> None:
    d = copy_index(env, tmp_path / "idx")
    upload = {"image": ("a.jpg", jpeg((1, 2, 3)), "image/jpeg")}
    off = make_client(d, env["model"], None)
    r = off.post("/items", files=upload, headers=AUTH)
    assert r.status_code == 405 and "--allow-edits" in r.json()["detail"]
    assert off.delete("/items/1", headers=AUTH).status_code == 405
    assert off.get("/health").json()["edits"] is False
    on = make_client(d, env["model"], TOKEN)
    assert on.get("/health").json()["edits"] is True
    r = on.post("/items", files=upload)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert on.delete("/items/1", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert on.delete("/items/1", headers={"Authorization": TOKEN}).status_code == 401
    assert len(ImageIndex.load(d)) == 12  # nothing changed
    r = CliRunner().invoke(
        cli_app, ["serve", "--index", str(d), "--allow-edits"], env={"UNIEMBED_EDIT_TOKEN": ""}
    )
    assert r.exit_code == 2 and "needs a token" in r.output


def test_api_add_then_search_finds_it_and_delete_removes_it(env: dict[str, Path], tmp_path: Path) -> None:
    d = copy_index(env, tmp_path / "idx")
    client = make_client(d, env["model"], TOKEN)
    data = jpeg((240, 220, 10), (64, 52))
    r = client.post(
        "/items",
        files={"image": ("new.jpg", data, "image/jpeg")},
        data={"label": "yellow", "domain": "api", "shop": "north"},
        headers=AUTH,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == 12 and body["count"] == 13 and body["label"] == "yellow"
    assert search_ids(client, data)[0] == 12
    assert client.get(body["thumbnail"]).status_code == 200
    item = ImageIndex.load(d, verify=True).item(12)
    assert item["label"] == "yellow" and item["domain"] == "api"
    assert item_meta(item) == {"shop": "north"}  # other form fields become item metadata
    r = client.post("/items", files={"image": ("same.jpg", data, "image/jpeg")}, headers=AUTH)
    assert r.status_code == 409 and "id 12" in r.json()["detail"]
    r = client.post("/items", files={"image": ("bad.jpg", data[:60], "image/jpeg")}, headers=AUTH)
    assert r.status_code == 422
    assert client.delete("/items/12", headers=AUTH).json() == {
        "removed": 12,
        "path": item["path"],
        "count": 12,
    }
    assert 12 not in search_ids(client, data, k=12)
    assert client.get("/thumb/12").status_code == 404
    assert client.delete("/items/12", headers=AUTH).status_code == 404
    assert client.delete("/items/abc", headers=AUTH).status_code == 404
    r = client.post("/items", files={"image": ("n.jpg", jpeg((5, 5, 250)), "image/jpeg")}, headers=AUTH)
    assert r.json()["id"] == 13  # 12 is never handed out again
    assert client.get("/health").json()["count"] == 13


def test_searches_stay_consistent_while_edits_run(env: dict[str, Path], tmp_path: Path) -> None:
    """Three threads search without pause while another adds and deletes items: every answer is a 200 whose
    hits each name an id with the path that id has for its whole life, at that item's own distance from the
    query (a FAISS row paired with another row's item would not be), nearest first."""
    from uniembed.serve.app import embed_bytes

    d = copy_index(env, tmp_path / "idx")
    client = make_client(d, env["model"], TOKEN)
    ix = ImageIndex.load(d)
    known = {int(it["id"]): (it["path"], ix.index.reconstruct(pos)) for pos, it in enumerate(ix.items)}
    queries = [jpeg((40 * i, 255 - 30 * i, 90)) for i in range(3)]
    qvecs = [embed_bytes(client.app.state.embedder, q, LIMITS)[0] for q in queries]
    stop = threading.Event()
    answers: list[tuple[int, list[dict]]] = []
    errors: list[str] = []

    def hammer(n: int) -> None:
        while not stop.is_set():
            r = client.post("/search", files={"image": ("q.jpg", queries[n], "image/jpeg")}, data={"k": "5"})
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:200]}")
            else:
                answers.append((n, r.json()["results"]))

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(5):
            image = {"image": ("n.jpg", jpeg((200, 30 * i, 60)), "image/jpeg")}
            r = client.post("/items", files=image, headers=AUTH)
            assert r.status_code == 201, r.text
            new = ImageIndex.load(d)
            pos = new.position(r.json()["id"])
            known[r.json()["id"]] = (new.items[pos]["path"], new.index.reconstruct(pos))
            r = client.delete(f"/items/{2 * i}", headers=AUTH)
            assert r.status_code == 200, r.text
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert len(answers) >= 10
    for n, hits in answers:
        assert len(hits) == 5
        for h in hits:
            path, vec = known[h["id"]]
            assert h["path"] == path
            assert abs(h["distance"] - float(np.linalg.norm(qvecs[n] - vec))) < 1e-3, (n, h)
        assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    final = ImageIndex.load(d, verify=True)
    assert len(final) == 12 and [final.item(2 * i) for i in range(5)] == [None] * 5


# ------------------------------------------------------------------------------------------------ crashes


def consistent(d: Path, states: list[list[str]]) -> list[str]:
    """The index loads (after what the next writer does first: putting back a swap a kill interrupted),
    checksums verified, is one of ``states`` (ids), and has a thumbnail for every item."""
    restore_interrupted_swap(d)
    ix = ImageIndex.load(d, verify=True)
    ids = [it["id"] for it in ix.items]
    assert ids in states, ids
    assert {f"{i}.jpg" for i in ids} <= {p.name for p in (d / "thumbs").iterdir()}
    return ids


def _kill_at(code: str, d: Path, after: float) -> bool:
    """Run ``code`` in a subprocess with slow edit steps; SIGKILL it ``after`` s after its edit began (the
    lock file appears). True when it was killed, False when it finished first."""
    env = {**os.environ, STEP_SLEEP_ENV: "0.15"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    lock = d.parent / f".{d.name}.edit.lock"
    try:
        t0 = time.monotonic()
        while not lock.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.005)
        time.sleep(after)
    finally:
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    lock.unlink(missing_ok=True)
    return killed


@pytest.mark.slow
def test_sigkill_during_remove_or_add_leaves_old_or_new_index(env: dict[str, Path], tmp_path: Path) -> None:
    d = copy_index(env, tmp_path / "idx")
    before = [str(i) for i in range(12)]
    removed = [i for i in before if i != "4"]
    remove = f"from uniembed.serve.edits import remove_items; remove_items({str(d)!r}, ids=[4])"
    add = (
        "from uniembed.serve.edits import add_images; "
        f"add_images({str(d)!r}, [(open({str(env['extra1'])!r}, 'rb').read(), 'k', 'kill', {{}})])"
    )
    added = [*removed, "12"]
    outcomes = []
    for code, start, end, finish in (
        (remove, before, removed, lambda: remove_items(d, ids=[4])),
        (add, removed, added, lambda: add_images(d, [(env["extra1"].read_bytes(), "k", "kill", {})])),
    ):
        for after in (0.1, 0.4):  # the edit sleeps 0.15 s before, between and after its steps
            killed = _kill_at(code, d, after)
            outcomes.append((killed, consistent(d, [start, end]) == end))
        if consistent(d, [start, end]) == start:  # the rerun, uninterrupted
            finish()
        assert consistent(d, [end]) == end
    assert sum(k and not done for k, done in outcomes) >= 2, outcomes  # kills did land mid-edit
    # A kill between the two renames of the swap: the next writer puts the old folder back first.
    kill_between = (
        "import os, signal\nreal = os.replace\n"
        "def replace(a, b):\n    real(a, b)\n    if '.old-' in str(b): os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\nfrom uniembed.serve.edits import remove_items\n"
        f"remove_items({str(d)!r}, ids=[1])\n"
    )
    state = consistent(d, [added])
    subprocess.run([sys.executable, "-c", kill_between], check=False, timeout=120)
    assert not d.exists() and list(d.parent.glob(f".{d.name}.old-*"))
    remove_items(d, ids=[0])  # the next edit restores, then edits
    assert consistent(d, [[i for i in state if i != "0"]])
