"""Checks that decide how an exported model is run: the plain TorchScript model's outputs on deterministic
probe images are the reference, and a faster variant (pre-resizing with the model's own resize, the frozen
and optimised module, the ``model.onnx`` twin in onnxruntime) is used only if it reproduces them."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniembed.core.integrity import short_reason
from uniembed.export.embedding import Resize, no_jit_reprofiling
from uniembed.export.model_files import (
    EXPORT_RECORD,
    ONNX_MODEL,
    DamagedModelError,
    ModelError,
    reexport_hint,
)

#: Largest |difference| accepted between a faster variant and the plain TorchScript model on probe images
#: (L2-normalised outputs; measured differences are ~3e-6).
PROBE_ATOL = 1e-4


def _quiet_jit() -> contextlib.AbstractContextManager:
    """``uniembed.export.model.quiet_jit``, imported only when a model is loaded."""
    from uniembed.export.model import quiet_jit

    return quiet_jit()


def probe_images() -> list[torch.Tensor]:
    """Deterministic uint8 batches that exercise down- and up-sizing, odd sizes and a batch of two."""
    g = torch.Generator().manual_seed(1234)
    return [
        torch.randint(0, 256, (2, 3, 301, 257), dtype=torch.uint8, generator=g),
        torch.randint(0, 256, (1, 3, 61, 97), dtype=torch.uint8, generator=g),
    ]


def run_plain(module: Callable[[torch.Tensor], Any], x: torch.Tensor) -> np.ndarray:
    """One batch through a model variant, outside the Embedder (no lock, no contract check but the type)."""
    with torch.inference_mode(), no_jit_reprofiling():
        y = module(x)
    if isinstance(y, torch.Tensor):
        return y.detach().float().numpy()
    if isinstance(y, np.ndarray):
        return y.astype(np.float32, copy=False)
    raise ModelError(f"model output is {type(y).__name__}, not a tensor: it breaks the GUIE contract")


def reference_outputs(module: Callable[[torch.Tensor], Any], source: Path) -> list[np.ndarray]:
    """The plain model's outputs on the probe images, with the GUIE output contract checked."""
    refs = []
    for x in probe_images():
        try:
            y = run_plain(module, x)
        except ModelError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ModelError(f"{source}: forward on a uint8 {tuple(x.shape)} batch failed: {msg}") from e
        if y.ndim != 2 or y.shape[0] != x.shape[0] or y.shape[1] < 1:
            raise ModelError(f"{source}: output {tuple(y.shape)} breaks the contract float32 [B, D]")
        if not np.isfinite(y).all():
            raise ModelError(f"{source}: non-finite embeddings on probe images")
        refs.append(y)
    return refs


def model_resize(module: Any) -> Resize | None:
    """The model's own preprocessing resize (``GuieModel.preprocessor.resize``), when it has one."""
    pre = getattr(module, "preprocessor", None)
    fn = getattr(pre, "resize", None) if pre is not None else None
    return fn if callable(fn) else None


def agrees(
    model: Callable[[torch.Tensor], Any], resize: Resize | None, refs: list[np.ndarray]
) -> tuple[bool, float]:
    """Does ``model`` (after ``resize``, if given) reproduce the reference outputs on the probe images?"""
    worst = 0.0
    for x, ref in zip(probe_images(), refs, strict=True):
        with torch.inference_mode():
            inp = torch.cat([resize(x[i : i + 1]) for i in range(len(x))]) if resize else x
        got = run_plain(model, inp)
        if got.shape != ref.shape:
            return False, float("inf")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst <= PROBE_ATOL, worst


def optimized_torch(module: torch.jit.ScriptModule, notes: list[str]) -> torch.jit.ScriptModule | None:
    """``freeze`` + ``optimize_for_inference`` of a loaded TorchScript module, or None if torch refuses."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.optimize_for_inference(torch.jit.freeze(module.eval()))
    except Exception as e:  # prototype API: an unusual graph may not be supported; the plain module works
        notes.append(f"torch.jit.optimize_for_inference not applicable: {type(e).__name__}: {str(e)[:120]}")
        return None


class OnnxModel:
    """onnxruntime session with the Embedder's model interface (uint8 tensor in, float32 array out)."""

    def __init__(self, session: Any):
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if x.dtype != torch.uint8:
            raise TypeError(f"model.onnx takes uint8 images, got {x.dtype}")
        return self.session.run(None, {self.input: np.ascontiguousarray(x.numpy())})[0]


def onnx_twin(sm: Path, fingerprint: str, threads: int | None) -> tuple[OnnxModel | None, str]:
    """``model.onnx`` beside ``saved_model.pt`` as an onnxruntime model, if export.json ties the two together
    and the graph takes any H, W; else (None, why not). ``DamagedModelError`` when it should be the twin but
    onnxruntime cannot load it (truncated or garbled): the caller decides whether TorchScript may stand in."""
    onnx_path, rec_path = sm.parent / ONNX_MODEL, sm.parent / EXPORT_RECORD
    if not onnx_path.is_file():
        return None, f"no {ONNX_MODEL} beside {sm.name}"
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        rec = None
    if not isinstance(rec, dict):
        return None, f"no readable {EXPORT_RECORD} to tie {ONNX_MODEL} to {sm.name}"
    saved = rec.get("saved_model") if isinstance(rec.get("saved_model"), dict) else {}
    if saved.get("fingerprint", rec.get("fingerprint")) != fingerprint:
        return None, f"{EXPORT_RECORD} belongs to another saved_model.pt (fingerprint differs)"
    if not isinstance(rec.get("onnx"), dict) or not rec["onnx"].get("dynamic_hw"):
        return None, f"{ONNX_MODEL} is the fixed-size variant"
    try:
        import onnxruntime  # noqa: F401

        from uniembed.core.runtime import onnx_session
    except ImportError:
        return None, "onnxruntime is not installed"
    try:
        sess = onnx_session(onnx_path, threads)
    except Exception as e:  # onnxruntime raises its own exception types for a damaged or foreign file
        raise DamagedModelError(
            f"{onnx_path} cannot be loaded by onnxruntime ({short_reason(e, 120)}): it is damaged; "
            f"{reexport_hint(sm)}"
        ) from e
    return OnnxModel(sess), ""


def load_script(sm: Path) -> torch.jit.ScriptModule:
    """The TorchScript module of ``saved_model.pt`` on the CPU, or a ModelError saying why it is not one."""
    try:
        with _quiet_jit():
            return torch.jit.load(str(sm), map_location="cpu").eval()
    except Exception as e:  # torch raises RuntimeError/ValueError variants for non-TorchScript files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first if len(first) <= 160 else first[:159] + "…"
        raise DamagedModelError(
            f"cannot load {sm} as TorchScript: {first} (damaged, or not a GUIE saved_model.pt); "
            f"{reexport_hint(sm)}"
        ) from e
