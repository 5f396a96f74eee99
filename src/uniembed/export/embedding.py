"""``Embedder``: images of any sizes -> float32 [N, D] through one loaded model, batched by shape (see
:mod:`uniembed.export.embedder` for how the model is loaded and why batching works this way)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniembed.export.model_files import ModelError


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
    before batching (see :mod:`uniembed.export.embedder`); None groups images by size instead.
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
        with self._lock, torch.inference_mode(), no_jit_reprofiling():
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
def no_jit_reprofiling() -> Iterator[None]:
    """No profiling executor: it re-profiles and re-optimises for every new input shape, and photos come in
    many sizes; steady-state speed is the same without it (see :mod:`uniembed.export.embedder`)."""
    with torch.jit.optimized_execution(False):
        yield
