"""GUIE export with the real MobileNetV2 weights and a freshly initialised head, on real photos.

One module-scoped export (prepare 24 photos -> extract features -> run dir -> saved_model.pt + model.onnx +
card + parity) is shared by every test here."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import PILToTensor

from run_dirs import write_head_run
from uniembed.data.sources import write_labels_csv

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def subset_csv(small_labels_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 labels per domain x 4 photos = 24 real photos (grocery JPEGs, coil100 PNGs)."""
    with open(small_labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    per_dom: dict[str, list[str]] = {}
    for r in rows:
        labs = per_dom.setdefault(r["domain"], [])
        if r["label"] not in labs and len(labs) < 2:
            labs.append(r["label"])
    keep = [r for r in rows if r["label"] in per_dom[r["domain"]]]
    out = tmp_path_factory.mktemp("subset") / "labels.csv"
    write_labels_csv(out, keep)
    return out


@pytest.fixture(scope="module")
def exported(subset_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from uniembed.data.prepare import prepare
    from uniembed.export.guie import export_guie
    from uniembed.features.extract import extract
    from uniembed.models.heads import build_head

    root = tmp_path_factory.mktemp("export")
    prepare([str(subset_csv)], root / "ds", workers=1, progress=False)
    fdir = extract(root / "ds", backbone="mobilenetv2", out_root=root / "feats", progress=False, workers=0)
    info = json.loads((fdir / "info.json").read_text())
    cfg = {"in_dim": int(info["dim"]), "out_dim": 64}
    torch.manual_seed(0)
    head = build_head(cfg)
    run = write_head_run(root / "run", head, cfg, fdir, info)
    out = root / "model"
    rec = export_guie(run, out, onnx=True, parity_images=4, progress=False)
    with open(subset_csv, newline="") as f:
        photos = [r["path"] for r in csv.DictReader(f)]
    return {
        "run": run,
        "out": out,
        "rec": rec,
        "fdir": fdir,
        "ds": root / "ds",
        "photos": photos,
        "csv": subset_csv,
    }


@pytest.fixture(scope="module")
def run_model(exported: dict):  # -> uniembed.export.model.RunModel
    from uniembed.export.model import build_run_model

    return build_run_model(exported["run"])


def _load_ts(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path)).eval()


def _test_images(photos: list[str]) -> dict[str, Image.Image]:
    """Real photos of different sizes + a synthetic odd size + a grayscale converted to RGB by the caller."""
    jpg = next(p for p in photos if p.endswith(".jpg") and Image.open(p).size == (348, 348))
    png = next(p for p in photos if p.endswith(".png"))
    imgs = {"grocery": Image.open(jpg).convert("RGB"), "coil100": Image.open(png).convert("RGB")}
    rng = np.random.default_rng(0)
    imgs["synthetic97x301"] = Image.fromarray(rng.integers(0, 256, (301, 97, 3), dtype=np.uint8))
    imgs["grayscale"] = Image.open(jpg).convert("L").convert("RGB")
    return imgs


def test_files_and_parity_record(exported: dict) -> None:
    out, rec = exported["out"], exported["rec"]
    for f in ("saved_model.pt", "model.onnx", "model_card.md", "export.json"):
        assert (out / f).is_file(), f
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["fingerprint"] == rec["fingerprint"] and len(rec["fingerprint"]) == 16
    par = rec["parity"]
    assert par["passed"] and par["min_cosine"] >= 0.999
    names = {c["name"] for c in par["comparisons"]}
    # cached-feature path compared on the shard images, plus original photos through both exported files
    assert {
        "python vs cached features (shard JPEGs)",
        "torchscript vs cached features (shard JPEGs)",
        "onnx vs cached features (shard JPEGs)",
        "torchscript vs python (photos)",
        "onnx vs python (photos)",
    } <= names
    assert par["images"]["shard_samples"] >= 3 and par["images"]["photos"] == 4
    assert rec["onnx"]["dynamic_hw"] is True
    assert rec["backbone"]["name"] == "mobilenetv2" and len(rec["backbone"]["weights_hash"]) == 64


def test_saved_model_on_real_photos_of_any_size(exported: dict) -> None:
    model = _load_ts(exported["out"] / "saved_model.pt")
    to_t = PILToTensor()
    sizes = set()
    outs = {}
    with torch.no_grad():
        for name, im in _test_images(exported["photos"]).items():
            x = to_t(im).unsqueeze(0)
            assert x.dtype == torch.uint8
            sizes.add(tuple(x.shape[2:]))
            y = model(x)
            assert y.dtype == torch.float32 and tuple(y.shape) == (1, 64), name
            assert torch.isfinite(y).all(), name
            assert float(y.norm()) == pytest.approx(1.0, abs=1e-4)
            outs[name] = y
        assert {(348, 348), (128, 128), (301, 97)} <= sizes
        # batch > 1 gives the same rows as one at a time
        im = _test_images(exported["photos"])["grocery"]
        xb = torch.stack([to_t(im), to_t(im.transpose(Image.Transpose.FLIP_TOP_BOTTOM))])
        yb = model(xb)
        assert tuple(yb.shape) == (2, 64)
        torch.testing.assert_close(yb[0], outs["grocery"][0], atol=1e-5, rtol=1e-4)
        with pytest.raises(Exception, match="uint8 images"):
            model(torch.zeros(1, 348, 348, 3, dtype=torch.uint8))  # HWC by mistake: clear error


def test_onnx_matches_torchscript_on_real_photos(exported: dict) -> None:
    from uniembed.export.onnx_export import onnx_session, run_onnx

    model = _load_ts(exported["out"] / "saved_model.pt")
    sess = onnx_session(exported["out"] / "model.onnx")
    to_t = PILToTensor()
    for name, im in _test_images(exported["photos"]).items():
        x = to_t(im).unsqueeze(0)
        a = run_onnx(sess, x)
        with torch.no_grad():
            b = model(x).numpy()
        assert a.shape == (1, 64) and a.dtype == np.float32
        cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos >= 0.999, (name, cos)
    xb = torch.stack([to_t(_test_images(exported["photos"])["coil100"])] * 3)
    assert run_onnx(sess, xb).shape == (3, 64)


def test_load_embedder(exported: dict, run_model) -> None:
    from uniembed.export import load_embedder
    from uniembed.export.embedder import file_fingerprint

    imgs = list(_test_images(exported["photos"]).values())
    emb = load_embedder(exported["out"], batch_size=2)
    assert (
        emb.fingerprint
        == file_fingerprint(exported["out"] / "saved_model.pt")
        == exported["rec"]["fingerprint"]
    )
    e = emb(imgs + [imgs[0]])  # mixed sizes, in order; a repeat lands on the same vector
    assert e.shape == (5, 64) and e.dtype == np.float32 and np.isfinite(e).all()
    np.testing.assert_allclose(e[0], e[4], atol=1e-5)
    model = _load_ts(exported["out"] / "saved_model.pt")
    with torch.no_grad():
        ref = model(PILToTensor()(imgs[2]).unsqueeze(0)).numpy()[0]
    np.testing.assert_allclose(e[2], ref, atol=1e-5)
    # indexing/serving take the verified model.onnx twin: same vectors
    auto = load_embedder(exported["out"], engine="auto")
    assert auto.engine == "onnxruntime" and auto.fingerprint == emb.fingerprint
    np.testing.assert_allclose(auto(imgs), e[:4], atol=1e-4)
    # grayscale PIL and [1,H,W] tensors are accepted (replicated to RGB)
    g = load_embedder(exported["out"] / "saved_model.pt")([imgs[0].convert("L")])
    assert g.shape == (1, 64)
    # a run dir gives the eager pipeline (checked here through the same model object): same embeddings
    from uniembed.export.embedder import Embedder

    e_run = Embedder(run_model.model, exported["run"], "run")(imgs)
    np.testing.assert_allclose(e_run, e[:4], atol=1e-4)
    with pytest.raises(FileNotFoundError):
        load_embedder(exported["fdir"])


def test_parity_failure_is_loud(exported: dict, run_model) -> None:
    import copy

    from uniembed.export.parity import ParityError, check_parity, require_parity

    rm = copy.deepcopy(run_model)
    with torch.no_grad():
        rm.head.linear.weight.add_(torch.randn_like(rm.head.linear.weight))  # not what was exported
    rep = check_parity(rm, exported["out"] / "saved_model.pt", None, n_images=2)
    assert not rep["passed"] and rep["min_cosine"] < 0.999
    with pytest.raises(ParityError, match="min cosine"):
        require_parity(rep)


def test_model_card(exported: dict) -> None:
    card = (exported["out"] / "model_card.md").read_text()
    for part in (
        "## Contract",
        "uint8 [B,3,H,W]",
        "float32 [B,64]",
        "## Backbone",
        "mobilenetv2",
        exported["rec"]["backbone"]["weights_hash"],
        "## Data",
        "packaged_goods",
        "## Recipe",
        "arcface",
        "## Metrics",
        "## Parity",
        "onnx vs python (photos)",
        "passed",
    ):
        assert part in card, part


def test_evaluate_exported_model_on_real_photos(exported: dict, tmp_path: Path) -> None:
    """The exported model on the feature dir's own images (aligned with the baselines), and on labels.csv."""
    from uniembed.eval.evaluate import evaluate

    res = evaluate(
        exported["out"], exported["fdir"], tmp_path / "a", compare=["raw", "pca64"], progress=False
    )
    assert res["source_kind"] == "saved_model" and res["split"] == "val"  # export.json leads to the run
    assert set(res["methods"]) == {"saved_model", "raw", "pca64"} and res["n_images"] == 12
    assert (tmp_path / "a" / "grid.png").exists()
    # same run, head on cached features: the exported model scores the same
    res_run = evaluate(exported["run"], None, tmp_path / "b", progress=False, grid_queries=0)
    assert res_run["methods"]["head"]["overall"]["mP@5"] == pytest.approx(
        res["methods"]["saved_model"]["overall"]["mP@5"], abs=0.05
    )
    res_csv = evaluate(
        exported["out"] / "saved_model.pt",
        exported["csv"],
        tmp_path / "c",
        split="all",
        progress=False,
        grid_queries=2,
    )
    assert res_csv["n_images"] == 24 and len(res_csv["domains"]) == 3
    assert res_csv["grid"]["missing_thumbnails"] == 0


def test_check_saved_model_script(exported: dict) -> None:
    jpg = next(p for p in exported["photos"] if p.endswith(".jpg"))
    png = next(p for p in exported["photos"] if p.endswith(".png"))
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_saved_model.py"), str(exported["out"]), jpg, png],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and r.stdout.count("(1, 64)") >= 4 and "(2, 64)" in r.stdout


def test_cli_help_and_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from uniembed.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["export", "--help"])
    assert r.exit_code == 0
    for opt in ("--out", "--onnx", "--no-onnx", "--parity-images", "--photo"):
        assert opt in r.output
    r = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "head.pt" in r.output
