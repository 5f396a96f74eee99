"""Backbone ensembles (``mobilenetv2+efficientnet_lite2``): each member with its own preprocessing,
L2-normalised and joined; one Backbone through extract (ONNX Runtime), export (TorchScript + ONNX, parity),
index and search."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from run_dirs import write_head_run
from uniembed.data.sources import write_labels_csv
from uniembed.models.preprocess import ImagePreprocessor
from uniembed.models.registry import create_backbone

PAIR = "mobilenetv2+efficientnet_lite2"


@pytest.fixture(scope="module")
def pair_random():
    return create_backbone(PAIR, pretrained=False)


def test_ensemble_is_one_backbone_with_each_members_config(pair_random) -> None:
    bb = pair_random
    m = create_backbone("mobilenetv2", pretrained=False)
    lite = create_backbone("efficientnet_lite2", pretrained=False)
    assert bb.name == PAIR and bb.dim == m.dim + lite.dim == 2560
    assert bb.preprocess.input_size == 260  # the largest member side; pixels only scaled to [0, 1]
    assert bb.preprocess.mean == (0.0, 0.0, 0.0) and bb.preprocess.std == (1.0, 1.0, 1.0)
    members = bb.info["members"]
    assert [x["name"] for x in members] == ["mobilenetv2", "efficientnet_lite2"]
    assert members[0]["preprocess"]["input_size"] == 224 and members[1]["preprocess"]["input_size"] == 260
    assert bb.fingerprint() not in (m.fingerprint(), lite.fingerprint())
    assert create_backbone(PAIR, pretrained=False).fingerprint() == bb.fingerprint()  # deterministic
    swapped = create_backbone("efficientnet_lite2+mobilenetv2", pretrained=False)
    assert swapped.fingerprint() != bb.fingerprint()
    with_colour = create_backbone(PAIR, pretrained=False, pooling="avg+colour")
    assert with_colour.dim == 2560 + 512


def test_bad_ensemble_names_fail_clearly() -> None:
    with pytest.raises(KeyError, match="empty member"):
        create_backbone("mobilenetv2+", pretrained=False)
    with pytest.raises(KeyError, match="unknown backbone 'nope'"):
        create_backbone("mobilenetv2+nope", pretrained=False)


def test_each_member_sees_its_own_preprocessing(pair_random) -> None:
    """Block i of the output is member i's L2-normalised features of *its* input (own side, own mean/std),
    scaled by 1/sqrt(2); the unit-norm join gives each member the same weight in cosine similarity."""
    bb = pair_random
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 300, 200), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        y = bb.module(ImagePreprocessor(bb.preprocess)(img))
        assert torch.allclose(y.norm(dim=1), torch.ones(2), atol=1e-5)
        m = create_backbone("mobilenetv2", pretrained=False)
        lite = create_backbone("efficientnet_lite2", pretrained=False)
        # lite2 runs at the ensemble side (260): exactly its own preprocessing of the same image
        ref_lite = F.normalize(lite.module(ImagePreprocessor(lite.preprocess)(img)), dim=1) / 2**0.5
        assert torch.allclose(y[:, 1280:], ref_lite, atol=1e-5)
        # mobilenetv2 is resized 260 -> 224 inside: close to resizing the photo straight to 224
        ref_m = F.normalize(m.module(ImagePreprocessor(m.preprocess)(img)), dim=1) / 2**0.5
        cos = F.cosine_similarity(y[:, :1280], ref_m, dim=1)
        assert (cos > 0.98).all(), cos
        ts = torch.jit.script(bb.module)
        x = ImagePreprocessor(bb.preprocess)(img)
        assert torch.allclose(ts(x), bb.module(x), atol=1e-6)


@pytest.mark.slow
@pytest.mark.shared_data
def test_ensemble_through_extract_export_index_and_search(
    small_labels_csv: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Real weights, 12 real photos: extract (ONNX Runtime) == torch features; export passes parity
    (TorchScript); an index built with the exported model finds each photo first."""
    from uniembed.data.prepare import prepare
    from uniembed.export.guie import export_guie
    from uniembed.features.extract import extract
    from uniembed.features.store import load_feature_set
    from uniembed.models.heads import build_head, init_head_from_features
    from uniembed.serve.index import build_index, search_paths

    root = tmp_path_factory.mktemp("pair")
    with open(small_labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))[:12]
    sub = root / "labels.csv"
    write_labels_csv(sub, rows)
    prepare([str(sub)], root / "ds", workers=1, progress=False)
    fdir = extract(root / "ds", backbone=PAIR, out_root=root / "feats", progress=False, workers=0)
    info = json.loads((fdir / "info.json").read_text())
    assert info["backbone"] == PAIR and info["dim"] == 2560 and info["engine"] == "onnxruntime"
    fs = load_feature_set(fdir)
    feats = np.asarray(fs.features, np.float32)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=2e-3)

    bb = create_backbone(PAIR)
    from uniembed.features.extract import embed_paths

    ref = embed_paths(list(fs.paths), bb, engine="torch", progress=False, workers=0).features  # same order
    # same images (the shards are re-encoded copies): agree to within JPEG re-encoding noise
    cos = (feats * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.97, cos

    cfg = {"in_dim": 2560, "out_dim": 8, "init": "pca"}
    head = build_head(cfg)
    init_head_from_features(head, torch.from_numpy(feats), "pca")
    run = write_head_run(root / "run", head, cfg, fdir, info)
    # ONNX of the ensemble: checked in tests/lab/test_model_universality.py (`make model` writes it)
    rec = export_guie(run, root / "model", onnx=False, parity_images=4, progress=False)
    assert rec["parity"]["passed"] and rec["backbone"]["name"] == PAIR
    assert [m["name"] for m in rec["backbone"]["members"]] == ["mobilenetv2", "efficientnet_lite2"]
    card = (root / "model" / "model_card.md").read_text()
    assert "Ensemble:" in card and "`efficientnet_lite2` (1280-d" in card
    model = torch.jit.load(str(root / "model" / "saved_model.pt"))
    out = model(torch.randint(0, 256, (1, 3, 123, 77), dtype=torch.uint8))
    assert out.dtype == torch.float32 and tuple(out.shape) == (1, 8)

    build_index(root / "model" / "saved_model.pt", str(sub), root / "index", progress=False)
    hits = search_paths(root / "index", [rows[0]["path"], rows[5]["path"]], k=3)
    assert Path(hits[0][0]["path"]).name == Path(rows[0]["path"]).name
    assert Path(hits[1][0]["path"]).name == Path(rows[5]["path"]).name
