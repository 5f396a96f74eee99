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

import contextlib
import hashlib
import json
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniembed.core.fsutil import sha256_file
from uniembed.core.runtime import torch_threads

SAVED_MODEL = "saved_model.pt"
ONNX_MODEL = "model.onnx"
EXPORT_RECORD = "export.json"
ENGINES = ("auto", "torch", "onnxruntime")
#: Largest |difference| accepted between a faster variant and the plain TorchScript model on probe images
#: (L2-normalised outputs; measured differences are ~3e-6).
PROBE_ATOL = 1e-4


class ModelError(RuntimeError):
    """The model file is missing, not TorchScript, or breaks the GUIE output contract (user-facing)."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No model where one was expected (also a FileNotFoundError, for callers that catch that)."""


def file_fingerprint(path: str | Path) -> str:
    """First 16 hex digits of the sha256 of the file's bytes: the model identity an index is tied to."""
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"model file not found: {p}")
    return sha256_file(p)[:16]


def resolve_saved_model(path: str | Path) -> Path | None:
    """``saved_model.pt`` itself (any ``.pt`` but a run's ``head.pt``) or a folder holding it; else None."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pt" and p.name != "head.pt":
        return p
    if p.is_dir() and (p / SAVED_MODEL).is_file():
        return p / SAVED_MODEL
    return None


def resolve_model_path(path: str | Path) -> Path:
    """Like :func:`resolve_saved_model` but raising a clear ``ModelNotFoundError`` when there is none."""
    p = resolve_saved_model(path)
    if p is None:
        where = Path(path) / SAVED_MODEL if Path(path).is_dir() else Path(path)
        raise ModelNotFoundError(
            f"model file not found: {where} (expected a GUIE TorchScript saved_model.pt)"
        )
    return p


def to_uint8_chw(img: Any) -> torch.Tensor:
    """PIL image, numpy array or tensor -> uint8 [3,H,W] RGB (grayscale replicated, alpha dropped);
    identical to torchvision's ``pil_to_tensor`` for RGB images (the model input contract)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            img = img.convert("RGB")
        return pil_to_tensor(img)
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(np.ascontiguousarray(img))
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"expected a PIL image or a uint8 tensor [3,H,W], got {type(img).__name__}")
    if img.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {img.dtype}")
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.dim() != 3 or img.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image tensor [3,H,W], got shape {tuple(img.shape)}")
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img[:3].contiguous()


Resize = Callable[[torch.Tensor], torch.Tensor]


