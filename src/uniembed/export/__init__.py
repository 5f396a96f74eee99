"""GUIE export: TorchScript ``saved_model.pt``, ``model.onnx``, model card, parity check, and
``load_embedder`` to use the result. Attributes are imported lazily so ``uniembed --help`` stays fast."""

from __future__ import annotations

from typing import Any

__all__ = ["export_guie", "load_embedder", "Embedder", "GuieModel", "ParityError"]

_WHERE = {
    "export_guie": "uniembed.export.guie",
    "load_embedder": "uniembed.export.embedder",
    "Embedder": "uniembed.export.embedder",
    "GuieModel": "uniembed.export.model",
    "ParityError": "uniembed.export.parity",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'uniembed.export' has no attribute {name!r}")
