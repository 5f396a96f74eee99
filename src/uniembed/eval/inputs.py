"""What an evaluation is asked to score: the kind of source and data, the training run behind them, and the
split and domain filter that select the images (settled before anything is embedded)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("auto", "val", "photos", "all")


class EvalError(ValueError):
    """Bad evaluation input (wrong source, missing data, impossible split): a clear message, no stack."""


@dataclass
class Items:
    """The evaluated images, row-aligned with every method's embeddings."""

    labels: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    dataset_dir: str | None = None  # prepared dataset holding the images (thumbnails by key)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: list[int]) -> Items:
        """The given rows, in that order (same dataset)."""
        return Items(
            [self.labels[i] for i in rows],
            [self.domains[i] for i in rows],
            [self.paths[i] for i in rows],
            [self.keys[i] for i in rows],
            self.dataset_dir,
        )


@dataclass
class Selection:
    """Which images are scored: the split (every image, or what the training run held out) and the domains.

    ``train_labels`` / ``photo_paths`` also say which rows a baseline PCA may be fitted on (the complement
    of what is scored), so the baselines never see the held-out images either."""

    split: str
    note: str
    train_labels: set[str] = field(default_factory=set)
    val_labels: set[str] = field(default_factory=set)
    photo_paths: set[str] = field(default_factory=set)
    domains: set[str] | None = None

    def keep(self, label: str, domain: str, path: str) -> bool:
        if self.domains is not None and domain not in self.domains:
            return False
        if self.split == "val":
            return label in self.val_labels
        if self.split == "photos":
            return path in self.photo_paths
        return True


def source_kind(source: str | Path) -> str:
    """``run`` | ``saved_model`` | ``features``; EvalError otherwise."""
    from uniembed.export.embedder import resolve_saved_model
    from uniembed.features.store import is_complete

    p = Path(source)
    if not p.exists():
        raise EvalError(f"source {p} does not exist")
    if p.is_dir() and (p / "head.pt").exists():
        return "run"
    if resolve_saved_model(p) is not None:
        return "saved_model"
    if p.is_dir() and is_complete(p):
        return "features"
    raise EvalError(f"{p} is not a training run (head.pt), an exported saved_model.pt, or a feature dir")


def data_kind(data: str | Path | None) -> str | None:
    """``features`` | ``dataset`` | ``labels_csv`` | None."""
    if data is None:
        return None
    from uniembed.features.store import is_complete

    p = Path(data)
    if p.is_file() and p.suffix.lower() == ".csv":
        return "labels_csv"
    if p.is_dir() and is_complete(p):
        return "features"
    if p.is_dir() and (p / "manifest.json").exists():
        return "dataset"
    if p.is_dir() and (p / "labels.csv").exists():
        return "labels_csv"
    raise EvalError(
        f"--data {p} is not a feature dir, a prepared dataset dir (manifest.json) or a labels.csv"
    )


def run_of(source: Path, kind: str) -> Path | None:
    """The training run behind a source (itself, or the run_dir recorded in export.json), if it exists."""
    if kind == "run":
        return source
    if kind == "saved_model":
        folder = source if source.is_dir() else source.parent
        ej = folder / "export.json"
        if ej.exists():
            run = Path(json.loads(ej.read_text()).get("run_dir", ""))
            if (run / "head.pt").exists():
                return run
    return None


def run_split(run_dir: Path) -> tuple[set[str], set[str], set[str]]:
    """(train labels, held-out labels, held-out photo paths) of a run, recomputed exactly as training split
    them (same feature dirs, same split config). The photo paths are empty unless the run held out photos of
    its training labels (``split.photo_fraction``)."""
    from uniembed.core.run_record import HeadRecord
    from uniembed.core.splits import heldout_photos, split_labels
    from uniembed.features.store import load_features
    from uniembed.train import TrainConfig

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise EvalError(f"{run_dir} has no config.yaml: cannot recompute its label split (use --split all)")
    cfg = TrainConfig.from_yaml(cfg_path)
    dirs = [str(d) for d in HeadRecord.load(run_dir).feature_dirs()]
    missing = [d for d in dirs if not (Path(d) / "info.json").exists()]
    if not dirs or missing:
        raise EvalError(
            f"the run's feature dir(s) {missing or dirs} are gone: cannot recompute its label split"
        )
    fs, names, _ = load_features(dirs)
    sp = split_labels(
        names,
        fs.domains,
        cfg.split.val_fraction,
        cfg.split.seed,
        cfg.train_domains,
        cfg.split.unseen_domains_all_labels,
    )
    train_labels = set(sp.train_labels)
    photos = heldout_photos(
        names, fs.domains, train_labels, cfg.split.photo_fraction, cfg.split.seed, cfg.train_domains
    )
    photo_paths = {fs.paths[i] for i in np.flatnonzero(photos).tolist()}
    return train_labels, set(sp.val_labels), photo_paths


def select(source: Path, run: Path | None, split: str, domains: list[str] | None) -> Selection:
    """Resolve ``split`` (``auto``: the held-out labels when the training run is known, else every image)
    and recompute the run's held-out labels / photos when the split needs them."""
    if split == "auto":
        split = "val" if run is not None else "all"
    dom_set = set(domains) if domains else None
    if split not in ("val", "photos"):
        return Selection(split, "every image", domains=dom_set)
    if run is None:
        raise EvalError(
            f"--split {split} needs the training run behind {source} (not found); use --split all"
        )
    train_labels, val_labels, photo_paths = run_split(run)
    note = f"held-out labels of run {run.name} ({len(val_labels)} labels)"
    if split == "photos":
        if not photo_paths:
            raise EvalError(
                f"run {run.name} held out no photos of its training labels: train it with "
                "split.photo_fraction=0.2 (for example), or use --split val"
            )
        note = f"held-out photos of the training labels of run {run.name} ({len(photo_paths)} photos)"
    return Selection(split, note, train_labels, val_labels, photo_paths, dom_set)
