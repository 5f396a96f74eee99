"""Collection-adapted indexes (`uniembed index --adapt`): spec parsing, the projection math, the stored query
model, --add / --add --refit, and search / serve without --model. A tiny random conv backbone stands in for
create_backbone, so the whole file runs offline in seconds."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch import nn
from typer.testing import CliRunner

from uniembed.cli import app
from uniembed.export.embedder import file_fingerprint, load_embedder
from uniembed.models import registry
from uniembed.models.preprocess import PreprocessConfig
from uniembed.models.registry import Backbone
from uniembed.serve.adapt import (
    FEATURES_FILE,
    PROJECTION_FILE,
    QUERY_MODEL,
    AdaptError,
    Projection,
    feature_embedder,
    fit_projection,
    parse_adapt_spec,
)
from uniembed.serve.app import create_app
from uniembed.serve.index import (
    ImageIndex,
    ImageIndexError,
    ModelMismatchError,
    build_index,
    open_index_and_model,
)
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

FEATURE_DIM = 16 * 4 + 3 * 4


class TinyNet(nn.Module):
    """normalised float [B,3,32,32] -> [B, 76]: pooled conv maps (2x2 cells) + the colour of 2x2 cells."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return torch.cat(
            [F.adaptive_avg_pool2d(h, [2, 2]).flatten(1), F.adaptive_avg_pool2d(x, [2, 2]).flatten(1)], 1
        )


