"""Embed images with a GUIE-format TorchScript ``saved_model.pt`` (uint8 [B,3,H,W] any H,W -> float32 [B,64]).

Serving and indexing only need the exported model's contract, not the training code, so this module loads
the file with ``torch.jit.load`` and nothing else. The model accepts any H,W but one batch must share one
size, so images are grouped by (H, W) and batched within a group: no extra resize here, which would change
the pixels the model sees compared with the exported preprocessing.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


class ModelError(RuntimeError):
    """The model file is missing, not TorchScript, or breaks the GUIE output contract."""


def model_fingerprint(model_path: str | Path) -> str:
    """First 16 hex digits of the sha256 of the ``saved_model.pt`` bytes (the serve contract in design.md)."""
    p = Path(model_path)
    if not p.is_file():
        raise ModelError(f"model file not found: {p}")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_model_path(path: str | Path) -> Path:
    """Accept ``saved_model.pt`` itself or a directory holding it (an export output folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "saved_model.pt"
    if not p.is_file():
        raise ModelError(f"model file not found: {p} (expected a GUIE TorchScript saved_model.pt)")
    return p


class Embedder:
    """A loaded TorchScript embedding model, safe to call from several threads (calls are serialised).

    Serialising forward passes keeps latency predictable under concurrent requests on a small CPU box, where
    parallel forwards would only fight over the same cores.
    """

    def __init__(self, model_path: str | Path, threads: int | None = None):
        import torch

        self.path = resolve_model_path(model_path)
        self.fingerprint = model_fingerprint(self.path)
        if threads:
            torch.set_num_threads(int(threads))
        try:
            with warnings.catch_warnings():
                # torch 2.x flags TorchScript as deprecated; it is still the GUIE submission format.
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as e:  # torch raises RuntimeError/ValueError variants for non-TorchScript files
            raise ModelError(f"cannot load {self.path} as TorchScript: {str(e).splitlines()[0]}") from e
        self.module.eval()
        self._lock = threading.Lock()
        self.dim = self._probe_dim()

    def _probe_dim(self) -> int:
        """Run one tiny forward to learn (and check) the output dimension before serving anything."""
        out = self.embed_tensors([np.zeros((3, 32, 32), dtype=np.uint8)])
        return int(out.shape[1])

    def warmup(self, size: int = 256, runs: int = 2) -> None:
        """A few forwards at a photo-like size.

        TorchScript's profiling executor optimises the graph during the first calls; without this, that cost
        (seconds, not milliseconds) would land on the first user's request.
        """
        x = np.zeros((3, size, size), dtype=np.uint8)
        for _ in range(runs):
            self.embed_tensors([x])

    def embed_tensors(self, arrays: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """uint8 arrays [3,H,W] (sizes may differ) -> float32 [N, D], in input order."""
        import torch

        n = len(arrays)
        if n == 0:
            raise ValueError("no images to embed")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrays):
            if a.ndim != 3 or a.shape[0] != 3 or a.dtype != np.uint8:
                raise ValueError(f"image {i}: expected uint8 [3,H,W], got {a.dtype} {tuple(a.shape)}")
            groups.setdefault((int(a.shape[1]), int(a.shape[2])), []).append(i)
        out: np.ndarray | None = None
        for idxs in groups.values():
            for s in range(0, len(idxs), max(1, batch_size)):
                chunk = idxs[s : s + batch_size]
                x = torch.from_numpy(np.stack([arrays[i] for i in chunk]))
                with self._lock, torch.inference_mode():
                    try:
                        y = self.module(x)
                    except Exception as e:
                        raise ModelError(f"model forward failed on a {tuple(x.shape)} batch: {e}") from e
                if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != len(chunk):
                    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise ModelError(f"model output {shape} breaks the contract float32 [B, D]")
                y = y.detach().float().cpu().numpy()
                if out is None:
                    out = np.empty((n, y.shape[1]), dtype=np.float32)
                out[chunk] = y
        assert out is not None
        return out

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """RGB PIL images -> float32 [N, D] (PILToTensor layout, as the model contract expects)."""
        return self.embed_tensors([pil_to_array(im) for im in images], batch_size=batch_size)


def pil_to_array(im: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 [3,H,W], identical to torchvision's ``pil_to_tensor`` for RGB."""
    a = np.asarray(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8)
    return np.ascontiguousarray(a.transpose(2, 0, 1))
