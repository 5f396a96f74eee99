"""Export building blocks on a tiny model (no weights, no photos): scripting with a traced fallback, the
fixed-size ONNX fallback, input conversion, query spreading (the embedder itself: test_export_embedder.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from uniembed.core.splits import spread_rows
from uniembed.export.embedder import to_uint8_chw
from uniembed.export.model import GuieModel, script_model
from uniembed.models.heads import build_head
from uniembed.models.preprocess import ImagePreprocessor, PreprocessConfig


class _Unscriptable(nn.Module):
    """Conv + pooling whose forward uses Python that TorchScript rejects (a lambda), so it must be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.act = lambda t: t.clamp_min(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)).mean(dim=(2, 3))


def _tiny(backbone: nn.Module | None = None) -> GuieModel:
    torch.manual_seed(0)
    bb = backbone or nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    head = build_head({"in_dim": 6, "out_dim": 4, "center": False})
    return GuieModel(ImagePreprocessor(PreprocessConfig(input_size=24)), bb.eval(), head.eval()).eval()


def test_script_model_scripts_or_traces() -> None:
    m = _tiny()
    ts, how = script_model(m, 24)
    assert how == "scripted"
    m2 = _tiny(_Unscriptable())
    ts2, how2 = script_model(m2, 24)
    assert how2 == "traced"
    for model, ref in ((ts, m), (ts2, m2)):
        for shape in ((1, 3, 24, 24), (3, 3, 50, 17)):  # traced at 24x24, used at any size + batch
            x = torch.randint(0, 256, shape, dtype=torch.uint8)
            with torch.no_grad():
                torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match="uint8 images"):
        ts(torch.zeros(2, 24, 24, dtype=torch.uint8))


def test_onnx_fixed_size_fallback(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dynamic H/W path is covered with the real model in test_export.py; here it is made to fail so the
    documented fixed-size variant is written and verified."""
    from uniembed.export import onnx_export
    from uniembed.export.onnx_export import export_onnx, onnx_session, run_onnx

    m = _tiny()
    real = onnx_export._quiet_export

    def no_dynamic(model, example, path, dynamic):  # simulate an exporter that cannot do dynamic H/W
        if dynamic:
            raise RuntimeError("dynamic shapes unsupported here")
        return real(model, example, path, dynamic)

    monkeypatch.setattr(onnx_export, "_quiet_export", no_dynamic)
    rec = export_onnx(m, tmp_path / "fixed.onnx", 24)
    assert not rec["dynamic_hw"] and "24,24" in rec["input"] and "dynamic shapes unsupported" in rec["notes"]
    assert not (tmp_path / "fixed.onnx.tmp").exists()
    sess = onnx_session(tmp_path / "fixed.onnx")
    x = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    np.testing.assert_allclose(run_onnx(sess, x), m(x).detach().numpy(), atol=1e-5)


def test_to_uint8_chw() -> None:
    rgb = to_uint8_chw(Image.new("RGB", (5, 4), (1, 2, 3)))
    assert rgb.shape == (3, 4, 5) and rgb.dtype == torch.uint8 and rgb[:, 0, 0].tolist() == [1, 2, 3]
    assert to_uint8_chw(Image.new("L", (5, 4), 9)).shape == (3, 4, 5)
    assert to_uint8_chw(Image.new("RGBA", (5, 4))).shape == (3, 4, 5)
    assert to_uint8_chw(torch.zeros(1, 4, 5, dtype=torch.uint8)).shape == (3, 4, 5)
    with pytest.raises(TypeError, match="uint8"):
        to_uint8_chw(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="3,H,W"):
        to_uint8_chw(torch.zeros(6, 5, 3, dtype=torch.uint8))


def test_spread_rows() -> None:
    doms = np.array(["a"] * 10 + ["b"] * 2 + ["c"] * 5)
    rows = spread_rows(doms, 6)
    assert len(rows) == 6 and {doms[r] for r in rows} == {"a", "b", "c"}
    assert spread_rows(doms, 6) == rows  # deterministic
    few = spread_rows(doms, 9, allowed=doms != "a")
    assert len(few) == 7 and all(doms[r] != "a" for r in few)
    assert spread_rows(doms, 0) == [] and len(spread_rows(doms, 100)) == 17
