"""The files of a GUIE export and how they are found: ``saved_model.pt`` (TorchScript, the submission file),
its ``model.onnx`` twin and ``export.json``; a model's identity is the hash of its file's bytes."""

from __future__ import annotations

from pathlib import Path

from uniembed.core.fsutil import sha256_file

SAVED_MODEL = "saved_model.pt"
ONNX_MODEL = "model.onnx"
EXPORT_RECORD = "export.json"


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
