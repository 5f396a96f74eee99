"""`uniembed evaluate` on synthetic data: a clustered feature dir + a fresh head in a run dir, and a tiny
TorchScript GUIE model on synthetic images (labels.csv and prepared shards). Real photos: test_export.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from run_dirs import write_head_run
from uniembed.core.metrics import retrieval_metrics
from uniembed.data.sources import write_labels_csv
from uniembed.eval.evaluate import EvalError, evaluate
from uniembed.features.store import write_feature_set
from uniembed.models.heads import build_head

DOMAINS = ("alpha", "beta", "gamma")
PER_LABEL = 5


def _color(label_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(label_id)
    return tuple(int(v) for v in rng.integers(0, 256, 3))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Feature dir (3 domains x 6 labels x 5 images, 32-d clusters), image files for half of the rows,
    and a run dir with a random head + config.yaml."""
    root = tmp_path_factory.mktemp("evalsynth")
    rng = np.random.default_rng(0)
    names, rows, feats = [], [], []
    img_dir = root / "img"
    img_dir.mkdir()
    for d_i, dom in enumerate(DOMAINS):
        for j in range(6):
            lid = len(names)
            names.append(f"{dom}:obj{j}")
            center = rng.normal(size=32) * 3
            for k in range(PER_LABEL):
                i = len(rows)
                path = img_dir / f"{i:04d}.png"
                if i % 2 == 0:  # half the originals exist (thumbnails from files), half are missing
                    Image.new("RGB", (40 + 7 * k, 30 + 5 * d_i), _color(lid)).save(path)
                rows.append(
                    {
                        "key": f"{i:08d}",
                        "path": str(path),
                        "label": names[lid],
                        "label_id": lid,
                        "domain": dom,
                        "source": "synthetic",
                    }
                )
                feats.append(center + rng.normal(size=32) * (0.5 + d_i))  # gamma is the hardest domain
    fdir = write_feature_set(
        root / "feats",
        np.asarray(feats, np.float32),
        rows,
        {"backbone": "synthetic", "fingerprint": "f00d", "pooling": "avg"},
        names,
    )
    head_cfg = {"in_dim": 32, "out_dim": 8}
    torch.manual_seed(0)
    head = build_head(head_cfg)
    run = write_head_run(
        root / "run", head, head_cfg, fdir, {"backbone": "synthetic", "fingerprint": "f00d", "pooling": "avg"}
    )
    stored = np.asarray(feats, np.float32).astype(np.float16).astype(np.float32)  # the cache is float16
    return {"root": root, "fdir": fdir, "run": run, "head": head.eval(), "feats": stored, "rows": rows}


def _png_ok(path: Path) -> None:
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 100


def test_run_on_val_split_with_baselines(synth: dict, tmp_path: Path) -> None:
    from uniembed.core.splits import split_labels

    out = tmp_path / "ev"
    res = evaluate(synth["run"], None, out, split="val", compare=["raw", "pca64"], progress=False)
    # the split is the run's: recompute it independently
    labels = np.array([r["label"] for r in synth["rows"]])
    doms = np.array([r["domain"] for r in synth["rows"]])
    sp = split_labels(labels, doms, 0.5, 0)
    sel = np.isin(labels, sp.val_labels)
    assert res["split"] == "val" and res["n_images"] == int(sel.sum()) == 9 * PER_LABEL
    assert set(res["methods"]) == {"head", "raw", "pca64"}
    # head scores equal retrieval_metrics on the head's embeddings of exactly those rows
    with torch.no_grad():
        emb = synth["head"](torch.from_numpy(synth["feats"][sel])).numpy()
    _, ids = np.unique(labels[sel], return_inverse=True)
    ref = retrieval_metrics(emb, ids)
    assert res["methods"]["head"]["overall"]["mP@5"] == pytest.approx(ref.mp5)
    assert res["methods"]["head"]["overall"]["mAP@100"] == pytest.approx(ref.map100)
    # PCA was fitted on the 9 training labels (45 rows) -> min(64, 32 dims, 44) = 32 dims
    assert res["methods"]["pca64"]["dim"] == 32 and "45 rows" in res["methods"]["pca64"]["notes"]
    assert res["methods"]["raw"]["dim"] == 32
    # clusters are well separated in alpha: raw features are near perfect there, gamma is harder
    pd = res["methods"]["raw"]["per_domain"]
    assert set(pd) == set(DOMAINS) and pd["alpha"]["mP@5"] > 0.9 and pd["alpha"]["queries"] == 15
    for f in ("metrics.json", "report.md", "per_domain.png", "grid.png"):
        assert (out / f).exists(), f
    _png_ok(out / "per_domain.png")
    _png_ok(out / "grid.png")
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["methods"]["head"]["overall"]["queries"] == 45
    assert on_disk["grid"]["queries"] == 8 and on_disk["grid"]["missing_thumbnails"] > 0  # half have no file
    md = (out / "report.md").read_text()
    assert "| head |" in md and "| pca64 |" in md and "mP@5 per query domain" in md


