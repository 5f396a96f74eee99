"""``model.onnx``, same contract as ``saved_model.pt``: uint8 [B,3,H,W] (dynamic B, H, W) -> float32 [B,64].

The legacy TorchScript-based ONNX exporter cannot export the antialiased resize of ``ImagePreprocessor``
(``aten::_upsample_bilinear2d_aa``), so the torch.export-based exporter (``dynamo=True``) is used. If a
dynamic H/W graph cannot be produced (or does not verify in onnxruntime), a documented fixed-size variant is
written instead: input [B,3,S,S] uint8, i.e. the caller resizes to S x S first.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from uniembed.core.fsutil import atomic_path
from uniembed.core.runtime import onnx_session

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
OPSET = 18  # Resize with antialias needs opset >= 18


class _FixedSize(nn.Module):
    """Fallback graph: [B,3,S,S] uint8 in (already S x S), the rest of the GUIE model unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _quiet_export(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    """torch.onnx.export, with its chatty progress lines captured (they are not errors)."""
    kwargs: dict = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "opset_version": OPSET,
        "dynamo": True,
        "external_data": False,  # one self-contained file
    }
    if dynamic:
        kwargs["dynamic_axes"] = {
            INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
            OUTPUT_NAME: {0: "batch"},
        }
    else:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    sink = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), **kwargs)


def run_onnx(session, x: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(arr, dtype=np.uint8)})[0]


def _verify(path: Path, model: nn.Module, shapes: list[tuple[int, int, int, int]]) -> float:
    """Largest |onnx - torch| over random uint8 inputs of the given shapes (raises if a shape fails)."""
    sess = onnx_session(path)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for shp in shapes:
        x = torch.randint(0, 256, shp, dtype=torch.uint8, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = run_onnx(sess, x)
        if got.shape != ref.shape or got.dtype != np.float32:
            raise RuntimeError(
                f"onnx output {got.shape}/{got.dtype} for input {shp}, expected {ref.shape}/float32"
            )
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def export_onnx(model: nn.Module, path: str | Path, input_size: int) -> dict:
    """Write ``model.onnx``; returns what the card and export.json record about it."""
    path = Path(path)
    model = model.eval()
    errors: list[str] = []
    # The example deliberately differs from S x S so the resize stays in the graph for every input size.
    example = torch.randint(0, 256, (2, 3, input_size + 37, input_size + 11), dtype=torch.uint8)
    try:
        with atomic_path(path) as tmp:  # replaces model.onnx only once the new file is verified
            _quiet_export(model, example, tmp, dynamic=True)
            diff = _verify(tmp, model, [(1, 3, 97, 301), (2, 3, input_size, input_size), (3, 3, 348, 348)])
        return {
            "path": path.name,
            "dynamic_hw": True,
            "opset": OPSET,
            "input": f"uint8 [B,3,H,W] '{INPUT_NAME}'",
            "output": f"float32 [B,D] '{OUTPUT_NAME}'",
            "verify_max_abs_diff": diff,
            "notes": "",
        }
    except Exception as e:  # fall back to the documented fixed-size graph below
        errors.append(f"dynamic H/W export failed: {type(e).__name__}: {str(e)[:300]}")
    fixed = _FixedSize(model).eval()
    example = torch.randint(0, 256, (2, 3, input_size, input_size), dtype=torch.uint8)
    with atomic_path(path) as tmp:
        _quiet_export(fixed, example, tmp, dynamic=False)
        diff = _verify(tmp, fixed, [(1, 3, input_size, input_size), (3, 3, input_size, input_size)])
    return {
        "path": path.name,
        "dynamic_hw": False,
        "opset": OPSET,
        "input": f"uint8 [B,3,{input_size},{input_size}] '{INPUT_NAME}' (resize to {input_size}x{input_size} "
        "first: squash, antialiased bilinear)",
        "output": f"float32 [B,D] '{OUTPUT_NAME}'",
        "verify_max_abs_diff": diff,
        "notes": "; ".join(errors),
    }
