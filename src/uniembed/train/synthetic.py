"""Synthetic feature directories (Gaussian class clusters in several domains) for tests and smoke runs.

They are written with the real feature-store writer: the trainer reads them exactly like extracted features.
Classes differ only inside a small "informative" subspace (``signal_dim`` dims); every other dim carries large
per-image nuisance noise shared by all classes. Raw features and PCA (which follows the nuisance variance) are
therefore mediocre at retrieval, while a trained linear head learns to keep the informative subspace - and
that transfers to held-out labels, which is exactly what the trainer's validation measures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uniembed.features.store import write_feature_set


def write_synthetic_features(
    out_dir: str | Path,
    dim: int = 96,
    domains: tuple[str, ...] = ("dom_a", "dom_b", "dom_c"),
    classes_per_domain: int = 12,
    per_class: int = 8,
    noise: float = 0.35,
    nuisance: float = 1.0,
    signal_dim: int = 12,
    seed: int = 0,
) -> Path:
    """Write a feature dir with ``len(domains) * classes_per_domain * per_class`` rows (float16 on disk)."""
    if not 0 < signal_dim <= dim:
        raise ValueError(f"need 0 < signal_dim <= dim, got {signal_dim}, {dim}")
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]  # random rotation: the subspace is not axis-aligned
    sig, nui = basis[:, :signal_dim], basis[:, signal_dim:]
    feats, rows, names = [], [], []
    for d in domains:
        offset = sig @ rng.normal(0, 0.5, signal_dim)
        for c in range(classes_per_domain):
            centre = 3.0 + offset + sig @ rng.normal(0, 1.0, signal_dim)
            name = f"{d}:class{c:03d}"
            lid = len(names)
            names.append(name)
            for i in range(per_class):
                feats.append(
                    centre + rng.normal(0, noise, dim) + nui @ rng.normal(0, nuisance, dim - signal_dim)
                )
                key = f"{len(rows):08d}"
                rows.append(
                    {
                        "key": key,
                        "path": f"/synthetic/{name}/{i}.jpg",
                        "label": name,
                        "label_id": lid,
                        "domain": d,
                        "source": "synthetic",
                    }
                )
    x = np.stack(feats).astype(np.float32)
    info = {
        "backbone": "synthetic",
        "fingerprint": f"synthetic-{seed}-{dim}",
        "weights_hash": "",
        "pooling": "avg",
        "preprocess": {"input_size": 32},
        "manifest_hash": f"synthetic-{seed}",
    }
    return write_feature_set(out_dir, x, rows, info, names)
