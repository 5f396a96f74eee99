"""The files of a GUIE export and how they are found: ``saved_model.pt`` (TorchScript, the submission file),
its ``model.onnx`` twin and ``export.json``; a model's identity is the hash of its file's bytes."""

from __future__ import annotations

import json
from pathlib import Path

from uniembed.core.fsutil import sha256_file
from uniembed.core.integrity import DamagedFileError

SAVED_MODEL = "saved_model.pt"
ONNX_MODEL = "model.onnx"
EXPORT_RECORD = "export.json"


class ModelError(RuntimeError):
    """The model file is missing, not TorchScript, or breaks the GUIE output contract (user-facing)."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No model where one was expected (also a FileNotFoundError, for callers that catch that)."""


class DamagedModelError(ModelError, DamagedFileError):
    """A model file (or the run record behind a run dir) is truncated or garbled: export it again."""


def reexport_hint(model_file: str | Path) -> str:
    """What to do about a damaged export: the export command, with the run export.json names if readable."""
    folder = Path(model_file).parent
    run = "RUN"
    try:
        rec = json.loads((folder / EXPORT_RECORD).read_text())
        run = str(rec.get("run_dir") or run) if isinstance(rec, dict) else run
    except (OSError, ValueError):
        pass
    return f"export it again with `uniembed export {run} --out {folder}`"


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
