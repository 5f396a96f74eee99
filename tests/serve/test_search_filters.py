"""Search thresholds, metadata filters and "more like this": the library, the API and the CLI.

One tiny index built from a labels.csv with an extra ``colour`` column serves the API and CLI tests; the
guarantee of k filtered results is checked on every FAISS index type over synthetic vectors.
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from uniembed.cli import app as cli
from uniembed.serve import filters as filters_mod
from uniembed.serve.app import create_app
from uniembed.serve.filters import Filter, FilterError, parse_filter, parse_filters
from uniembed.serve.index import ImageIndex, build_index, default_params, make_faiss_index
from uniembed.serve.items import ITEM_FIELDS, read_items, write_items
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

COLOURS = ("red", "blue", "green")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 labels x 6 images in a labels.csv with an extra ``colour`` column, indexed flat."""
    root = tmp_path_factory.mktemp("filters")
    model = make_tiny_model(root / "saved_model.pt")
    paths = sorted(make_synthetic_images(root / "img", labels=4, per_label=6))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "domain", "colour"])
        for i, p in enumerate(paths):
            w.writerow([p, f"set{i % 2}:{p.parent.name}", "toys" if i % 3 else "tools", COLOURS[i % 3]])
    build_index(model, [root / "labels.csv"], root / "idx", progress=False)
    return {"root": root, "model": model, "index": root / "idx", "query": paths[0]}


@pytest.fixture(scope="module")
def ix(env: dict[str, Path]) -> ImageIndex:
    return ImageIndex.load(env["index"])


@pytest.fixture(scope="module")
def client(env: dict[str, Path]) -> TestClient:
    return TestClient(create_app(env["index"], env["model"], max_k=20, warmup=False))


def test_filter_syntax() -> None:
    assert parse_filter("domain=toys") == Filter("domain", "=", "toys")
    assert parse_filter("label^=coil100:") == Filter("label", "^=", "coil100:")
    assert parse_filter(" colour != red") == Filter("colour", "!=", " red")
    assert parse_filter("note=a=b") == Filter("note", "=", "a=b")
    assert str(parse_filter("label^=x")) == "label^=x"
    assert parse_filters(["", "  ", "domain="]) == [Filter("domain", "=", "")]
    for bad in ("domain", "=toys", "^=x"):
        with pytest.raises(FilterError, match="COLUMN=VALUE"):
            parse_filter(bad)


def test_extra_labels_csv_columns_become_item_metadata(env: dict[str, Path], ix: ImageIndex) -> None:
    header = (env["index"] / "items.csv").read_text().splitlines()[0]
    assert header == "id,path,label,domain,source,meta"
    assert ix.columns.names == ["label", "domain", "path", "source", "colour"]
    assert json.loads(ix.items[0]["meta"]) == {"colour": "red"}
    hit = ix.search_batch(ix.vector(0), 1)[0][0]
    assert hit.id == 0 and hit.to_dict()["meta"] == {"colour": "red"}
    with pytest.raises(FilterError, match="known columns: label, domain, path, source, colour"):
        ix.columns.check(parse_filters(["shape=round"]))


def test_index_without_metadata_loads_and_filters(env: dict[str, Path], tmp_path: Path) -> None:
    """An index written before metadata existed (no meta column) loads, with the base columns only."""
    old = ImageIndex.load(env["index"])
    items = [{k: it[k] for k in ITEM_FIELDS} for it in old.items]
    write_items(tmp_path / "items.csv", items)
    assert (tmp_path / "items.csv").read_text().splitlines()[0] == ",".join(ITEM_FIELDS)
    bare = ImageIndex(root=tmp_path, index=old.index, items=read_items(tmp_path / "items.csv"), info=old.info)
    assert bare.columns.names == ["label", "domain", "path", "source"]
    hits = bare.search_batch(bare.vector(3), 24, filters=["domain=tools"])[0]
    assert len(hits) == 8 and {h.domain for h in hits} == {"tools"} and not hits[0].meta


