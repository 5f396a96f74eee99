"""The feature cache on disk: float16 features, memory-mapped, with labels, domains and paths.

Layout of a feature directory::

    features.npy   float16 [N, D]  (np.load(..., mmap_mode="r"))
    meta.csv       key,path,label,label_id,domain,source  (row i describes features[i])
    info.json      backbone name, fingerprint, weights hash, preprocessing, manifest hash, dim, count

Files in, files out: training, evaluation and benchmarks read only this.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uniembed.core.fsutil import atomic_path, atomic_write_text

META_FIELDS = ["key", "path", "label", "label_id", "domain", "source"]


@dataclass
class FeatureSet:
    features: np.ndarray  # [N, D] float16 (memmap) or float32
    labels: np.ndarray  # [N] int64 global label ids
    label_names: list[str]  # label_id -> name (from the manifest's label map)
    domains: np.ndarray  # [N] str
    paths: list[str]
    keys: list[str]
    sources: list[str]
    info: dict

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def subset(self, mask: np.ndarray) -> FeatureSet:
        """Rows where ``mask`` is true (bool mask or index array); features are copied into memory."""
        idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask)
        return FeatureSet(
            features=np.asarray(self.features[idx]),
            labels=self.labels[idx],
            label_names=self.label_names,
            domains=self.domains[idx],
            paths=[self.paths[i] for i in idx],
            keys=[self.keys[i] for i in idx],
            sources=[self.sources[i] for i in idx],
            info=self.info,
        )

    def float32(self) -> np.ndarray:
        return np.asarray(self.features, dtype=np.float32)


def write_feature_set(
    out_dir: str | Path, features: np.ndarray, meta_rows: list[dict], info: dict, label_names: list[str]
) -> Path:
    """Write a complete feature directory: each file appears whole or not at all, info.json last, so a
    directory holding all three files (``is_complete``) is a finished one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(meta_rows) != features.shape[0]:
        raise ValueError(f"{len(meta_rows)} meta rows for {features.shape[0]} feature rows")
    with atomic_path(out / "features.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(features, dtype=np.float16))
    with atomic_path(out / "meta.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=META_FIELDS)
        w.writeheader()
        for r in meta_rows:
            w.writerow({k: r.get(k, "") for k in META_FIELDS})
    info = dict(info, dim=int(features.shape[1]), count=int(features.shape[0]), label_names=list(label_names))
    atomic_write_text(out / "info.json", json.dumps(info, indent=2))
    return out


def is_complete(feature_dir: str | Path) -> bool:
    d = Path(feature_dir)
    return all((d / n).exists() for n in ("features.npy", "meta.csv", "info.json"))


def load_feature_set(feature_dir: str | Path, mmap: bool = True) -> FeatureSet:
    d = Path(feature_dir)
    if not is_complete(d):
        raise FileNotFoundError(f"{d} is not a complete feature directory (run `uniembed extract` first)")
    info = json.loads((d / "info.json").read_text())
    feats = np.load(d / "features.npy", mmap_mode="r" if mmap else None)
    with open(d / "meta.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return FeatureSet(
        features=feats,
        labels=np.array([int(r["label_id"]) for r in rows], dtype=np.int64),
        label_names=list(info.get("label_names", [])),
        domains=np.array([r["domain"] for r in rows]),
        paths=[r["path"] for r in rows],
        keys=[r["key"] for r in rows],
        sources=[r["source"] for r in rows],
        info=info,
    )


def load_features(dirs: list[str]) -> tuple[FeatureSet, np.ndarray, list[str]]:
    """Load and concatenate feature dirs (same backbone fingerprint and width). Returns the concatenated set,
    label *names* per row (label ids are per-manifest, names are global) and the dirs resolved."""
    if not dirs:
        raise ValueError("no feature directories given")
    sets = [load_feature_set(d) for d in dirs]
    first = sets[0]
    for d, s in zip(dirs[1:], sets[1:], strict=True):
        if s.dim != first.dim or s.info.get("fingerprint") != first.info.get("fingerprint"):
            raise ValueError(
                f"feature dir {d} was made by a different feature function "
                f"({s.info.get('backbone')}/{s.info.get('fingerprint')}, dim {s.dim}) than {dirs[0]} "
                f"({first.info.get('backbone')}/{first.info.get('fingerprint')}, dim {first.dim})"
            )
    names: list[np.ndarray] = []
    for s in sets:
        if s.label_names:
            if int(s.labels.max(initial=-1)) >= len(s.label_names):
                raise ValueError("feature set label ids exceed its label_names")
            names.append(np.asarray(s.label_names, dtype=object)[s.labels])
        else:
            names.append(s.labels.astype(str).astype(object))
    if len(sets) == 1:
        fs = first
    else:
        fs = FeatureSet(
            features=np.concatenate([np.asarray(s.features) for s in sets]),
            labels=np.concatenate([s.labels for s in sets]),
            label_names=[],
            domains=np.concatenate([s.domains for s in sets]),
            paths=sum((s.paths for s in sets), []),
            keys=sum((s.keys for s in sets), []),
            sources=sum((s.sources for s in sets), []),
            info=first.info,
        )
    return fs, np.concatenate(names), [str(Path(d)) for d in dirs]
