"""``load_embedder(path)``: the exported model (or a training run) as a plain "images -> embeddings" callable.

Images of different sizes cannot share one batch tensor, and re-sizing them on the caller's side would
change the result (the model resizes with antialiasing itself), so images are grouped into same-size
batches and the outputs are put back in input order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAVED_MODEL = "saved_model.pt"


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file's bytes, first 16 hex (the model identity ``serve`` uses)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def to_uint8_chw(img: Any) -> torch.Tensor:
    """PIL image or uint8 tensor -> uint8 [3,H,W] RGB (grayscale replicated, alpha dropped)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            img = img.convert("RGB")
        return pil_to_tensor(img)
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(img)
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


class Embedder:
    """Callable: list of PIL images / uint8 tensors -> float32 numpy [N, dim]."""

    def __init__(self, model: torch.nn.Module, source: Path, fingerprint: str, batch_size: int = 32):
        self.model = model
        self.source = source
        self.fingerprint = fingerprint
        self.batch_size = int(batch_size)
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """Embedding width (found by running one tiny image the first time it is asked)."""
        if self._dim is None:
            self._dim = int(self._run([torch.zeros(3, 8, 8, dtype=torch.uint8)]).shape[1])
        return self._dim

    @torch.no_grad()
    def _run(self, batch: list[torch.Tensor]) -> np.ndarray:
        # TorchScript's profiling executor re-profiles (at about half speed) for every new input shape; photos
        # come in many sizes, and measured steady-state speed is the same without it, so it is switched off.
        with torch.jit.optimized_execution(False):
            out = self.model(torch.stack(batch))
        if not torch.isfinite(out).all():
            raise RuntimeError(f"model {self.source} produced non-finite embeddings")
        return out.float().cpu().numpy()

    def __call__(self, images: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        return self.embed_iter(images, batch_size=batch_size, total=len(images))

    def embed_iter(
        self,
        images: Iterable[Any],
        batch_size: int | None = None,
        total: int | None = None,
        progress: bool = False,
        desc: str = "embedding",
    ) -> np.ndarray:
        """Embed a stream of images (bounded memory): same-size images are batched together; output rows
        follow input order."""
        from tqdm import tqdm

        bs = int(batch_size or self.batch_size)
        pending: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        n_pending = 0
        rows: dict[int, np.ndarray] = {}
        bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)

        def flush(size: tuple[int, int]) -> None:
            nonlocal n_pending
            items = pending.pop(size)
            n_pending -= len(items)
            out = self._run([t for _, t in items])
            for (i, _), e in zip(items, out, strict=True):
                rows[i] = e
            bar.update(len(items))

        n = 0
        for i, img in enumerate(images):
            t = to_uint8_chw(img)
            size = (int(t.shape[1]), int(t.shape[2]))
            pending.setdefault(size, []).append((i, t))
            n_pending += 1
            n = i + 1
            if len(pending[size]) >= bs:
                flush(size)
            elif n_pending >= 4 * bs:  # many distinct sizes: run the fullest group to bound memory
                flush(max(pending, key=lambda s: len(pending[s])))
        for size in list(pending):
            flush(size)
        bar.close()
        if n == 0:
            return np.zeros((0, self._dim or 0), np.float32)
        out = np.stack([rows[i] for i in range(n)]).astype(np.float32)
        self._dim = int(out.shape[1])
        return out


def resolve_saved_model(path: str | Path) -> Path | None:
    """``saved_model.pt`` itself, or a directory holding it; None when neither."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pt" and p.name != "head.pt":
        return p
    if p.is_dir() and (p / SAVED_MODEL).exists():
        return p / SAVED_MODEL
    return None


def load_embedder(path: str | Path, batch_size: int = 32, threads: int | None = None) -> Embedder:
    """Load ``saved_model.pt`` (or a directory holding it) with ``torch.jit.load``; a training run directory
    (with ``head.pt``) is rebuilt eagerly from its backbone and head instead."""
    if threads:
        torch.set_num_threads(int(threads))
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    sm = resolve_saved_model(p)
    if sm is not None:
        from uniembed.export.model import quiet_jit

        with quiet_jit():
            model = torch.jit.load(str(sm), map_location="cpu").eval()
        return Embedder(model, sm, file_fingerprint(sm), batch_size=batch_size)
    if p.is_dir() and (p / "head.pt").exists():
        from uniembed.export.model import build_run_model

        rm = build_run_model(p)
        fp = hashlib.sha256(f"{file_fingerprint(p / 'head.pt')}|{rm.backbone.fingerprint()}".encode())
        return Embedder(rm.model, p, fp.hexdigest()[:16], batch_size=batch_size)
    raise FileNotFoundError(f"{p} is neither saved_model.pt, a folder holding one, nor a run dir (head.pt)")