def test_add_keeps_metadata_and_items_from_folders_have_none(env: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "idx"
    shutil.copytree(env["index"], out)
    extra = tmp_path / "more"
    make_synthetic_images(extra, labels=1, per_label=2, seed=3)
    build_index(env["model"], [extra], out, add=True, progress=False)
    grown = ImageIndex.load(out)
    assert len(grown) == 26 and grown.columns.names[-1] == "colour"
    assert json.loads(grown.items[0]["meta"]) == {"colour": "red"} and grown.items[-1]["meta"] == ""
    assert grown.matching(["colour="]) == 2 and grown.matching(["colour!="]) == 24


def test_filters_threshold_and_exclusion(ix: ImageIndex) -> None:
    v = ix.vector(4)
    all_hits = ix.search_batch(v, 24)[0]
    assert all_hits[0].id == 4 and all_hits[0].distance < 1e-3
    red = ix.search_batch(v, 24, filters=["colour=red"])[0]
    assert len(red) == ix.matching(["colour=red"]) == 8
    assert all(h.meta["colour"] == "red" for h in red)
    # Filtering never reorders: the filtered list is the unfiltered one with the others taken out.
    assert [h.id for h in red] == [h.id for h in all_hits if h.meta["colour"] == "red"]
    both = ix.search_batch(v, 24, filters=["label^=set1:", "domain!=tools"])[0]
    assert both and all(h.label.startswith("set1:") and h.domain != "tools" for h in both)
    assert len(both) == ix.matching(["label^=set1:", "domain!=tools"])
    cut = all_hits[5].distance
    near = ix.search_batch(v, 24, max_distance=cut)[0]
    assert [h.id for h in near] == [h.id for h in all_hits if h.distance <= cut]
    mlt = ix.search_batch(v, 5, exclude_ids=[4])[0]
    assert 4 not in [h.id for h in mlt] and len(mlt) == 5
    assert ix.matching(None, [4]) == 23 and ix.matching(["colour=pink"]) == 0
    assert ix.search_batch(v, 5, filters=["colour=pink"]) == [[]]


def test_expand_hook_replaces_the_query(ix: ImageIndex) -> None:
    seen = []

    def expand(index: ImageIndex, q: np.ndarray) -> np.ndarray:
        seen.append(q.shape)
        return np.repeat(index.vector(7)[None], len(q), axis=0)

    hits = ix.search_batch(ix.vector(0), 1, expand=expand)[0]
    assert seen == [(1, ix.dim)] and hits[0].id == 7


@functools.cache
def _synthetic_index(kind: str, n: int = 3000, dim: int = 16) -> tuple[ImageIndex, np.ndarray]:
    """One index per type over the same unit vectors (cached: tests only read it); 1 item in 97 is 'rare'."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if kind == "opq":  # an IVF-PQ behind a rotation (IndexPreTransform), as OPQ in the sharded builder
        import faiss

        ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, 32, 8, 4)
        index, params = faiss.IndexPreTransform(faiss.RandomRotationMatrix(dim, dim), ivfpq), {}
        index.train(x)
        index.add(x)
        faiss.extract_index_ivf(index).nprobe = 1
    else:
        params = default_params(kind, n, dim)
        if kind.startswith("ivf"):
            params.update(nlist=32, nprobe=1, pq_m=8, pq_bits=4)
        if kind == "hnsw":
            params.update(ef_search=16)
        index = make_faiss_index(x, kind, params)
    items = [
        {"id": str(i), "path": f"/p/{i}.jpg", "label": f"l{i % 50}", "source": "s", "domain": "common"}
        for i in range(n)
    ]
    for i in range(0, n, 97):
        items[i]["domain"] = "rare"
    info = {"index": {"type": kind, "params": params}, "dim": dim, "count": n, "model": {"fingerprint": "x"}}
    return ImageIndex(root=Path("."), index=index, items=items, info=info), x


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq", "opq"])
@pytest.mark.parametrize("exact_max", [0, 4096])
def test_k_filtered_results_whenever_k_items_match(
    kind: str, exact_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside-the-index filtering (ID selector, exact_max 0) and the exact path both return k matching
    results while k exist: an IVF probing 1 of 32 lists, or a narrow HNSW search, would come back short."""
    monkeypatch.setattr(filters_mod, "EXACT_MAX", exact_max)
    ix, x = _synthetic_index(kind)
    rare = [i for i in range(len(x)) if i % 97 == 0]  # 31 items
    hits = ix.search_batch(x[:4], 20, filters=["domain=rare"], expand=False)  # the plain truth below
    for q, row in zip(x[:4], hits, strict=True):
        assert len(row) == 20 and all(h.domain == "rare" for h in row)
        if kind in ("flat", "hnsw", "ivf"):  # exact vectors: the true filtered top-20
            truth = sorted(rare, key=lambda i: float(np.sum((x[i] - q) ** 2)))[:20]
            got = [h.id for h in row]
            assert len(set(got) & set(truth)) >= (20 if kind != "hnsw" else 18)
    assert [len(r) for r in ix.search_batch(x[:2], 50, filters=["domain=rare"])] == [31, 31]
    common = ix.search_batch(x[:2], 10, filters=["domain!=rare"], exclude_ids=[0, 1])
    assert all(len(r) == 10 and not {h.id for h in r} & {0, 1} for r in common)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq", "opq"])
def test_stored_vectors_come_back_for_every_index_type(kind: str) -> None:
    ix, x = _synthetic_index(kind)
    v = ix.vector(123)
    np.testing.assert_allclose(v, x[123], atol=0.5 if kind in ("ivfpq", "opq") else 1e-6)
    row = ix.search_batch(v, 5, exclude_ids=[123])[0]
    assert len(row) == 5 and 123 not in [h.id for h in row]


# ------------------------------------------------------------------------------------------------ the API
def _jpeg(path: Path) -> dict:
    return {"image": (path.name, path.read_bytes(), "image/jpeg" if path.suffix == ".jpg" else "image/png")}


def test_api_post_search_with_filters_and_threshold(client: TestClient, env: dict[str, Path]) -> None:
    form = {"k": "20", "filter": ["colour=green", "domain=toys"]}
    r = client.post("/search", files=_jpeg(env["query"]), data=form)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["filters"] == ["colour=green", "domain=toys"] and body["total"] == 24
    assert body["matched"] == len(body["results"]) == 8
    assert all(h["meta"]["colour"] == "green" and h["domain"] == "toys" for h in body["results"])
    r = client.post("/search?filter=label%5E%3Dset1%3A&max_distance=0.2", files=_jpeg(env["query"]))
    body = r.json()
    assert r.status_code == 200 and body["max_distance"] == 0.2 and body["matched"] == 12
    assert all(h["label"].startswith("set1:") and h["distance"] <= 0.2 for h in body["results"])


@pytest.mark.parametrize("value", ["3", "-0.1", "abc", "nan"])
def test_api_refuses_bad_max_distance(client: TestClient, env: dict[str, Path], value: str) -> None:
    r = client.post("/search", files=_jpeg(env["query"]), data={"max_distance": value})
    assert r.status_code == 422 and "max_distance must be a number in [0, 2]" in r.json()["detail"]
    assert client.get(f"/search?id=1&max_distance={value}").status_code == 422


def test_api_refuses_unknown_filter_columns(client: TestClient, env: dict[str, Path]) -> None:
    r = client.post("/search", files=_jpeg(env["query"]), data={"filter": "shape=round"})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "unknown filter column 'shape'; known columns: label, domain, path, source, colour"
    )
    r = client.get("/search?id=1&filter=colour")
    assert r.status_code == 422 and "COLUMN=VALUE" in r.json()["detail"]


