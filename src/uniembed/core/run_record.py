"""The typed training-run record, ``head.pt``: written by training, read by export, evaluation, fine-tuning.

On disk it stays a plain dict of tensors and strings (``torch.load(weights_only=True)`` can read it, and older
runs still load); in code it is this dataclass, so a reader cannot misspell a key or forget a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uniembed.core.integrity import DamagedFileError, short_reason

HEAD_FILE = "head.pt"


class RunRecordError(DamagedFileError):
    """``head.pt`` is damaged or is not a record written by ``uniembed train`` (a ``ValueError``)."""


def retrain_hint(run: str | Path) -> str:
    """What to do about a damaged run record."""
    return f"train the run again (`uniembed train ... --out {run} --overwrite`) or restore it from a copy"


@dataclass
class HeadRecord:
    """Everything export needs to rebuild the embedder from a run folder (docs/design.md, "head.pt")."""

    head_config: dict
    state_dict: dict[str, torch.Tensor]
    backbone: str | None = None
    pooling: str = "avg"
    preprocess: dict | None = None
    fingerprint: str | None = None  # of the feature function the head was trained on
    weights_hash: str | None = None
    feature_dir: str | list[str] | None = None  # a path, or a list when several feature dirs were merged
    embedding_dim: int = 0
    backbone_state: str | None = None  # fine-tune stage: backbone weights file, relative to the run dir
    selected_epoch: int | None = None
    finetune: dict | None = None  # the fine-tune stage's record
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know (kept on re-save)

    def feature_dirs(self) -> list[Path]:
        fd = self.feature_dir
        if not fd:
            return []
        return [Path(p) for p in (fd if isinstance(fd, list) else [fd])]

    def info(self) -> dict[str, Any]:
        """The record without its tensors (JSON-friendly): for reports and export.json."""
        d = self.to_dict()
        d.pop("state_dict")
        return d

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "head.pt") -> HeadRecord:
        if not isinstance(d, dict) or "head_config" not in d or "state_dict" not in d:
            raise RunRecordError(f"{source} is not a head.pt written by `uniembed train`")
        if not isinstance(d["head_config"], dict) or not isinstance(d["state_dict"], dict):
            raise RunRecordError(f"{source} is damaged (head_config or state_dict is not a table)")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        if known.get("pooling") is None:
            known["pooling"] = "avg"
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    def save(self, path: str | Path) -> Path:
        """Atomic write (temp file + rename): a crash never leaves half a head.pt."""
        from uniembed.core.fsutil import atomic_path

        path = Path(path)
        # Through a file object: torch.save(path) names the archive inside after the (random) temp file.
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(self.to_dict(), f)
        return path

    @classmethod
    def load(cls, run_or_file: str | Path) -> HeadRecord:
        """From a run dir (its ``head.pt``) or a head.pt path."""
        p = Path(run_or_file)
        p = p / HEAD_FILE if p.is_dir() else p
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (is {run_or_file} a finished `uniembed train` run?)")
        try:
            d = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or not a torch file
            raise RunRecordError(
                f"{p} cannot be read as a head.pt ({short_reason(e)}); {retrain_hint(p.parent)}"
            ) from e
        return cls.from_dict(d, str(p))
