"""The one way to run an exported GUIE model: ``load_embedder(path)`` -> ``Embedder`` (images -> [N, D]).

Used by evaluation, indexing, search and the web service alike, so all of them see the same vectors.

Why it is shaped this way. Measured with ``scripts/bench_index.py`` (``build_index``, 360 real photos of 5
sizes, the demo's MobileNetV2 model, a 2-core machine with a load average of ~8 from other jobs): before
66-76 s, now 4.4-6.6 s (engine auto) or 7.2-10.3 s (engine torch).

- Threads: torch's OpenMP threads spin-wait for each other, so when other processes hold the cores a
  2-thread forward is several times slower than a 1-thread one (the old code at 1 thread: 15-19 s). Callers
  that own the process (index, search, serve) use :func:`free_cores`; the probes below run on one thread.
- The exported model accepts any H, W but one batch must share one size. Photos come in many sizes, and a
  caller-side resize would change the pixels the model sees, unless it is *the model's own* resize. So when
  the model exposes its preprocessing (``model.preprocessor.resize``, as every ``GuieModel`` does) each image
  is resized with exactly that function and all images share full [B,3,S,S] batches; the model skips its
  resize for S x S float input. This is checked on probe images at load time, else images are grouped by size.
- TorchScript's profiling executor re-profiles and re-optimises for every new input shape (10-25% of the
  forward time with 5 sizes here, more with more sizes): it is off (``torch.jit.optimized_execution(False)``).
  The loaded module is frozen and passed through ``torch.jit.optimize_for_inference`` (conv+BN folding,
  oneDNN convolutions): ~3x faster forwards on CPU.
- ``engine="auto"`` (indexing, search, serving) runs the export's ``model.onnx`` in onnxruntime when it is
  the twin of this ``saved_model.pt`` (export.json names the same fingerprint) and agrees with it on probe
  images: another ~1.6x over the optimised TorchScript here. ``engine="torch"`` always runs the TorchScript
  file itself (the default of ``load_embedder``, used by evaluation, which scores the submission file).
- Every variant is checked against the plain TorchScript module on probe images (max |diff| <= 1e-4) before
  it is used; a variant that fails is skipped, with the reason kept in ``Embedder.notes``.
- Forward passes are serialised by a lock: the service calls from several threads, and parallel forwards on
  a small CPU box only fight over the same cores.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from uniembed.core.integrity import DamagedFileError
from uniembed.core.runtime import torch_threads
from uniembed.export.embedding import Embedder, Resize, to_uint8_chw
from uniembed.export.model_files import (
    EXPORT_RECORD,
    ONNX_MODEL,
    SAVED_MODEL,
    DamagedModelError,
    ModelError,
    ModelNotFoundError,
    file_fingerprint,
    resolve_model_path,
    resolve_saved_model,
)
from uniembed.export.probes import (
    PROBE_ATOL,
    agrees,
    load_script,
    model_resize,
    onnx_twin,
    optimized_torch,
    reference_outputs,
)

__all__ = [
    "ENGINES",
    "EXPORT_RECORD",
    "ONNX_MODEL",
    "PROBE_ATOL",
    "SAVED_MODEL",
    "DamagedModelError",
    "Embedder",
    "ModelError",
    "ModelNotFoundError",
    "Resize",
    "file_fingerprint",
    "load_embedder",
    "resolve_model_path",
    "resolve_saved_model",
    "to_uint8_chw",
]

ENGINES = ("auto", "torch", "onnxruntime")
log = logging.getLogger(__name__)


def load_embedder(
    path: str | Path,
    batch_size: int = 32,
    threads: int | None = None,
    engine: str = "torch",
    optimize: bool = True,
) -> Embedder:
    """Load ``saved_model.pt`` (or a directory holding it); a training run directory (with ``head.pt``) is
    rebuilt eagerly from its backbone and head instead.

    ``engine``: ``torch`` runs the TorchScript file; ``onnxruntime`` its verified ``model.onnx`` twin (error
    if there is none); ``auto`` the twin when there is one, else TorchScript. ``optimize=False`` keeps the
    plain TorchScript module (no freezing). ``threads`` sets torch's (and onnxruntime's) intra-op threads.
    Raises ``ModelError`` (``ModelNotFoundError`` for a missing path) with a readable message."""
    if engine not in ENGINES:
        raise ModelError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if threads:
        torch.set_num_threads(int(threads))
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(
            f"model file not found: {p} (expected saved_model.pt, its folder or a run dir)"
        )
    sm = resolve_saved_model(p)
    if sm is None and p.is_dir() and (p / "head.pt").exists():
        if engine == "onnxruntime":
            raise ModelError(f"{p} is a training run: export it first to run it in onnxruntime")
        return _load_run(p, batch_size)
    if sm is None:
        raise ModelNotFoundError(
            f"{p} is neither saved_model.pt, a folder holding one, nor a training run dir (head.pt)"
        )

    # The probes are a handful of images: single-threaded they take well under a second, while on a busy
    # machine 2 spin-waiting threads were measured to take 10-14 s for the same work.
    with torch_threads(1):
        return _load_saved_model(sm, batch_size, threads, engine, optimize)


def _load_run(run: Path, batch_size: int) -> Embedder:
    """A training run rebuilt eagerly (backbone + head), identified by its head file and its backbone."""
    from uniembed.export.model import build_run_model

    try:
        rm = build_run_model(run)
    except DamagedFileError as e:  # head.pt or the run's feature cache: a ModelError for every caller
        raise DamagedModelError(str(e)) from e
    fp = hashlib.sha256(f"{file_fingerprint(run / 'head.pt')}|{rm.backbone.fingerprint()}".encode())
    model = rm.model.eval()
    # GuieModel's preprocessor is ImagePreprocessor itself, so pre-resizing with it is exact by design.
    return Embedder(model, run, fp.hexdigest()[:16], batch_size, resize=model_resize(model), engine="eager")


def _load_saved_model(
    sm: Path, batch_size: int, threads: int | None, engine: str, optimize: bool
) -> Embedder:
    """The fastest verified way to run ``saved_model.pt`` for ``engine`` (see the module docstring)."""
    fingerprint = file_fingerprint(sm)
    module = load_script(sm)
    refs = reference_outputs(module, sm)
    notes: list[str] = []
    if engine in ("auto", "onnxruntime"):
        try:
            twin, why = onnx_twin(sm, fingerprint, threads)
        except DamagedModelError as e:
            if engine == "onnxruntime":
                raise
            log.warning("%s; running %s with torch meanwhile", e, sm.name)
            twin, why = None, str(e)
        if twin is not None:
            ok, diff = agrees(twin, None, refs)
            if ok:
                return Embedder(twin, sm, fingerprint, batch_size, engine="onnxruntime")
            why = f"{ONNX_MODEL} disagrees with {sm.name} on probe images (max |diff| {diff:.1e})"
        if engine == "onnxruntime":
            raise ModelError(f"cannot use onnxruntime for {sm}: {why}")
        notes.append(f"onnxruntime not used: {why}")

    resize = model_resize(module)
    if resize is not None:
        ok, diff = agrees(module, resize, refs)
        if not ok:
            notes.append(f"pre-resizing with the model's own resize changes outputs (max |diff| {diff:.1e})")
            resize = None
    model: Any = module
    if optimize:
        fast = optimized_torch(module, notes)
        if fast is not None:
            ok, diff = agrees(fast, resize, refs)
            if ok:
                model = fast
            else:
                notes.append(f"optimize_for_inference changes outputs (max |diff| {diff:.1e}); not used")
    return Embedder(model, sm, fingerprint, batch_size, resize=resize, engine="torch", notes=notes)