def test_api_more_like_this(client: TestClient, ix: ImageIndex) -> None:
    r = client.get("/search?id=5&k=20")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == 5 and len(body["results"]) == 20 and body["matched"] == 23
    assert 5 not in [h["id"] for h in body["results"]]
    assert [h["id"] for h in body["results"]] == [h.id for h in ix.search_batch(ix.vector(5), 21)[0][1:]]
    r = client.get("/search", params={"id": 5, "filter": "colour=blue", "max_distance": "2"})
    assert r.status_code == 200 and r.json()["matched"] == 8
    assert all(h["meta"]["colour"] == "blue" for h in r.json()["results"])
    assert client.get("/search?id=999").status_code == 404
    assert client.get("/search?id=999").json()["detail"] == "no item with id 999"
    for bad in ("/search?id=abc", "/search?id=-1", "/search"):
        assert client.get(bad).status_code == 422


def test_api_facets(client: TestClient) -> None:
    f = client.get("/facets").json()
    assert f["total"] == 24 and f["columns"] == ["label", "domain", "path", "source", "colour"]
    assert f["domains"] == [{"value": "toys", "count": 16}, {"value": "tools", "count": 8}]
    assert f["label_prefixes"] == [{"value": "set0:", "count": 12}, {"value": "set1:", "count": 12}]
    assert [c["count"] for c in f["meta"]["colour"]] == [8, 8, 8]