def test_photos_split_scores_the_heldout_photos_of_training_labels(synth: dict, tmp_path: Path) -> None:
    from uniembed.core.splits import heldout_photos, split_labels
    from uniembed.train import TrainConfig

    with pytest.raises(EvalError, match="photo_fraction"):  # the run held out no photos
        evaluate(synth["run"], None, tmp_path / "none", split="photos", progress=False)
    run = tmp_path / "run"  # the same head, trained (per its config) with photos held out
    run.mkdir()
    (run / "head.pt").write_bytes((synth["run"] / "head.pt").read_bytes())
    cfg = TrainConfig(features=[str(synth["fdir"])])
    cfg.split.photo_fraction = 0.4
    cfg.to_yaml(run / "config.yaml")
    res = evaluate(run, None, tmp_path / "ev", split="photos", compare=["raw", "pca64"], progress=False)
    labels = np.array([r["label"] for r in synth["rows"]])
    doms = np.array([r["domain"] for r in synth["rows"]])
    sp = split_labels(labels, doms, 0.5, 0)
    sel = heldout_photos(labels, doms, sp.train_labels, 0.4, 0)
    assert res["split"] == "photos" and res["n_images"] == int(sel.sum()) == 9 * 2
    assert set(labels[sel]) == set(sp.train_labels)
    with torch.no_grad():
        emb = synth["head"](torch.from_numpy(synth["feats"][sel])).numpy()
    _, ids = np.unique(labels[sel], return_inverse=True)
    assert res["methods"]["head"]["overall"]["mP@5"] == pytest.approx(retrieval_metrics(emb, ids).mp5)
    # PCA is fitted on the training labels' photos that were trained on: 9 labels x 3 photos
    assert "27 rows" in res["methods"]["pca64"]["notes"]


def test_split_all_domain_filter_and_feature_source(synth: dict, tmp_path: Path) -> None:
    res = evaluate(synth["run"], synth["fdir"], tmp_path / "a", split="all", domains=["beta"], progress=False)
    assert (
        res["n_images"] == 6 * PER_LABEL and res["domains"] == ["beta"] and list(res["methods"]) == ["head"]
    )
    # a feature dir alone: the baselines, on every image
    res = evaluate(synth["fdir"], None, tmp_path / "b", progress=False, grid_queries=0)
    assert list(res["methods"]) == ["raw", "pca64"] and res["n_images"] == 18 * PER_LABEL
    x = synth["feats"] / np.linalg.norm(synth["feats"], axis=1, keepdims=True)
    _, ids = np.unique([r["label"] for r in synth["rows"]], return_inverse=True)
    assert res["methods"]["raw"]["overall"]["mP@5"] == pytest.approx(retrieval_metrics(x, ids).mp5)
    assert not (tmp_path / "b" / "grid.png").exists()


def test_bad_inputs_give_clear_errors(synth: dict, tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="training run"):
        evaluate(synth["fdir"], None, tmp_path, split="val", progress=False)
    with pytest.raises(EvalError, match="compare"):
        evaluate(synth["run"], None, tmp_path, compare=["pca"], progress=False)
    with pytest.raises(EvalError, match="does not exist"):
        evaluate(tmp_path / "nope", None, tmp_path, progress=False)
    with pytest.raises(EvalError, match="no images selected"):
        evaluate(synth["run"], None, tmp_path, domains=["nope"], progress=False)


# ------------------------------------------------------------------------------- image route (tiny model)


