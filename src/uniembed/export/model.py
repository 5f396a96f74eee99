"""The GUIE model: uint8 images of any size in, L2-normalised float32 [B,64] embeddings out.

One wrapper (``GuieModel``) is used for every consumer — the TorchScript ``saved_model.pt``, the ONNX file,
the parity check and ``load_embedder`` on a run directory — so that preprocessing, backbone (with pooling)
and head are composed in exactly one place.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uniembed.core.run_record import HeadRecord
from uniembed.models.preprocess import ImagePreprocessor, PreprocessConfig


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence torch's "torch.jit.* is deprecated" FutureWarnings: TorchScript is the GUIE submission format
    (saved_model.pt), so the notice is noise to our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        warnings.filterwarnings("ignore", message=r".*TorchScript type system.*")
        yield


class GuieModel(nn.Module):
    """uint8 [B,3,H,W] (any H, W) -> float32 [B, D] embeddings: preprocess -> backbone+pooling -> head."""

    def __init__(self, preprocessor: nn.Module, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.preprocessor = preprocessor
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked here so a wrong layout (HWC, grayscale) fails with a readable message, in TorchScript too.
        if x.dim() != 4 or x.size(1) != 3:
            raise ValueError("GuieModel expects uint8 images [B,3,H,W] (RGB, channels first)")
        return self.head(self.backbone(self.preprocessor(x))).float()


@dataclass
class RunModel:
    """A training run turned into an eager GuieModel, with everything the card and the parity check need."""

    model: GuieModel
    backbone: Any  # uniembed.models.Backbone
    head: nn.Module
    record: HeadRecord  # the run record (head.pt)
    preprocess: PreprocessConfig
    run_dir: Path
    finetuned: bool = False  # backbone weights from the run's fine-tune stage (cached features are stale)


def build_run_model(run_dir: str | Path) -> RunModel:
    """Rebuild the run's backbone (frozen, same weights and pooling) and head as one eager GuieModel.

    Refuses a backbone whose fingerprint differs from the one the head was trained on: the head would then
    silently receive features from a different function."""
    from uniembed.models import create_backbone
    from uniembed.train import load_head

    run = Path(run_dir)
    if not (run / "head.pt").exists():
        raise FileNotFoundError(f"{run} is not a training run (no head.pt); run `uniembed train` first")
    head, rec = load_head(run)
    head.eval()
    name = rec.backbone
    if not name:
        raise ValueError(f"{run / 'head.pt'} does not name its backbone")
    pooling = rec.pooling or "avg"
    bb = create_backbone(name, pretrained=True, pooling=pooling)
    pre_cfg = bb.preprocess
    if rec.preprocess:
        pre_cfg = PreprocessConfig.from_dict(rec.preprocess)
        if pre_cfg.to_dict() != bb.preprocess.to_dict():
            raise ValueError(
                f"head.pt preprocessing {pre_cfg.to_dict()} differs from backbone {name!r} "
                f"preprocessing {bb.preprocess.to_dict()}"
            )
    finetuned = bool(rec.backbone_state)
    if finetuned:
        # The fine-tune stage stored the whole backbone module's weights beside head.pt.
        state_path = run / str(rec.backbone_state)
        if not state_path.exists():
            raise FileNotFoundError(f"{run / 'head.pt'} names fine-tuned weights {state_path}: not found")
        bb.module.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
        bb.module.eval()
    else:
        want = rec.fingerprint or feature_info(rec.feature_dir).get("fingerprint")
        if want and want != bb.fingerprint():
            raise ValueError(
                f"backbone {name!r} (pooling {pooling}) has fingerprint {bb.fingerprint()}, but the head was "
                f"trained on features with fingerprint {want}; weights or preprocessing changed since"
            )
    model = GuieModel(ImagePreprocessor(pre_cfg), bb.module, head).eval()
    return RunModel(model, bb, head, rec, pre_cfg, run, finetuned)


def feature_info(feature_dir: str | Path | list | None) -> dict:
    """info.json of a feature dir (the first one of a list); {} when absent."""
    import json

    if isinstance(feature_dir, list):
        feature_dir = feature_dir[0] if feature_dir else None
    if not feature_dir:
        return {}
    p = Path(feature_dir) / "info.json"
    return json.loads(p.read_text()) if p.exists() else {}


def script_model(model: GuieModel, example_size: int) -> tuple[torch.jit.ScriptModule, str]:
    """TorchScript the wrapper. The backbone is scripted if it can be; otherwise traced at its fixed input
    size (it only ever sees [B,3,S,S] after preprocessing) and held inside the scripted wrapper.

    Returns the script module and how the backbone was compiled ("scripted" or "traced")."""
    backbone: nn.Module = model.backbone
    how = "scripted"
    with quiet_jit():
        try:
            backbone = torch.jit.script(model.backbone)
        except Exception:  # any scripting failure falls back to tracing, which is checked below
            how = "traced"
            example = torch.randn(2, 3, example_size, example_size)
            with torch.no_grad():
                backbone = torch.jit.trace(model.backbone, example, check_trace=False)
                ref = model.backbone(example)
                got = backbone(example)
            if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
                raise RuntimeError("traced backbone disagrees with the eager backbone") from None
        wrapper = GuieModel(model.preprocessor, backbone, model.head).eval()
        return torch.jit.script(wrapper), how
