"""Training configs that ship with the package (they work after ``pip install``): ``default``, ``smoke``,
``demo`` and ``model`` (the recipe ``uniembed model`` trains). Look one up with :func:`config_path`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def config_names() -> list[str]:
    """Names of the shipped configs, without ``.yaml``."""
    files = resources.files(__name__).iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def config_path(name: str) -> Path:
    """Path of a shipped config by name (``"model"`` or ``"model.yaml"``); a path to an existing file is
    returned as it is, so a command's ``--config`` takes either."""
    if Path(name).is_file():
        return Path(name)
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    p = Path(str(resources.files(__name__).joinpath(f"{stem}.yaml")))
    if not p.is_file():
        raise FileNotFoundError(f"no shipped config {name!r}; shipped: {', '.join(config_names())}")
    return p
