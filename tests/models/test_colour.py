"""``<pooling>+colour``: the joint RGB histogram block appended to the CNN features (models/colour.py)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniembed.eval.evaluate import EvalError, evaluate
from uniembed.features.store import write_feature_set
from uniembed.models.colour import COLOUR_BINS, COLOUR_WEIGHT, ColourHistogram, split_colour
from uniembed.models.pooling import PoolingSpec
from uniembed.models.registry import create_backbone

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _reference(pixels: np.ndarray, bins: int = COLOUR_BINS, pool: int = 4) -> np.ndarray:
    """Plain numpy: pixels uint8-range floats [B,3,H,W] -> sqrt joint histogram, L2-normalised, weighted."""
    b, _, h, w = pixels.shape
    x = pixels / 255.0
    x = x.reshape(b, 3, h // pool, pool, w // pool, pool).mean(axis=(3, 5))
    q = np.clip(np.floor(x * bins), 0, bins - 1).astype(int)
    idx = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    out = []
    for i in range(b):
        hist = np.bincount(idx[i].ravel(), minlength=bins**3) / idx[i].size
        v = np.sqrt(hist)
        out.append(v / np.linalg.norm(v) * COLOUR_WEIGHT)
    return np.stack(out)


def _normalise(pixels: torch.Tensor, mean=IMAGENET[0], std=IMAGENET[1]) -> torch.Tensor:
    return (pixels / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_split_colour() -> None:
    assert split_colour("avg+stages_l2+colour") == ("avg+stages_l2", True)
    assert split_colour("gem+colour") == ("gem", True)
    assert split_colour("avg+stages_l2") == ("avg+stages_l2", False)
    # Agrees with the typed spec on every valid name.
    for name in ("avg+stages_l2+colour", "gem4+colour", "native+colour", "avg", "gem+stages"):
        spec = PoolingSpec.parse(name)
        assert split_colour(name) == (str(spec.without_colour()), spec.colour)


def test_histogram_of_a_two_colour_image() -> None:
    """Left half pure red, right half pure blue: two bins of mass 1/2 each, nothing else."""
    img = torch.zeros(1, 3, 32, 32)
    img[0, 0, :, :16] = 255.0
    img[0, 2, :, 16:] = 255.0
    h = ColourHistogram(*IMAGENET)(_normalise(img))[0]
    red, blue = 7 * 64, 7  # r=7,g=0,b=0 and r=0,g=0,b=7
    assert h.shape == (512,) and torch.count_nonzero(h) == 2
    expected = COLOUR_WEIGHT / math.sqrt(2)  # sqrt(1/2) each, L2-normalised, times the weight
    assert h[red].item() == pytest.approx(expected, abs=1e-5) and h[blue].item() == pytest.approx(
        expected, abs=1e-5
    )


def test_histogram_matches_numpy_reference() -> None:
    g = torch.Generator().manual_seed(0)
    # Smooth-ish random image (blocks of colour) so pooling does not average everything to grey.
    small = torch.randint(0, 256, (3, 3, 8, 8), generator=g).float()
    pixels = F.interpolate(small, size=(64, 64), mode="nearest")
    pixels = (pixels + torch.randint(0, 20, pixels.shape, generator=g)).clamp(0, 255)
    got = ColourHistogram(*IMAGENET)(_normalise(pixels)).numpy()
    ref = _reference(pixels.numpy().astype(np.float64))
    # float32 de-normalisation may move a pixel that sits exactly on a bin edge: compare as vectors
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.999
    assert np.allclose(np.linalg.norm(got, axis=1), COLOUR_WEIGHT, atol=1e-5)


def test_colour_pooling_backbone() -> None:
    """``avg+stages_l2+colour`` = the ``avg+stages_l2`` features, then the colour block; its own fingerprint;
    the same block whatever the backbone's input normalisation (MobileNetV2 vs EfficientNet-Lite)."""
    base = create_backbone("mobilenetv2", pooling="avg+stages_l2")
    bb = create_backbone("mobilenetv2", pooling="avg+stages_l2+colour")
    assert bb.dim == base.dim + 512 and bb.pooling == "avg+stages_l2+colour"
    assert bb.info["colour"]["dim"] == 512 and bb.fingerprint() != base.fingerprint()
    # 4x4 blocks (the block's pooling) of bin-centre values: no pixel near a bin edge, so both input
    # normalisations must give exactly the same histogram.
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 8, (2, 3, 24, 24), generator=g).float() * 32 + 16
    pixels = F.interpolate(small, scale_factor=4, mode="nearest")
    x = bb.preprocessor().normalize(pixels)
    with torch.no_grad():
        out, ref = bb.module(x), base.module(x)
    assert torch.allclose(out[:, : base.dim], ref, atol=1e-6)
    lite = create_backbone("efficientnet_lite0", pooling="avg+colour")
    with torch.no_grad():
        lite_hist = lite.module(lite.preprocessor().normalize(pixels))[:, -512:]
    assert torch.allclose(lite_hist, out[:, -512:], atol=1e-4)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        assert torch.allclose(torch.jit.script(bb.module)(x), out, atol=1e-5)
        assert torch.allclose(torch.jit.trace(bb.module, x)(x), out, atol=1e-5)
    with pytest.raises(ValueError, match="unknown pooling"):
        create_backbone("mobilenetv2", pooling="max+colour")