class Embedder:
    """Callable: PIL images / uint8 [3,H,W] tensors or arrays (any sizes) -> float32 numpy [N, D], in order.

    ``model``: uint8 [B,3,H,W] -> [B,D] (a TorchScript or eager module, or an onnxruntime wrapper).
    ``resize``: the model's own resize (uint8 [1,3,H,W] -> float [1,3,S,S]) when it is safe to apply it
    before batching (see the module docstring); None groups images by size instead.
    Rows are returned as computed: callers that store or score them decide what a non-finite row means.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], Any],
        source: Path | None,
        fingerprint: str,
        batch_size: int = 32,
        resize: Resize | None = None,
        engine: str = "torch",
        notes: list[str] | None = None,
    ):
        self.model = model
        self.source = source
        self.path = source  # the file the vectors come from the model of (saved_model.pt or run dir)
        self.fingerprint = fingerprint
        self.batch_size = max(1, int(batch_size))
        self.resize = resize
        self.engine = engine
        self.notes = list(notes or [])
        self._dim: int | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        """Embedding width (found by running one tiny image the first time it is asked)."""
        if self._dim is None:
            self._dim = int(self._forward(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[1])
        return self._dim

    def describe(self) -> dict[str, Any]:
        """What runs, for index.json and logs."""
        return {
            "engine": self.engine,
            "batching": "pre-resized to the model input" if self.resize else "by image size",
            "notes": self.notes,
        }

    def warmup(self, size: int = 256, runs: int = 2) -> None:
        """A few forwards at a photo-like size, so one-off costs (allocations, kernel selection) are not paid
        by the first user's request."""
        x = torch.zeros(3, size, size, dtype=torch.uint8)
        for _ in range(runs):
            self.embed_prepared([self.prepare(x)])

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        """One batch through the model, with the output contract checked: float [B, D]."""
        with self._lock, torch.inference_mode(), _no_jit_reprofiling():
            try:
                y = self.model(x)
            except Exception as e:
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise ModelError(
                    f"model forward failed on a {tuple(x.shape)} {x.dtype} batch: {first}"
                ) from e
        if isinstance(y, torch.Tensor):
            y = y.detach().float().cpu().numpy()
        if not isinstance(y, np.ndarray) or y.ndim != 2 or y.shape[0] != x.shape[0] or y.shape[1] < 1:
            shape = tuple(y.shape) if isinstance(y, np.ndarray) else type(y).__name__
            raise ModelError(f"model output {shape} breaks the contract float32 [B, D] (B = {x.shape[0]})")
        return y.astype(np.float32, copy=False)

    # ------------------------------------------------------------------------------------------ embedding
    def prepare(self, img: Any) -> torch.Tensor:
        """One image -> what a batch is stacked from: the model-resized float [3,S,S] when the model's own
        resize is used, else uint8 [3,H,W]. Thread-safe (call it from decode workers)."""
        t = to_uint8_chw(img)
        if self.resize is None:
            return t
        with torch.inference_mode():
            return self.resize(t.unsqueeze(0))[0]

    def embed_prepared(self, items: Sequence[torch.Tensor], batch_size: int | None = None) -> np.ndarray:
        """Outputs of :meth:`prepare` -> float32 [N, D] in input order (same-shape items share batches)."""
        return self._embed(iter(items), batch_size=batch_size, total=len(items), prepared=True)

    def embed_images(self, images: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        """PIL images / uint8 tensors or arrays of any sizes -> float32 [N, D] in input order."""
        return self._embed(iter(images), batch_size=batch_size, total=len(images))

    def __call__(self, images: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        return self.embed_images(images, batch_size=batch_size)

    def embed_iter(
        self,
        images: Iterable[Any],
        batch_size: int | None = None,
        total: int | None = None,
        progress: bool = False,
        desc: str = "embedding",
    ) -> np.ndarray:
        """Embed a stream of images with bounded memory; output rows follow input order."""
        return self._embed(iter(images), batch_size, total, progress=progress, desc=desc)

    def _embed(
        self,
        images: Iterator[Any],
        batch_size: int | None,
        total: int | None,
        progress: bool = False,
        desc: str = "embedding",
        prepared: bool = False,
    ) -> np.ndarray:
        from tqdm import tqdm

        bs = max(1, int(batch_size or self.batch_size))
        pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        n_pending = 0
        rows: list[np.ndarray | None] = []
        bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)

        def flush(shape: tuple[int, ...]) -> None:
            nonlocal n_pending
            items = pending.pop(shape)
            n_pending -= len(items)
            out = self._forward(torch.stack([t for _, t in items]))
            for (i, _), e in zip(items, out, strict=True):
                rows[i] = e
            bar.update(len(items))

        try:
            for i, img in enumerate(images):
                t = img if prepared else self.prepare(img)
                rows.append(None)
                shape = tuple(t.shape)
                pending.setdefault(shape, []).append((i, t))
                n_pending += 1
                if len(pending[shape]) >= bs:
                    flush(shape)
                elif n_pending >= 4 * bs:  # many distinct sizes: run the fullest group to bound memory
                    flush(max(pending, key=lambda s: len(pending[s])))
            for shape in list(pending):
                flush(shape)
        finally:
            bar.close()
        if not rows:
            return np.zeros((0, self._dim or 0), np.float32)
        out = np.stack(rows).astype(np.float32, copy=False)  # type: ignore[arg-type]
        self._dim = int(out.shape[1])
        return out


@contextlib.contextmanager
def _no_jit_reprofiling() -> Iterator[None]:
    """No profiling executor: it re-profiles and re-optimises for every new input shape, and photos come in
    many sizes; steady-state speed is the same without it (see the module docstring)."""
    with torch.jit.optimized_execution(False):
        yield


def _quiet_jit() -> contextlib.AbstractContextManager:
    from uniembed.export.model import quiet_jit

    return quiet_jit()


# ---------------------------------------------------------------------------------------------- loading
def _probe_images() -> list[torch.Tensor]:
    """Deterministic uint8 batches that exercise down- and up-sizing, odd sizes and a batch of two."""
    g = torch.Generator().manual_seed(1234)
    return [
        torch.randint(0, 256, (2, 3, 301, 257), dtype=torch.uint8, generator=g),
        torch.randint(0, 256, (1, 3, 61, 97), dtype=torch.uint8, generator=g),
    ]


def _run_plain(module: Callable[[torch.Tensor], Any], x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode(), _no_jit_reprofiling():
        y = module(x)
    if isinstance(y, torch.Tensor):
        return y.detach().float().numpy()
    if isinstance(y, np.ndarray):
        return y.astype(np.float32, copy=False)
    raise ModelError(f"model output is {type(y).__name__}, not a tensor: it breaks the GUIE contract")


def _reference(module: Callable[[torch.Tensor], Any], source: Path) -> list[np.ndarray]:
    """The plain model's outputs on the probe images, with the GUIE output contract checked."""
    refs = []
    for x in _probe_images():
        try:
            y = _run_plain(module, x)
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


def _model_resize(module: Any) -> Resize | None:
    """The model's own preprocessing resize (``GuieModel.preprocessor.resize``), when it has one."""
    pre = getattr(module, "preprocessor", None)
    fn = getattr(pre, "resize", None) if pre is not None else None
    return fn if callable(fn) else None


def _agrees(
    model: Callable[[torch.Tensor], Any], resize: Resize | None, refs: list[np.ndarray]
) -> tuple[bool, float]:
    """Does ``model`` (after ``resize``, if given) reproduce the reference outputs on the probe images?"""
    worst = 0.0
    for x, ref in zip(_probe_images(), refs, strict=True):
        with torch.inference_mode():
            inp = torch.cat([resize(x[i : i + 1]) for i in range(len(x))]) if resize else x
        got = _run_plain(model, inp)
        if got.shape != ref.shape:
            return False, float("inf")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst <= PROBE_ATOL, worst


def _optimized_torch(module: torch.jit.ScriptModule, notes: list[str]) -> torch.jit.ScriptModule | None:
    """``freeze`` + ``optimize_for_inference`` of a loaded TorchScript module, or None if torch refuses."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.optimize_for_inference(torch.jit.freeze(module.eval()))
    except Exception as e:  # prototype API: an unusual graph may not be supported; the plain module works
        notes.append(f"torch.jit.optimize_for_inference not applicable: {type(e).__name__}: {str(e)[:120]}")
        return None


class _OnnxModel:
    """onnxruntime session with the Embedder's model interface (uint8 tensor in, float32 array out)."""

    def __init__(self, session: Any):
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if x.dtype != torch.uint8:
            raise TypeError(f"model.onnx takes uint8 images, got {x.dtype}")
        return self.session.run(None, {self.input: np.ascontiguousarray(x.numpy())})[0]


def _onnx_twin(sm: Path, fingerprint: str, threads: int | None) -> tuple[_OnnxModel | None, str]:
    """``model.onnx`` beside ``saved_model.pt`` as an onnxruntime model, if export.json ties the two together
    and the graph takes any H, W; else (None, why not)."""
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
    except Exception as e:  # a damaged or foreign file: the TorchScript model still works
        return None, f"onnxruntime cannot load {onnx_path.name}: {type(e).__name__}: {str(e)[:120]}"
    return _OnnxModel(sess), ""


def _load_script(sm: Path) -> torch.jit.ScriptModule:
    try:
        with _quiet_jit():
            return torch.jit.load(str(sm), map_location="cpu").eval()
    except Exception as e:  # torch raises RuntimeError/ValueError variants for non-TorchScript files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load {sm} as TorchScript: {first}") from e


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
        from uniembed.export.model import build_run_model

        if engine == "onnxruntime":
            raise ModelError(f"{p} is a training run: export it first to run it in onnxruntime")
        rm = build_run_model(p)
        fp = hashlib.sha256(f"{file_fingerprint(p / 'head.pt')}|{rm.backbone.fingerprint()}".encode())
        model = rm.model.eval()
        # GuieModel's preprocessor is ImagePreprocessor itself, so pre-resizing with it is exact by design.
        return Embedder(
            model, p, fp.hexdigest()[:16], batch_size, resize=_model_resize(model), engine="eager"
        )
    if sm is None:
        raise ModelNotFoundError(
            f"{p} is neither saved_model.pt, a folder holding one, nor a training run dir (head.pt)"
        )

    # The probes are a handful of images: single-threaded they take well under a second, while on a busy
    # machine 2 spin-waiting threads were measured to take 10-14 s for the same work.
    with torch_threads(1):
        return _load_saved_model(sm, batch_size, threads, engine, optimize)


def _load_saved_model(
    sm: Path, batch_size: int, threads: int | None, engine: str, optimize: bool
) -> Embedder:
    """The fastest verified way to run ``saved_model.pt`` for ``engine`` (see the module docstring)."""
    fingerprint = file_fingerprint(sm)
    module = _load_script(sm)
    refs = _reference(module, sm)
    notes: list[str] = []
    if engine in ("auto", "onnxruntime"):
        twin, why = _onnx_twin(sm, fingerprint, threads)
        if twin is not None:
            ok, diff = _agrees(twin, None, refs)
            if ok:
                return Embedder(twin, sm, fingerprint, batch_size, engine="onnxruntime")
            why = f"{ONNX_MODEL} disagrees with {sm.name} on probe images (max |diff| {diff:.1e})"
        if engine == "onnxruntime":
            raise ModelError(f"cannot use onnxruntime for {sm}: {why}")
        notes.append(f"onnxruntime not used: {why}")

    resize = _model_resize(module)
    if resize is not None:
        ok, diff = _agrees(module, resize, refs)
        if not ok:
            notes.append(f"pre-resizing with the model's own resize changes outputs (max |diff| {diff:.1e})")
            resize = None
    model: Any = module
    if optimize:
        fast = _optimized_torch(module, notes)
        if fast is not None:
            ok, diff = _agrees(fast, resize, refs)
            if ok:
                model = fast
            else:
                notes.append(f"optimize_for_inference changes outputs (max |diff| {diff:.1e}); not used")
    return Embedder(model, sm, fingerprint, batch_size, resize=resize, engine="torch", notes=notes)