def tiny_backbone(name: str = "tinynet", pooling: str = "avg", seed: int = 0, **_: object) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyNet().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return Backbone(
        name=name,
        module=net,
        preprocess=PreprocessConfig(input_size=32),
        dim=FEATURE_DIM,
        pooling=pooling,
        weights="random",
        weights_hash=f"seed{seed}",
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 labels x 4 synthetic images of mixed sizes + one broken file (skipped and counted)."""
    root = tmp_path_factory.mktemp("imgs")
    make_synthetic_images(root, labels=3, per_label=4)
    (root / "label1" / "html.jpg").write_text("<html>404 not found</html>")
    return root


@pytest.fixture(scope="module")
def more(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("more")
    make_synthetic_images(root, labels=2, per_label=3, seed=7)
    return root


@pytest.fixture(scope="module")
def adapted(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapted") / "idx"
    build_index(None, [folder], out, adapt="pcaw8", backbone=tiny_backbone(), progress=False)
    return out


@pytest.fixture()
def patched_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--backbone tinynet` through the real create_backbone lookup (`registry.create_backbone`)."""
    real = registry.create_backbone

    def create(name: str, **kw: object) -> Backbone:
        return tiny_backbone(name, **kw) if name == "tinynet" else real(name, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(registry, "create_backbone", create)


def index_vectors(ix: ImageIndex) -> np.ndarray:
    return ix.index.reconstruct_n(0, len(ix))


def indexed_paths(ix: ImageIndex) -> list[str]:
    return [it["path"] for it in ix.items]


# ------------------------------------------------------------------------------------------------ the spec
def test_spec_parsing_and_errors() -> None:
    s = parse_adapt_spec("pca64")
    assert (s.dim, s.power, s.name) == (64, 0.0, "pca64")
    s = parse_adapt_spec("pcaw64")
    assert (s.dim, s.power, s.name) == (64, 0.5, "pcaw64")
    s = parse_adapt_spec("PCAW256@1")
    assert (s.dim, s.power, s.name) == (256, 1.0, "pcaw256@1")
    assert parse_adapt_spec("pcaw32@0.25").power == 0.25
    assert parse_adapt_spec("pcaw32@0.5").name == "pcaw32"
    for bad, why in [
        ("pca", "expected"),
        ("pcb64", "expected"),
        ("pcaw64@", "expected"),
        ("pca0", "at least 1"),
        ("pcaw64@1.5", r"\[0, 1\]"),
        ("pca64@0.5", "pcaw"),
    ]:
        with pytest.raises(AdaptError, match=why):
            parse_adapt_spec(bad)
    feats = np.random.default_rng(0).normal(size=(10, 6))
    with pytest.raises(AdaptError, match=r"min\(images, feature dim\) = min\(10, 6\)"):
        fit_projection(feats, "pca7")
    with pytest.raises(AdaptError, match=r"min\(5, 6\)"):
        fit_projection(feats[:5], "pcaw6")
    with pytest.raises(AdaptError, match="at least 2 images"):
        fit_projection(feats[:1], "pca1")
    with pytest.raises(AdaptError, match="do not vary"):
        fit_projection(np.ones((4, 6)), "pca2")


# ------------------------------------------------------------------------------------------ projection math
@pytest.mark.parametrize("n,f", [(60, 12), (9, 30)])  # eigh of the covariance / SVD branch
@pytest.mark.parametrize("spec,power", [("pca5", 0.0), ("pcaw5", 0.5), ("pcaw5@1", 1.0)])
def test_projection_matches_an_independent_numpy_pca(n: int, f: int, spec: str, power: float) -> None:
    rng = np.random.default_rng(n)
    feats = rng.normal(size=(n, f)) * np.linspace(3.0, 0.2, f) + rng.normal(size=f)
    proj = fit_projection(feats, spec)

    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    lam = s[:5] ** 2 / n
    ref = (xc @ vt[:5].T) * lam ** (-power / 2)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)

    np.testing.assert_allclose(np.abs(vt[:5] @ proj.components), np.eye(5), atol=1e-4)
    np.testing.assert_allclose(proj.scales, lam ** (-power / 2), rtol=1e-4)
    np.testing.assert_allclose(proj.mean, x.mean(0), atol=1e-6)
    got = proj.apply(feats)
    signs = np.sign((got * ref).sum(0))  # components are unique up to sign
    np.testing.assert_allclose(got * signs, ref, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert proj.fitted_on == n and proj.dim == 5 and proj.spec.name == spec
    assert abs(proj.explained_variance - (s[:5] ** 2).sum() / (s**2).sum()) < 1e-6
    if power == 1.0:  # full whitening: unit variance along every kept component before the final L2
        white = (xc @ proj.components.astype(np.float64)) * proj.scales
        np.testing.assert_allclose((white**2).mean(0), 1.0, rtol=1e-3)


def test_projection_round_trips_and_whitening_changes_the_geometry(tmp_path: Path) -> None:
    feats = np.random.default_rng(1).normal(size=(40, 10)) * np.linspace(4, 0.5, 10)
    p = fit_projection(feats, "pcaw4", meta={"backbone": "x"})
    p.save(tmp_path / "p.npz")
    q = Projection.load(tmp_path / "p.npz")
    assert q.spec == p.spec and q.fitted_on == 40 and q.meta == {"backbone": "x"}
    np.testing.assert_array_equal(q.apply(feats), p.apply(feats))
    plain = fit_projection(feats, "pca4").apply(feats)
    assert np.abs(plain - p.apply(feats)).max() > 1e-2


# ----------------------------------------------------------------------------------------- adapted indexes
def test_adapted_index_stores_features_projection_and_query_model(adapted: Path, folder: Path) -> None:
    ix = ImageIndex.load(adapted)
    info = json.loads((adapted / "index.json").read_text())
    a = info["adapt"]
    assert len(ix) == 12 and ix.dim == 8 and info["skipped_counts"] == {"not an image": 1}
    assert (a["spec"], a["dim"], a["fitted_on"], a["feature_dim"]) == ("pcaw8", 8, 12, FEATURE_DIM)
    assert a["backbone"] == "tinynet" and a["feature_fingerprint"] == tiny_backbone().fingerprint()
    assert info["model"]["fingerprint"] == file_fingerprint(adapted / QUERY_MODEL) == ix.fingerprint
    feats = np.load(adapted / FEATURES_FILE)
    assert feats.dtype == np.float16 and feats.shape == (12, FEATURE_DIM)
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # The stored projection is the fit of the stored features, and the index holds its projections.
    refit = fit_projection(feats.astype(np.float32), "pcaw8")
    stored = Projection.load(adapted / PROJECTION_FILE)
    np.testing.assert_allclose(stored.components, refit.components, atol=1e-6)
    np.testing.assert_allclose(index_vectors(ix), stored.apply(feats), atol=2e-3)


def test_query_model_reproduces_the_indexed_vectors(adapted: Path) -> None:
    ix = ImageIndex.load(adapted)
    from uniembed.data.images import load_image

    imgs = [load_image(p) for p in indexed_paths(ix)]
    q = load_embedder(adapted / QUERY_MODEL).embed_images(imgs)
    assert q.shape == (12, 8)
    np.testing.assert_allclose(q, index_vectors(ix), atol=1e-4)
    # ... and equals the feature model followed by the stored projection.
    feats = feature_embedder(tiny_backbone(), 8).embed_images(imgs)
    np.testing.assert_allclose(q, Projection.load(adapted / PROJECTION_FILE).apply(feats), atol=1e-4)
    hits = ix.search_batch(q, k=3)
    assert [h[0].id for h in hits] == list(range(12))
    assert all(h[0].distance < 1e-3 for h in hits)


def test_add_keeps_the_projection_and_refit_changes_it(adapted: Path, more: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "idx"
    shutil.copytree(adapted, out)
    before = {n: (out / n).read_bytes() for n in (PROJECTION_FILE, QUERY_MODEL)}
    fp = ImageIndex.load(out).fingerprint

    bb = tiny_backbone()  # (the CLI test rebuilds it by the name stored in index.json)
    res = build_index(None, [more], out, add=True, backbone=bb, progress=False)
    ix = ImageIndex.load(out)
    assert res.added == 6 and len(ix) == 18 and ix.fingerprint == fp == res.fingerprint
    assert {n: (out / n).read_bytes() for n in before} == before
    assert ix.info["adapt"]["fitted_on"] == 12
    feats = np.load(out / FEATURES_FILE)
    assert feats.shape == (18, FEATURE_DIM)
    proj = Projection.load(out / PROJECTION_FILE)
    np.testing.assert_allclose(index_vectors(ix)[12:], proj.apply(feats[12:]), atol=2e-3)
    new_paths = indexed_paths(ix)[12:]
    hits = ix.search_batch(load_embedder(out / QUERY_MODEL).embed_images(_load(new_paths)), k=1)
    assert [h[0].path for h in hits] == new_paths

    res = build_index(None, [more], out, add=True, refit=True, backbone=bb, progress=False)
    ix = ImageIndex.load(out)
    assert res.added == 0 and len(ix) == 18 and ix.info["adapt"]["fitted_on"] == 18
    assert (out / PROJECTION_FILE).read_bytes() != before[PROJECTION_FILE]
    assert ix.fingerprint != fp and ix.fingerprint == file_fingerprint(out / QUERY_MODEL)
    proj2 = Projection.load(out / PROJECTION_FILE)
    np.testing.assert_allclose(
        proj2.components, fit_projection(feats.astype(np.float32), "pcaw8").components, atol=1e-6
    )
    np.testing.assert_allclose(index_vectors(ix), proj2.apply(feats), atol=1e-5)
    q = load_embedder(out / QUERY_MODEL).embed_images(_load(indexed_paths(ix)))
    assert [h[0].id for h in ix.search_batch(q, k=1)] == list(range(18))

    res = build_index(None, [more], out, add=True, refit=True, adapt="pca4", backbone=bb, progress=False)
    ix = ImageIndex.load(out)
    assert ix.dim == 4 and ix.info["adapt"]["spec"] == "pca4" and index_vectors(ix).shape == (18, 4)


def test_adapt_refusals(adapted: Path, folder: Path, more: Path, tmp_path: Path) -> None:
    tiny = make_tiny_model(tmp_path / "m" / "saved_model.pt")
    with pytest.raises(ImageIndexError, match="--backbone NAME instead of --model"):
        build_index(tiny, [folder], tmp_path / "a", adapt="pca4", backbone=tiny_backbone(), progress=False)
    with pytest.raises(ImageIndexError, match="needs --backbone"):
        build_index(None, [folder], tmp_path / "b", adapt="pca4", progress=False)
    with pytest.raises(ImageIndexError, match=r"min\(12, 76\)"):
        build_index(None, [folder], tmp_path / "c", adapt="pcaw13", backbone=tiny_backbone(), progress=False)
    assert not (tmp_path / "c").exists()  # nothing half-written
    with pytest.raises(ImageIndexError, match="give --model"):
        build_index(None, [folder], tmp_path / "d", progress=False)
    with pytest.raises(ImageIndexError, match="drop --model"):
        build_index(
            adapted / QUERY_MODEL, [more], adapted, add=True, backbone=tiny_backbone(), progress=False
        )
    with pytest.raises(ImageIndexError, match="add --refit"):
        build_index(None, [more], adapted, add=True, adapt="pca4", backbone=tiny_backbone(), progress=False)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        build_index(None, [more], adapted, add=True, backbone=tiny_backbone(seed=1), progress=False)
    plain = tmp_path / "plain"
    build_index(tiny, [folder / "label0"], plain, progress=False)
    with pytest.raises(ImageIndexError, match="built with a fixed model"):
        build_index(None, [more], plain, add=True, adapt="pca2", backbone=tiny_backbone(), progress=False)
    with pytest.raises(ImageIndexError, match="only applies to an index built with --adapt"):
        build_index(tiny, [more], plain, add=True, refit=True, progress=False)
    assert ImageIndex.load(adapted).info["adapt"]["fitted_on"] == 12  # untouched by the refusals


def _load(paths: list[str]) -> list:
    from uniembed.data.images import load_image

    return [load_image(p) for p in paths]


# ------------------------------------------------------------------------------------- CLI, search, serve
def test_cli_index_and_search_without_model(patched_registry: None, folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "idx"
    base = ["index", "--images", str(folder), "--out", str(out)]
    r = runner.invoke(app, [*base, "--adapt", "pcaw8@1", "--backbone", "tinynet"])
    assert r.exit_code == 0, r.output
    assert "pcaw8@1" in r.output and "fitted on 12" in r.output
    assert ImageIndex.load(out).info["adapt"]["whiten_power"] == 1.0

    query = folder / "label2" / "1.png"
    r = runner.invoke(app, ["search", "--index", str(out), str(query), "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res[0]["results"][0]["path"] == str(query) and res[0]["results"][0]["distance"] < 1e-3
    r = runner.invoke(app, ["search", "--index", str(out), str(query)])
    assert r.exit_code == 0, r.output
    assert r.output.count("projection pcaw8@1 (8-d") == 1 and "fitted on 12 images" in r.output
    r = runner.invoke(app, ["search", "--index", str(out), "--model", str(out / QUERY_MODEL), str(query)])
    assert r.exit_code == 0, r.output
    other = make_tiny_model(tmp_path / "other" / "saved_model.pt", dim=8)
    r = runner.invoke(app, ["search", "--index", str(out), "--model", str(other), str(query)])
    assert r.exit_code == 2 and "collection-adapted" in r.output and "drop --model" in r.output

    r = runner.invoke(app, [*base, "--adapt", "pca4", "--model", str(other)])
    assert r.exit_code == 2 and "not --model" in r.output
    # no --model: a collection-adapted index with the measured defaults (the real ensemble backbone)
    from uniembed.serve.commands import DEFAULT_ADAPT, DEFAULT_BACKBONE, index_mode

    assert (
        index_mode(None, None, None, False)
        == (DEFAULT_ADAPT, DEFAULT_BACKBONE)
        == (
            "pcaw256",
            "mobilenetv2+efficientnet_lite2",
        )
    )
    assert index_mode(None, "pca4", None, False) == ("pca4", DEFAULT_BACKBONE)
    assert index_mode(Path("m.pt"), None, None, False) == (None, None)
    assert index_mode(None, None, None, True) == (None, None)  # --add: what the index was built with
    r = runner.invoke(app, [*base, "--backbone", "tinynet"])  # 12 images cannot hold 256 dims
    assert r.exit_code == 2 and "the default is --adapt pcaw256" in r.output
    r = runner.invoke(app, [*base, "--adapt", "pca64", "--backbone", "tinynet"])
    assert r.exit_code == 2 and "min(12, 76)" in r.output
    r = runner.invoke(app, [*base, "--adapt", "pcq4", "--backbone", "tinynet"])
    assert r.exit_code == 2 and "pcaw<D>@<power>" in r.output
    r = runner.invoke(app, [*base, "--adapt", "pca4", "--backbone", "no_such_net"])
    assert r.exit_code == 2 and "no_such_net" in r.output
    r = runner.invoke(app, [*base, "--add", "--refit", "--adapt", "pca4"])  # backbone from index.json
    assert r.exit_code == 0, r.output
    assert ImageIndex.load(out).info["adapt"]["spec"] == "pca4"


def test_search_and_serve_find_the_query_model_after_a_move(
    adapted: Path, folder: Path, tmp_path: Path
) -> None:
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(adapted, moved)
    copy = tmp_path / "copy_of_query_model.pt"
    shutil.copy2(adapted / QUERY_MODEL, copy)
    ix, emb = open_index_and_model(moved)
    assert emb.source == moved / QUERY_MODEL and ix.adapted
    assert open_index_and_model(moved, copy)[1].fingerprint == ix.fingerprint  # the same file's bytes

    client = TestClient(create_app(moved, warmup=False))
    h = client.get("/health").json()
    p = h["projection"]
    assert h["dim"] == 8 and h["model_fingerprint"] == file_fingerprint(moved / QUERY_MODEL)
    assert (p["spec"], p["dim"], p["fitted_on"], p["backbone"]) == ("pcaw8", 8, 12, "tinynet")
    assert p["fitted_at"] and p["whiten_power"] == 0.5
    query = folder / "label0" / "3.png"
    r = client.post("/search", files={"image": ("q.png", query.read_bytes(), "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["path"] == str(query) and r.json()["results"][0]["distance"] < 1e-3
    page = client.get("/static/app.js").text
    assert "h.projection" in page

    other = make_tiny_model(tmp_path / "other.pt", dim=8)
    with pytest.raises(ModelMismatchError, match="collection-adapted"):
        create_app(moved, other, warmup=False)
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 200, 10)).save(buf, format="PNG")
    assert client.post("/embed", files={"image": ("g.png", buf.getvalue(), "image/png")}).json()["dim"] == 8


def test_real_photos_with_the_real_backbone(small_labels_csv: Path, tmp_path: Path) -> None:
    """mobilenetv2 (offline ImageNet weights) on 48 real photos: the scripted query model reproduces the
    index and every photo finds itself first (skips when ../shared/data is absent)."""
    out = tmp_path / "idx"
    res = build_index(
        None, [small_labels_csv], out, adapt="pcaw16", backbone="mobilenetv2", batch_size=16, progress=False
    )
    assert res.adapt is not None and res.adapt["fitted_on"] == 48 and res.adapt["feature_dim"] == 1280
    ix, emb = open_index_and_model(out)
    q = emb.embed_images(_load(indexed_paths(ix)))
    np.testing.assert_allclose(q, index_vectors(ix), atol=1e-4)
    assert [h[0].id for h in ix.search_batch(q, k=1)] == list(range(48))
