"""The feature cache on disk: float16 features, memory-mapped, with labels, domains and paths.

Layout of a feature directory::

    features.npy   float16 [N, D]  (np.load(..., mmap_mode="r"))
    meta.csv       key,path,label,label_id,domain,source  (row i describes features[i])
    info.json      backbone name, fingerprint, weights hash, preprocessing, manifest hash, dim, count, and
                   the size + sha256 of features.npy and meta.csv ("checksums")

Files in, files out: training, evaluation and benchmarks read only this. ``load_feature_set`` checks the
checksums (once per process per file: ``uniembed.core.integrity``), the shapes and the row counts before
anything uses the features, so a damaged cache fails in one line; ``extract`` recomputes a damaged cache.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uniembed.core.fsutil import atomic_path, atomic_write_text
from uniembed.core.integrity import CHECKSUMS_KEY, DamagedFileError, checksums, read_json_object, reading
from uniembed.core.integrity import verify_checksums as _verify

META_FIELDS = ["key", "path", "label", "label_id", "domain", "source"]
FEATURES_FILE, META_FILE, INFO_FILE = "features.npy", "meta.csv", "info.json"


class FeatureCacheError(DamagedFileError):
    """A feature directory's files are truncated, garbled or disagree with each other: extract it again."""


def _fix(d: Path) -> str:
    return f"rerun `uniembed extract` to compute it again (or delete {d})"


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
    info[CHECKSUMS_KEY] = checksums(out, [FEATURES_FILE, META_FILE])
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    return out


def is_complete(feature_dir: str | Path) -> bool:
    d = Path(feature_dir)
    return all((d / n).exists() for n in (FEATURES_FILE, META_FILE, INFO_FILE))


def load_feature_set(feature_dir: str | Path, mmap: bool = True, verify: bool = True) -> FeatureSet:
    """A finished feature directory. ``FileNotFoundError`` when it is not one (a file missing);
    ``FeatureCacheError`` (one line) when a file is damaged: checksums (skipped with ``verify=False``, absent
    in caches written before them), the features' shape, the meta rows and info.json must agree."""
    d = Path(feature_dir)
    if not is_complete(d):
        missing = ", ".join(n for n in (FEATURES_FILE, META_FILE, INFO_FILE) if not (d / n).exists())
        raise FileNotFoundError(
            f"{d} is not a complete feature directory (missing {missing}); run `uniembed extract` first"
        )
    info = read_json_object(d / INFO_FILE, _fix(d), FeatureCacheError)
    if verify:
        _verify(d, info, str(d / INFO_FILE), _fix(d), FeatureCacheError)
    with reading(d / FEATURES_FILE, _fix(d), FeatureCacheError, what="cannot be read as a NumPy array"):
        feats = np.load(d / FEATURES_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
    if feats.ndim != 2:
        raise FeatureCacheError(f"{d / FEATURES_FILE} holds shape {feats.shape}, not [N, D]; {_fix(d)}")
    with reading(d / META_FILE, _fix(d), FeatureCacheError, what="is damaged"):
        rows = _read_meta(d / META_FILE)
        labels = np.array([int(r["label_id"]) for r in rows], dtype=np.int64)
    counts = {"features.npy rows": feats.shape[0], "meta.csv rows": len(rows)}
    if "count" in info:
        counts["info.json count"] = info["count"]
    if len(set(counts.values())) > 1:
        said = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise FeatureCacheError(f"{d}: the files disagree ({said}); {_fix(d)}")
    return FeatureSet(
        features=feats,
        labels=labels,
        label_names=list(info.get("label_names", [])),
        domains=np.array([r["domain"] for r in rows]),
        paths=[r["path"] for r in rows],
        keys=[r["key"] for r in rows],
        sources=[r["source"] for r in rows],
        info=info,
    )


def _read_meta(path: Path) -> list[dict[str, str]]:
    """meta.csv rows; every row must carry every column (a garbled or cut file does not)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for n, r in enumerate(rows, start=2):
        if None in r or any(r.get(k) is None for k in META_FIELDS):
            raise ValueError(f"line {n} does not have the columns {','.join(META_FIELDS)}")
    return rows


def load_features(dirs: list[str], verify: bool = True) -> tuple[FeatureSet, np.ndarray, list[str]]:
    """Load and concatenate feature dirs (same backbone fingerprint and width). Returns the concatenated set,
    label *names* per row (label ids are per-manifest, names are global) and the dirs resolved."""
    if not dirs:
        raise ValueError("no feature directories given")
    sets = [load_feature_set(d, verify=verify) for d in dirs]
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
