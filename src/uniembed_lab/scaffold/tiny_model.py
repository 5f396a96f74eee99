"""A tiny real TorchScript model with the GUIE contract, for tests and smoke runs that must not need weights.

It is a genuine (if weak) image embedder — colour/texture from a fixed random conv stack — so identical
images map to identical vectors and different photos to different ones. It lets the index, search and service
be tested in seconds without depending on the exporter or any downloaded weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class TinyGuieModel(nn.Module):
    """uint8 [B,3,H,W] (any H,W) -> float32 [B,dim], L2-normalised."""

    def __init__(self, dim: int = 64, size: int = 32):
        super().__init__()
        self.size = size
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * (size // 4) * (size // 4) + 3 * 8, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        x = F.interpolate(
            x, size=[self.size, self.size], mode="bilinear", align_corners=False, antialias=True
        )
        # Coarse colour layout (3 channels x 8 cells) keeps photos of different products apart.
        colour = F.adaptive_avg_pool2d(x, [2, 4]).flatten(1)
        h = F.relu(self.conv1(x - 0.5))
        h = F.relu(self.conv2(h)).flatten(1)
        y = self.fc(torch.cat([h, colour * 4.0], dim=1))
        return F.normalize(y, dim=1)


def make_tiny_model(path: str | Path, seed: int = 0, dim: int = 64) -> Path:
    """Script and save a tiny model; a different ``seed`` gives a different file (and fingerprint)."""
    g = torch.Generator().manual_seed(seed)
    m = TinyGuieModel(dim=dim)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    m.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is the GUIE format, deprecated or not
        torch.jit.script(m).save(str(path))
    return path


def make_synthetic_images(root: str | Path, labels: int = 3, per_label: int = 4, seed: int = 0) -> list[Path]:
    """A small labelled image folder ``root/<label>/<n>.{png,jpg}`` of mixed sizes and formats.

    Each label is a distinct colour and shape, so even the tiny model separates them; sizes differ within a
    label on purpose, to exercise batching of images of different sizes.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root = Path(root)
    sizes = [(64, 48), (80, 80), (96, 64), (50, 70)]
    out = []
    for li in range(labels):
        colour = tuple(int(c) for c in rng.integers(30, 226, size=3))
        d = root / f"label{li}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_label):
            w, h = sizes[j % len(sizes)]
            base = rng.integers(0, 40, size=(h, w, 3)).astype(np.uint8) + 100
            im = Image.fromarray(base, "RGB")
            draw = ImageDraw.Draw(im)
            box = (w // 6 + j, h // 6, w - w // 6, h - h // 6 - j)
            (draw.ellipse if li % 2 else draw.rectangle)(box, fill=colour)
            p = d / f"{j}.{'png' if j % 2 else 'jpg'}"
            im.save(p)
            out.append(p)
    return out
