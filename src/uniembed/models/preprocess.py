"""Image preprocessing as a TorchScript-able module.

One implementation serves extraction, evaluation, export and search, so that the exported GUIE model sees
exactly what the head was trained on: uint8 [B,3,H,W] (any H, W) -> resized, scaled, normalised float.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PreprocessConfig:
    """How a backbone wants its pixels. ``scale`` maps uint8 to [0,1] before ``mean``/``std``."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    scale: float = 1.0 / 255.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


class ImagePreprocessor(nn.Module):
    """uint8 [B,3,H,W] -> float32 [B,3,S,S]: squash-resize (antialiased), scale, normalise.

    Squash resize (no crop) keeps the whole object in view, whatever the aspect ratio; GUIE queries are
    arbitrary photos, so cropping risks cutting off the product.
    """

    def __init__(self, cfg: PreprocessConfig):
        super().__init__()
        self.size = int(cfg.input_size)
        self.mode = str(cfg.interpolation)
        self.scale = float(cfg.scale)
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1))

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """Float resize to the backbone's square input; skipped when already that size."""
        x = x.float()
        if x.shape[-2] != self.size or x.shape[-1] != self.size:
            x = F.interpolate(
                x, size=[self.size, self.size], mode=self.mode, align_corners=False, antialias=True
            )
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixels in uint8 range -> model input."""
        return (x.float() * self.scale - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.resize(x))
