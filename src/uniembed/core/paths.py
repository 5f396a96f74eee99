"""Where things live: the shared real-photo sets and the project's default output folders."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that overrides where the real photo sets are looked for.
SHARED_DATA_ENV = "UNIEMBED_SHARED_DATA"


def repo_root() -> Path:
    """The checkout this package was installed from (editable install) or the current directory."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "src" / "uniembed").exists():
            return parent
    return Path.cwd()


def shared_data_dir() -> Path | None:
    """``$UNIEMBED_SHARED_DATA``, or ``../shared/data`` beside the checkout (CI lays it there); else None."""
    candidates = []
    if os.environ.get(SHARED_DATA_ENV):
        candidates.append(Path(os.environ[SHARED_DATA_ENV]))
    candidates += [repo_root().parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if (c / "grocery_store" / "labels.csv").exists() or (c / "coil100" / "labels.csv").exists():
            return c.resolve()
    return None


def cache_dir() -> Path:
    """Per-user cache for downloads and exported ONNX backbones (``$UNIEMBED_CACHE`` overrides)."""
    base = os.environ.get("UNIEMBED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "uniembed")
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p