def test_routes_read_the_index_swapped_into_app_state(env: dict[str, Path], ix: ImageIndex) -> None:
    """An edit replaces app.state.index; the next request must search the new one."""
    app = create_app(env["index"], env["model"], warmup=False)
    c = TestClient(app)
    assert c.get("/health").json()["count"] == 24
    smaller = ImageIndex(root=ix.root, index=ix.index, items=ix.items, info={**ix.info})
    smaller._positions.pop(23)  # an index that no longer knows item 23
    app.state.index = smaller
    assert c.get("/search?id=23").status_code == 404
    assert c.get("/thumb/23").status_code == 404
    app.state.index = ix
    assert c.get("/search?id=23").status_code == 200


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_more_like_this_with_filters(env: dict[str, Path]) -> None:
    runner = CliRunner()
    args = ["search", "--index", str(env["index"]), "--id", "2", "-k", "20", "--json"]
    r = runner.invoke(cli, [*args, "--filter", "colour=green", "--filter", "label^=set0:"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)[0]
    assert out["query"] == "id:2" and out["matched"] == 3 and len(out["results"]) == 3
    assert all(h["meta"]["colour"] == "green" and h["label"].startswith("set0:") for h in out["results"])
    r = runner.invoke(cli, [*args, "--max-distance", "0"])
    assert r.exit_code == 0 and json.loads(r.output)[0]["results"] == []
    r = runner.invoke(cli, ["search", "--index", str(env["index"]), "--id", "2", "-k", "3"])
    assert r.exit_code == 0 and "3 results of 23 matching (24 indexed)" in r.output


def test_cli_image_query_with_threshold_and_filter(env: dict[str, Path]) -> None:
    runner = CliRunner()
    base = ["search", "--index", str(env["index"]), str(env["query"]), "-k", "20", "--json"]
    r = runner.invoke(cli, [*base, "--filter", "domain=toys", "--max-distance", "0.3"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)[0]
    assert out["matched"] == 16 and out["total"] == 24
    assert out["results"] and all(h["domain"] == "toys" and h["distance"] <= 0.3 for h in out["results"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--id", "2", "--filter", "shape=round"], "unknown filter column 'shape'"),
        (["--id", "99"], "no item with id 99"),
        ([], "give query image files, or --id N"),
        (["--id", "2", "--filter", "nonsense"], "bad filter 'nonsense'"),
    ],
)
def test_cli_errors_are_one_line(env: dict[str, Path], extra: list[str], message: str) -> None:
    r = CliRunner().invoke(cli, ["search", "--index", str(env["index"]), *extra])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["search", "--index", str(env["index"]), "--id", "1", "--max-distance", "3"])
    assert r.exit_code == 2


def test_query_expansion_is_on_for_a_model_index_and_distances_stay_plain() -> None:
    """A GUIE-model index expands queries by default (alpha-QE, n=2): results differ from the plain search
    for some queries, yet distances are measured from the query as given and come nearest first."""
    ix, x = _synthetic_index("flat")
    assert ix.expansion.qe_n == 2 and ix.expansion.dba_n == 0
    plain = ix.search_batch(x[:40], 5, expand=False)
    expanded = ix.search_batch(x[:40], 5)
    assert any([h.id for h in a] != [h.id for h in b] for a, b in zip(plain, expanded, strict=True))
    for q, row in zip(x[:40], expanded, strict=True):
        d = [h.distance for h in row]
        assert d == sorted(d) and row[0].distance < 1e-3  # the query's own item, at distance 0
        for h in row:
            assert abs(h.distance - float(np.linalg.norm(x[h.id] - q))) < 1e-4
    adapted = ImageIndex(ix.root, ix.index, ix.items, {**ix.info, "adapt": {"spec": "pcaw4"}})
    assert adapted.expansion.qe_n == 0


def test_api_and_cli_can_turn_expansion_off(client: TestClient, env: dict[str, Path], ix: ImageIndex) -> None:
    plain = [h.id for h in ix.search_batch(ix.vector(5), 6, exclude_ids=[5], expand=False)[0]]
    r = client.get("/search", params={"id": 5, "k": 6, "expand": "false"})
    assert r.status_code == 200 and [h["id"] for h in r.json()["results"]] == plain
    assert client.get("/search", params={"id": 5, "expand": "maybe"}).status_code == 422
    args = ["search", "--index", str(env["index"]), "--id", "5", "-k", "6", "--json", "--no-expand"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert [h["id"] for h in json.loads(r.output)[0]["results"]] == plain