def test_colour_onnx_engine_agrees(tmp_path: Path) -> None:
    """The extraction engine's ONNX export (scatter-add histogram inside) computes what torch does."""
    import onnxruntime as ort

    from uniembed.features.extract import PixelEmbedder, export_onnx

    bb = create_backbone("mobilenetv2", pooling="avg+colour")
    path = export_onnx(bb, tmp_path / "m.onnx")
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (3, 3, 224, 224), generator=g).float()  # the engine takes resized pixels
    cells = torch.randint(0, 8, (1, 3, 56, 56), generator=g).float() * 32 + 16  # one value per 4x4 pool cell
    pixels = torch.cat([noise[:2], F.interpolate(cells, scale_factor=4, mode="nearest")])
    with torch.no_grad():
        ref = PixelEmbedder(bb).eval()(pixels).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["features"], {"pixels": pixels.numpy()}
    )[0]
    assert got.shape == (3, 1280 + 512)
    assert np.allclose(got[:, :1280], ref[:, :1280], atol=1e-4)
    cos = (got[:, 1280:] * ref[:, 1280:]).sum(1) / 2.0  # both blocks have norm sqrt(2)
    assert cos.min() > 0.9999  # random pixels: one may sit on a bin edge and round the other way
    # constant 4x4 cells of bin-centre values: nowhere near an edge, so ONNX and torch must agree exactly
    assert np.allclose(got[2, 1280:], ref[2, 1280:], atol=1e-5)


def test_cnn_only_baselines(tmp_path: Path) -> None:
    """``raw_cnn`` / ``pca<k>_cnn`` score the features without their colour block."""
    rng = np.random.default_rng(0)
    rows, feats = [], []
    for lab in range(6):
        centre = rng.normal(size=16)
        for _k in range(4):
            rows.append(
                {
                    "key": f"{len(rows):08d}",
                    "path": f"/none/{len(rows)}.jpg",
                    "label": f"l{lab}",
                    "label_id": lab,
                    "domain": "d",
                    "source": "synthetic",
                }
            )
            # CNN part: clean clusters; colour part: pure noise that would hide them
            feats.append(np.concatenate([centre + 0.1 * rng.normal(size=16), 5 * rng.normal(size=512)]))
    info = {"backbone": "synthetic", "fingerprint": "c0l0", "pooling": "avg+colour"}
    fdir = write_feature_set(
        tmp_path / "f", np.asarray(feats, np.float32), rows, info, [f"l{i}" for i in range(6)]
    )
    res = evaluate(
        fdir, None, tmp_path / "e", compare=["raw", "raw_cnn", "pca8_cnn"], progress=False, grid_queries=0
    )
    m = res["methods"]
    assert m["raw_cnn"]["dim"] == 16 and m["pca8_cnn"]["dim"] == 8
    assert m["raw_cnn"]["overall"]["mP@5"] == pytest.approx(1.0)
    assert m["raw"]["overall"]["mP@5"] < 0.9
    plain = write_feature_set(
        tmp_path / "p",
        np.asarray(feats, np.float32),
        rows,
        {**info, "pooling": "avg"},
        [f"l{i}" for i in range(6)],
    )
    with pytest.raises(EvalError, match="no colour block"):
        evaluate(plain, None, tmp_path / "e2", compare=["raw_cnn"], progress=False, grid_queries=0)
    with pytest.raises(EvalError, match="unknown --compare"):
        evaluate(plain, None, tmp_path / "e3", compare=["rawcnn"], progress=False, grid_queries=0)
