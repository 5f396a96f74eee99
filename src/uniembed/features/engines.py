"""Inference engines of the extraction: pixels [B,3,S,S] in [0,255] -> float32 features [B,D].

- ``PixelEmbedder`` puts the normalisation inside the model, once per batch, so torch and ONNX Runtime run
  exactly the same graph and no per-image Python work happens in the hot loop.
- ONNX Runtime on CPU: the frozen backbone + pooling is exported once and cached under ``cache_dir()/onnx``
  (several times faster than eager torch on small CPUs). Its intra-op threads do not spin-wait by default
  (``onnxruntime``): spinning threads steal the core the decode worker needs, and on a shared 2-core machine
  extraction was 0.9-1.8x (median 1.3x over 12 alternating runs) faster without spinning.
  ``onnxruntime-spin`` keeps ORT's own spinning default for dedicated many-core machines.
- torch on GPU: bf16 autocast, channels_last, optional ``torch.compile``. (bf16 autocast on CPU is not used:
  it was slower than ORT fp32 and its features fell to cosine 0.977 vs fp32 on real photos.)
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniembed.core.fsutil import atomic_path
from uniembed.features.pixels import PIPELINE_VERSION
from uniembed.models.registry import Backbone

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime", "onnxruntime-spin")


class ExtractError(RuntimeError):
    """A user-facing extraction problem (bad dataset, bad engine); the CLI prints it without a traceback."""


class PixelEmbedder(nn.Module):
    """Pixels [B,3,S,S] in [0,255] (any dtype, already S x S) -> features [B,D]: normalise once per batch,
    then backbone + pooling."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.pre = backbone.preprocessor()
        self.net = backbone.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pre.normalize(x))


def resolve_engine(engine: str, device: str | None = None) -> str:
    """``auto`` -> torch on GPU, ONNX Runtime on CPU."""
    if engine not in ENGINES:
        raise ExtractError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "torch" if dev.startswith("cuda") else "onnxruntime"


def default_threads() -> int:
    from uniembed.core.runtime import cpu_threads_default

    return cpu_threads_default()


class TorchRunner:
    """Eager (optionally compiled) torch; bf16 autocast + channels_last on GPU."""

    engine = "torch"

    def __init__(
        self, backbone: Backbone, device: str | None = None, threads: int | None = None, compile: bool = False
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        if not self.cuda and threads:
            torch.set_num_threads(int(threads))
        model = PixelEmbedder(backbone).eval().to(self.device)
        if self.cuda:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if compile else model

    def __call__(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        x = torch.as_tensor(pixels).to(self.device, non_blocking=True)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda),
        ):
            y = self.model(x)
        return y.float().cpu().numpy()


def onnx_cache_path(backbone: Backbone) -> Path:
    """``cache_dir()/onnx/<fingerprint>.onnx``. Random weights get their content hash in the key, since one
    "random" fingerprint must never serve another run's differently initialised network."""
    from uniembed.core.paths import cache_dir

    key = backbone.fingerprint()
    if backbone.weights_hash == "random":
        from uniembed.core.runtime import state_dict_sha256

        key += "-r" + state_dict_sha256(backbone.module)[:12]
    d = cache_dir() / "onnx"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{key}-px{PIPELINE_VERSION}.onnx"


def export_onnx(backbone: Backbone, path: Path) -> Path:
    """Export ``PixelEmbedder(backbone)`` (float32 pixels [B,3,S,S] -> [B,D], dynamic batch) atomically."""
    s = backbone.preprocess.input_size
    model = PixelEmbedder(backbone).eval()
    dummy = torch.zeros(2, 3, s, s, dtype=torch.float32)
    # Antialiased resizes inside the backbone (an ensemble's per-member resize) need opset 18, which the
    # TorchScript-based exporter lacks: it would fail after dumping its whole IR graph to stderr.
    legacy = not any(getattr(m, "antialias_resize", False) for m in model.modules())
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if not legacy:
                raise RuntimeError("antialiased resize inside the backbone: torch.export-based exporter")
            _export_torchscript(model, dummy, tmp)
        except Exception as e:  # noqa: BLE001 - try the torch.export-based exporter before giving up
            log.info("legacy ONNX export failed (%s); trying dynamo exporter", e)
            _export_dynamo(model, dummy, tmp)
    return path


def _export_torchscript(model: nn.Module, dummy: torch.Tensor, out: Path) -> None:
    """The TorchScript-based exporter: fast, and handles every single backbone registered here."""
    torch.onnx.export(
        model,
        (dummy,),
        str(out),
        input_names=["pixels"],
        output_names=["features"],
        dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def _export_dynamo(model: nn.Module, dummy: torch.Tensor, out: Path) -> None:
    """The torch.export-based exporter, for graphs the TorchScript one cannot express."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(
        model,
        (dummy,),
        str(out),
        input_names=["pixels"],
        output_names=["features"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )


class OrtRunner:
    """ONNX Runtime CPU session over the cached export of the backbone.

    ``spin=False`` (the default) turns off the intra-op threads' busy-waiting between operators: while the
    DataLoader decode worker and other processes share the cores, spinning threads burn the very core time
    the worker needs (measured: docs/bench.md and the module docstring)."""

    def __init__(self, backbone: Backbone, threads: int | None = None, spin: bool = False):
        from uniembed.core.runtime import onnx_session

        path = onnx_cache_path(backbone)
        if not path.exists():
            export_onnx(backbone, path)
        self.engine = "onnxruntime-spin" if spin else "onnxruntime"
        self.spin = spin
        self.path = path
        self.session = onnx_session(path, int(threads or default_threads()), spin=spin)

    def __call__(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        x = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
        return self.session.run(["features"], {"pixels": np.ascontiguousarray(x, dtype=np.float32)})[0]


#: The live runner of this process, keyed by (id(module), engine, threads, device, compile). At most one is
#: kept: a session holds the whole network.
_RUNNERS: dict[tuple, Any] = {}


def clear_runner_cache() -> None:
    """Drop the cached runner, so the next :func:`make_runner` builds a fresh session (as a new process
    would), e.g. to time a cold start."""
    _RUNNERS.clear()


def make_runner(
    backbone: Backbone,
    engine: str = "auto",
    threads: int | None = None,
    device: str | None = None,
    compile: bool = False,
):
    """A callable pixels [B,3,S,S] (0..255) -> float32 [B,D] for the chosen engine (cached per process)."""
    eng = resolve_engine(engine, device)
    key = (id(backbone.module), eng, threads, device, compile)
    if key in _RUNNERS:
        return _RUNNERS[key]
    if eng.startswith("onnxruntime"):
        try:
            runner = OrtRunner(backbone, threads=threads, spin=eng == "onnxruntime-spin")
        except Exception as e:
            if engine.startswith("onnxruntime"):
                raise ExtractError(f"ONNX Runtime engine failed for {backbone.name}: {e}") from e
            log.warning("ONNX export/session failed for %s (%s); using torch", backbone.name, e)
            runner = TorchRunner(backbone, device=device, threads=threads, compile=compile)
    else:
        runner = TorchRunner(backbone, device=device, threads=threads, compile=compile)
    # Keep the module alive with its runner: the cache key uses id(module), which must not be recycled.
    runner.module_ref = backbone.module
    _RUNNERS.clear()  # keep at most one live session (they hold the whole network)
    _RUNNERS[key] = runner
    return runner
