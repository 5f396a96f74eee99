"""Backbone ensembles: ``mobilenetv2+efficientnet_lite2`` joins several frozen backbones into one.

Why: on domains nobody trained on, two different ImageNet CNNs joined beat either of them, raw and at 64-d,
when measured leave-one-domain-out. Each member keeps its own input size and normalisation; its pooled
features are L2-normalised (so neither member drowns the other whatever its activation scale) and the
blocks are concatenated and scaled by 1/sqrt(n), so the joined vector has unit norm.

The joined backbone is still one ``Backbone``, so extraction, the feature cache, training, export (one GUIE
TorchScript file), evaluation, the index and the service need nothing ensemble-specific. Its own
preprocessing only squash-resizes to the largest member input and maps pixels to [0, 1]; each member then
resizes to its own side (antialiased bilinear, skipped when equal) and applies its own mean/std/scale.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from uniembed.models.preprocess import PreprocessConfig

#: Joins member names in an ensemble name: ``mobilenetv2+efficientnet_lite2``.
ENSEMBLE_SEP = "+"


def split_members(name: str) -> list[str]:
    """``a+b`` -> [a, b]; a plain name -> [name]. Empty members are an error."""
    parts = [p.strip() for p in name.split(ENSEMBLE_SEP)]
    if len(parts) > 1 and not all(parts):
        raise KeyError(
            f"backbone ensemble {name!r} has an empty member (write e.g. mobilenetv2+efficientnet_lite2)"
        )
    return parts


class MemberInput(nn.Module):
    """[0,1] pixels at the ensemble's side -> one member's normalised input at its own side."""

    antialias_resize = True  # tells the ONNX export of the extraction engine to use the opset-18 exporter

    def __init__(self, pre: PreprocessConfig):
        super().__init__()
        self.size = int(pre.input_size)
        self.mode = str(pre.interpolation)
        # member normalisation of uint8-range pixels v: (v * scale - mean) / std, with v = 255 * x
        self.gain = float(pre.scale) * 255.0
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.size or x.shape[-1] != self.size:
            x = F.interpolate(
                x, size=[self.size, self.size], mode=self.mode, align_corners=False, antialias=True
            )
        return (x * self.gain - self.mean) / self.std


class Member(nn.Module):
    """One member: its input module, then its frozen network (pooled features)."""

    def __init__(self, inp: MemberInput, net: nn.Module):
        super().__init__()
        self.inp = inp
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.inp(x))


class EnsembleNet(nn.Module):
    """[B,3,S,S] pixels in [0,1] -> concat_i L2(member_i(x)) / sqrt(n). Scriptable and traceable."""

    def __init__(self, members: list[Member], eps: float = 1e-12):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members = nn.ModuleList(members)
        self.scale = 1.0 / math.sqrt(len(members))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: list[torch.Tensor] = []
        for member in self.members:
            f = member(x).float()
            out.append(F.normalize(f, p=2.0, dim=1, eps=self.eps) * self.scale)
        return torch.cat(out, dim=1)


def ensemble_preprocess(members: list[PreprocessConfig]) -> PreprocessConfig:
    """The ensemble's own preprocessing: squash-resize to the largest member side, pixels to [0, 1]."""
    interp = {m.interpolation for m in members}
    return PreprocessConfig(
        input_size=max(int(m.input_size) for m in members),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        interpolation="bicubic" if "bicubic" in interp else "bilinear",
        scale=1.0 / 255.0,
        extra={"ensemble": True},
    )


def combined_hash(hashes: list[str]) -> str:
    """One weights hash for the ensemble (order matters: members are concatenated in order)."""
    if any(h == "random" for h in hashes):
        return "random" if all(h == "random" for h in hashes) else "random+" + "|".join(hashes)
    return hashlib.sha256("|".join(hashes).encode()).hexdigest()
