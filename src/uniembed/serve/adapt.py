"""Collection-adapted indexes: a label-free projection fitted on the backbone features of the indexed images.

``uniembed index --adapt pcaw64 --backbone NAME`` embeds every image with a frozen backbone (the *feature
model*: preprocessing + backbone, L2-normalised), fits a PCA (optionally whitened) on those features and
indexes the projected vectors. The index folder then holds, besides the usual files::

    features.npy      float16 [N, F] L2-normalised backbone features, row i == items.csv row i (refits)
    projection.npz    mean [F], components [F, D], scales [D], eigenvalues, meta (JSON: spec, fitted_on, ...)
    query_model.pt    GUIE TorchScript: uint8 [B,3,H,W] -> float32 [B, D] =
                      preprocess -> backbone -> L2 -> minus mean -> components * scales -> L2

``index.json`` records the query model as the index's model (its fingerprint) and an ``adapt`` block, so
``search`` and ``serve`` need no ``--model``.

The projection itself (``fit_projection``, PCA with partial whitening) lives in models/projection.py: the
model stage scores the same fit in its leave-one-domain-out protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniembed.models.projection import (  # noqa: F401  (re-exported: the index code and tests use them here)
    DEFAULT_WHITEN_POWER,
    EIGEN_FLOOR,
    AdaptError,
    AdaptSpec,
    Projection,
    fit_projection,
    l2n,
    parse_adapt_spec,
)

FEATURES_FILE = "features.npy"
PROJECTION_FILE = "projection.npz"
QUERY_MODEL = "query_model.pt"


# --------------------------------------------------------------------------------------------- torch modules
class L2Normalize(nn.Module):
    """The feature model's head: backbone features -> L2-normalised float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1)


class ProjectionHead(nn.Module):
    """The query model's head: L2 -> minus mean -> @ (components * scales) -> L2 (as ``Projection.apply``)."""

    def __init__(self, proj: Projection):
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(np.ascontiguousarray(proj.mean, dtype=np.float32)))
        self.register_buffer("weight", torch.from_numpy(np.ascontiguousarray(proj.weight, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=1)
        return F.normalize((x - self.mean) @ self.weight, dim=1)


def resolve_backbone(backbone: Any, pooling: str | None) -> Any:
    """A ``Backbone`` as given, or built frozen by name with ``create_backbone(name, pooling=...)``."""
    if backbone is None:
        raise AdaptError("--adapt needs --backbone NAME (e.g. mobilenetv2) to compute the features")
    if not isinstance(backbone, str):
        return backbone
    from uniembed.models import registry

    try:
        return registry.create_backbone(backbone, pooling=pooling or "avg")
    except (KeyError, ValueError, FileNotFoundError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise AdaptError(f"--backbone {backbone!r}: {msg}") from e


def feature_meta(bb: Any) -> dict[str, Any]:
    """What identifies the feature function (stored with the projection and checked on --add)."""
    return {
        "backbone": str(bb.name),
        "pooling": str(getattr(bb, "pooling", "")),
        "feature_fingerprint": str(bb.fingerprint()),
    }


class OrtFeatures:
    """The feature model on ONNX Runtime (the extraction engine, several times faster than eager torch on
    CPU): pixels pre-resized to the backbone's side, in [0, 255] -> L2-normalised features."""

    def __init__(self, bb: Any, threads: int | None = None):
        from uniembed.features.extract import OrtRunner

        self.runner = OrtRunner(bb, threads=threads)

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return l2n(self.runner(x.float()))


def feature_embedder(bb: Any, batch_size: int, engine: str = "auto", threads: int | None = None) -> Any:
    """An in-memory ``Embedder`` for the feature model (preprocess + backbone + L2), pre-resizing images with
    the model's own resize like ``load_embedder`` does for GuieModels. ``engine`` auto / onnxruntime: ONNX
    Runtime (falls back to eager torch, with a note, if the backbone cannot be exported); torch: eager."""
    from uniembed.export.embedder import Embedder
    from uniembed.export.model import GuieModel
    from uniembed.models.preprocess import ImagePreprocessor

    pre = ImagePreprocessor(bb.preprocess)
    notes: list[str] = []
    model: Any = None
    kind = "eager"
    if engine in ("auto", "onnxruntime"):
        try:
            model, kind = OrtFeatures(bb, threads), "onnxruntime"
        except Exception as ex:  # noqa: BLE001 - any export/session failure: eager torch still works
            notes.append(f"ONNX Runtime unavailable for this backbone ({type(ex).__name__}); eager torch")
    if model is None:
        model = GuieModel(pre, bb.module, L2Normalize()).eval()
    e = Embedder(model, None, str(bb.fingerprint()), batch_size, resize=pre.resize, engine=kind, notes=notes)
    e._dim = int(bb.dim)
    return e


def write_query_model(bb: Any, proj: Projection, path: Path) -> str:
    """Script preprocess + backbone + projection into a GUIE TorchScript file at ``path``; check it against
    the eager composition on a probe image; return how the backbone was compiled."""
    from uniembed.export.model import GuieModel, quiet_jit, script_model
    from uniembed.models.preprocess import ImagePreprocessor

    pre = ImagePreprocessor(bb.preprocess)
    eager = GuieModel(pre, bb.module, ProjectionHead(proj)).eval()
    scripted, how = script_model(eager, int(bb.preprocess.input_size))
    with quiet_jit():
        scripted.save(str(path))
    probe = torch.randint(
        0, 256, (2, 3, 97, 61), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        ref, got = eager(probe), scripted(probe)
    diff = float((ref - got).abs().max())
    if not diff <= 1e-4:
        raise AdaptError(f"the scripted query model disagrees with the eager one (max |diff| {diff:.1e})")
    return how
