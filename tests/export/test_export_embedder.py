"""The one embedder (uniembed.export.embedder) on tiny GuieModels: batching across sizes with the model's own
resize, the verified fast paths (optimised TorchScript, the model.onnx twin) and clear errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from uniembed.core.runtime import torch_threads
from uniembed.export.embedder import (
    Embedder,
    ModelError,
    ModelNotFoundError,
    file_fingerprint,
    load_embedder,
)
from uniembed.export.model import GuieModel
from uniembed.models.heads import build_head
from uniembed.models.preprocess import ImagePreprocessor, PreprocessConfig

SIZES = [(20, 30), (40, 10), (20, 30), (24, 24), (64, 48), (20, 30), (33, 33)]


def _tiny() -> GuieModel:
    torch.manual_seed(0)
    bb = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    bb = nn.Sequential(bb, nn.Flatten())
    with torch.no_grad():  # non-trivial BN statistics, so conv+BN folding has something to fold
        bb[0][1].running_mean.uniform_(-0.2, 0.2)
        bb[0][1].running_var.uniform_(0.5, 2.0)
    head = build_head({"in_dim": 6, "out_dim": 4, "center": False})
    return GuieModel(ImagePreprocessor(PreprocessConfig(input_size=24)), bb.eval(), head.eval()).eval()


def _images(seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in SIZES]


def _one_by_one(model: nn.Module, imgs: list[torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(im.unsqueeze(0)).numpy() for im in imgs])


class _Spy(nn.Module):
    """Records the shape of every batch the embedder sends to the model."""

    def __init__(self, model: nn.Module, calls: list[tuple[int, ...]]):
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.model(x)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "saved_model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_tiny()).save(str(path))
    return path


def test_pre_resize_batches_across_sizes_and_keeps_order() -> None:
    m = _tiny()
    calls: list[tuple[int, ...]] = []
    emb = Embedder(_Spy(m, calls), None, "x", batch_size=3, resize=m.preprocessor.resize)
    imgs = _images()
    out = emb.embed_iter(iter(imgs))
    # every image is resized to 24x24 by the model's own function, so batches fill regardless of size
    assert [c[0] for c in calls] == [3, 3, 1] and all(c[1:] == (3, 24, 24) for c in calls)
    np.testing.assert_allclose(out, _one_by_one(m, imgs), atol=1e-5)
    assert emb([]).shape == (0, 4)


def test_without_resize_groups_by_size() -> None:
    m = _tiny()
    calls: list[tuple[int, ...]] = []
    imgs = _images()
    out = Embedder(_Spy(m, calls), None, "x", batch_size=2).embed_images(imgs)
    assert {c[2:] for c in calls} == {(h, w) for h, w in SIZES} and max(c[0] for c in calls) == 2
    np.testing.assert_allclose(out, _one_by_one(m, imgs), atol=1e-5)


def test_load_embedder_torch_fast_path_matches_plain_model(saved: Path) -> None:
    emb = load_embedder(saved, batch_size=4)
    assert emb.engine == "torch" and emb.fingerprint == file_fingerprint(saved)
    d = emb.describe()
    assert d["batching"].startswith("pre-resized")
    assert d["notes"] == []  # optimize_for_inference applied and verified, pre-resizing verified
    imgs = _images(1)
    plain = torch.jit.load(str(saved)).eval()
    np.testing.assert_allclose(emb.embed_images(imgs), _one_by_one(plain, imgs), atol=1e-4)
    plain_emb = load_embedder(saved, optimize=False)
    np.testing.assert_allclose(plain_emb.embed_images(imgs), _one_by_one(plain, imgs), atol=1e-5)
    emb.warmup(size=40, runs=1)
    assert emb.dim == 4


def test_onnx_twin_is_used_only_when_tied_to_the_file(saved: Path, tmp_path: Path) -> None:
    from uniembed.export.onnx_export import export_onnx

    d = tmp_path / "export"
    d.mkdir()
    (d / "saved_model.pt").write_bytes(saved.read_bytes())
    rec = export_onnx(_tiny(), d / "model.onnx", 24)
    assert rec["dynamic_hw"]
    fp = file_fingerprint(d / "saved_model.pt")
    (d / "export.json").write_text(
        json.dumps({"fingerprint": fp, "saved_model": {"fingerprint": fp}, "onnx": rec})
    )

    imgs = _images(2)
    ref = _one_by_one(torch.jit.load(str(saved)).eval(), imgs)
    auto = load_embedder(d, engine="auto")
    assert auto.engine == "onnxruntime" and auto.fingerprint == fp
    np.testing.assert_allclose(auto.embed_images(imgs), ref, atol=1e-4)
    assert load_embedder(d).engine == "torch"  # the default runs the submission file itself

    # export.json of another saved_model.pt: the ONNX file is not trusted
    (d / "export.json").write_text(json.dumps({"saved_model": {"fingerprint": "0" * 16}, "onnx": rec}))
    fallback = load_embedder(d, engine="auto")
    assert fallback.engine == "torch" and any("fingerprint differs" in n for n in fallback.notes)
    with pytest.raises(ModelError, match="fingerprint differs"):
        load_embedder(d, engine="onnxruntime")


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_embedder(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):  # ModelNotFoundError is one, for callers that catch that
        load_embedder(tmp_path / "missing.pt")
    bad = tmp_path / "saved_model.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load .* as TorchScript"):
        load_embedder(bad)
    with pytest.raises(ModelError, match="unknown engine"):
        load_embedder(bad, engine="tensorrt")

    class NoEmbedding(nn.Module):  # returns the image itself: 4-D, not [B, D]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float()

    p = tmp_path / "wrong.pt"
    torch.jit.script(NoEmbedding()).save(str(p))
    with pytest.raises(ModelError, match="breaks the contract"):
        load_embedder(p)
    with pytest.raises(ModelError, match="breaks the contract"):
        Embedder(NoEmbedding(), p, "x").embed_images([torch.zeros(3, 5, 5, dtype=torch.uint8)])


def test_torch_threads_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    with torch_threads(None) as n:
        assert 1 <= n <= max(1, before, torch.get_num_threads())
    assert torch.get_num_threads() == before