class _TinyBackbone(nn.Module):
    """Mean colour + a coarse 2x2 colour layout: enough to tell the synthetic colour classes apart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)], 1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uniembed.export.model import GuieModel, quiet_jit
    from uniembed.models.preprocess import ImagePreprocessor, PreprocessConfig

    torch.manual_seed(0)
    head = build_head({"in_dim": 15, "out_dim": 8, "center": False, "l2_input": False})
    m = GuieModel(ImagePreprocessor(PreprocessConfig(input_size=16)), _TinyBackbone(), head.eval()).eval()
    path = tmp_path_factory.mktemp("tiny") / "saved_model.pt"
    with quiet_jit():
        torch.jit.save(torch.jit.script(m), str(path))
    return path


def _synthetic_images(root: Path) -> list[dict]:
    """4 colour classes x 4 images of different sizes, 2 domains; one corrupt file (skipped, counted)."""
    rows = []
    for lid in range(4):
        for k in range(4):
            p = root / f"c{lid}_{k}.jpg"
            Image.new("RGB", (30 + 11 * k, 20 + 3 * lid), _color(lid + 10)).save(p)
            rows.append({"path": p.name, "label": f"col{lid}", "domain": "warm" if lid < 2 else "cold"})
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    rows.append({"path": "broken.jpg", "label": "col0", "domain": "warm"})
    return rows


def test_saved_model_on_labels_csv_and_shards(tiny_model: Path, tmp_path: Path) -> None:

    img = tmp_path / "imgs"
    img.mkdir()
    rows = _synthetic_images(img)
    write_labels_csv(img / "labels.csv", rows)
    res = evaluate(tiny_model, img / "labels.csv", tmp_path / "e1", progress=False)
    assert res["source_kind"] == "saved_model" and res["split"] == "all"
    assert res["n_images"] == 16 and sum(res["skipped"].values()) == 1
    assert res["methods"]["saved_model"]["overall"]["mP@5"] == pytest.approx(1.0)  # flat colours: trivial
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["grid"]["missing_thumbnails"] == 0

    # the same images as a prepared dataset (WebDataset tar + manifest, docs/design.md), originals gone
    ds = tmp_path / "ds"
    ds.mkdir()
    with tarfile.open(ds / "shard-000000.tar", "w") as tar:
        for i, r in enumerate(rows[:-1]):
            buf = io.BytesIO()
            Image.open(img / r["path"]).convert("RGB").save(buf, "JPEG", quality=95)
            meta = {
                "label": r["label"],
                "label_id": int(r["label"][3:]),
                "domain": r["domain"],
                "source": "synthetic",
                "path": str(tmp_path / "gone" / r["path"]),
            }
            for ext, data in (("jpg", buf.getvalue()), ("json", json.dumps(meta).encode())):
                ti = tarfile.TarInfo(f"{i:08d}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    (ds / "manifest.json").write_text(
        json.dumps({"version": 1, "hash": "x", "count": 16, "shards": ["shard-000000.tar"], "labels": []})
    )
    res2 = evaluate(tiny_model.parent, ds, tmp_path / "e2", domains=["cold"], progress=False)
    assert res2["n_images"] == 8 and res2["domains"] == ["cold"]
    assert res2["methods"]["saved_model"]["overall"]["mP@5"] == pytest.approx(1.0)
    # thumbnails came from the shards (original paths do not exist)
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["grid"]["missing_thumbnails"] == 0
    with pytest.raises(EvalError, match="--compare needs features"):
        evaluate(tiny_model, ds, tmp_path / "e3", compare=["raw"], progress=False)


def test_cli(synth: dict, tmp_path: Path) -> None:
    from uniembed.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["evaluate", "--help"])
    assert r.exit_code == 0
    for opt in ("--data", "--out", "--split", "--domains", "--compare", "--grid-queries"):
        assert opt in r.output
    r = runner.invoke(
        app, ["evaluate", str(synth["run"]), "--out", str(tmp_path / "c"), "--compare", "raw,pca64", "-q"]
    )
    assert r.exit_code == 0, r.output
    assert "pca64" in r.output and (tmp_path / "c" / "grid.png").exists()
    r = runner.invoke(app, ["evaluate", str(tmp_path / "missing"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "does not exist" in r.output
