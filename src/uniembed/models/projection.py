"""Label-free projections of backbone features: PCA with optional partial whitening.

Shared below the stages because two of them fit the same projection: the collection-adapted search index
(``uniembed index --adapt pcaw256``, serve/adapt.py) fits it on the images it indexes, and ``uniembed model``
scores the same fit in its leave-one-domain-out protocol and can ship a fixed one inside the GUIE model.

Projection (``fit_projection``): x = L2(features); mean-centre; eigenvectors of the covariance (SVD of the
centred matrix when N <= F), top D by eigenvalue; component i is scaled by lambda_i ** (-power / 2)
(power 0: plain PCA, 0.5: square-root whitening, 1: full whitening); the projected vector is L2-normalised.
Eigenvalues below 1e-6 of the largest (a centred set of N images has rank <= N - 1) are floored there
before whitening, so a null direction is not blown up into noise.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Whitening power of ``pcaw<D>`` without ``@<power>``: divide component i by lambda_i ** 0.25.
DEFAULT_WHITEN_POWER = 0.5
#: Relative floor on eigenvalues before whitening (see the module docstring).
EIGEN_FLOOR = 1e-6

_SPEC_RE = re.compile(r"^(pcaw|pca)(\d+)(?:@([0-9]*\.?[0-9]+))?$")


class AdaptError(ValueError):
    """A bad --adapt spec or a projection that cannot be fitted (user-facing)."""


@dataclass(frozen=True)
class AdaptSpec:
    """``pca<D>`` (power 0), ``pcaw<D>`` (power 0.5) or ``pcaw<D>@<power>`` (power in [0, 1])."""

    dim: int
    power: float

    @property
    def name(self) -> str:
        if self.power == 0:
            return f"pca{self.dim}"
        if self.power == DEFAULT_WHITEN_POWER:
            return f"pcaw{self.dim}"
        return f"pcaw{self.dim}@{self.power:g}"


def parse_adapt_spec(spec: str) -> AdaptSpec:
    """Parse ``pca64`` / ``pcaw64`` / ``pcaw256@1``; raise ``AdaptError`` with the grammar otherwise."""
    grammar = "pca<D> (PCA), pcaw<D> (square-root whitening) or pcaw<D>@<power> (power in [0,1])"
    m = _SPEC_RE.match(str(spec).strip().lower())
    if not m:
        raise AdaptError(f"--adapt {spec!r}: expected {grammar}, e.g. pca64, pcaw64, pcaw256@1")
    kind, dim, power_s = m.group(1), int(m.group(2)), m.group(3)
    if dim < 1:
        raise AdaptError(f"--adapt {spec!r}: the number of dimensions must be at least 1")
    if power_s is not None and kind == "pca":
        raise AdaptError(f"--adapt {spec!r}: a whitening power needs pcaw<D>@<power>; pca<D> never whitens")
    power = float(power_s) if power_s is not None else (DEFAULT_WHITEN_POWER if kind == "pcaw" else 0.0)
    if not 0.0 <= power <= 1.0:
        raise AdaptError(f"--adapt {spec!r}: the whitening power must lie in [0, 1], got {power:g}")
    return AdaptSpec(dim=dim, power=power)


def l2n(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation, like ``torch.nn.functional.normalize`` (eps 1e-12)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Projection:
    """A fitted projection; ``apply`` maps backbone features [N, F] to L2-normalised [N, D]."""

    mean: np.ndarray  # float32 [F]
    components: np.ndarray  # float32 [F, D], orthonormal columns, by decreasing eigenvalue
    scales: np.ndarray  # float32 [D] = lambda ** (-power / 2)
    eigenvalues: np.ndarray  # float64 [D] (before flooring)
    spec: AdaptSpec
    fitted_on: int
    fitted_at: str
    explained_variance: float
    meta: dict[str, Any] = field(default_factory=dict)  # backbone, pooling, feature fingerprint

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def weight(self) -> np.ndarray:
        """components * scales: the one matrix the query model multiplies by (float32 [F, D])."""
        return (self.components * self.scales[None, :]).astype(np.float32)

    def apply(self, features: np.ndarray) -> np.ndarray:
        """L2 -> centre -> project and scale -> L2, in float32 like the query model."""
        x = l2n(np.asarray(features, dtype=np.float32))
        if x.shape[1] != self.feature_dim:
            raise AdaptError(f"features have {x.shape[1]} dims, the projection expects {self.feature_dim}")
        return l2n((x - self.mean[None, :]) @ self.weight).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """The ``adapt`` block of index.json (and /health)."""
        return {
            "spec": self.spec.name,
            "dim": self.dim,
            "whiten_power": self.spec.power,
            "fitted_on": self.fitted_on,
            "fitted_at": self.fitted_at,
            "feature_dim": self.feature_dim,
            "explained_variance": round(self.explained_variance, 6),
            **self.meta,
        }

    def save(self, path: str | Path) -> None:
        meta = {**self.describe(), "meta": self.meta}
        with open(path, "wb") as f:
            np.savez(
                f,
                mean=self.mean.astype(np.float32),
                components=self.components.astype(np.float32),
                scales=self.scales.astype(np.float32),
                eigenvalues=self.eigenvalues.astype(np.float64),
                meta=np.array(json.dumps(meta, sort_keys=True)),
            )

    @classmethod
    def load(cls, path: str | Path) -> Projection:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return cls(
                    mean=z["mean"],
                    components=z["components"],
                    scales=z["scales"],
                    eigenvalues=z["eigenvalues"],
                    spec=parse_adapt_spec(meta["spec"]),
                    fitted_on=int(meta["fitted_on"]),
                    fitted_at=str(meta["fitted_at"]),
                    explained_variance=float(meta["explained_variance"]),
                    meta=dict(meta.get("meta", {})),
                )
        except (OSError, KeyError, ValueError) as e:
            raise AdaptError(f"cannot read the projection {path}: {e}") from e


def fit_projection(
    features: np.ndarray, spec: AdaptSpec | str, meta: dict[str, Any] | None = None
) -> Projection:
    """Fit ``spec`` on features [N, F] without labels (see the module docstring for the math)."""
    if isinstance(spec, str):
        spec = parse_adapt_spec(spec)
    x = l2n(np.asarray(features, dtype=np.float64))
    n, f = x.shape
    if n < 2:
        raise AdaptError(f"--adapt {spec.name}: needs at least 2 images to fit a projection, got {n}")
    if spec.dim > min(n, f):
        raise AdaptError(
            f"--adapt {spec.name}: {spec.dim} dims exceed min(images, feature dim) = min({n}, {f}); "
            f"use at most {min(n, f)}"
        )
    mean = x.mean(axis=0)
    xc = x - mean
    if n <= f:  # N x F SVD is cheaper than the F x F covariance
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        evals_all, vecs = s**2 / n, vt.T
    else:  # float32 product (the N x F x F part), float64 eigendecomposition
        xc32 = xc.astype(np.float32)
        evals_all, vecs = np.linalg.eigh((xc32.T @ xc32).astype(np.float64) / n)
        order = np.argsort(evals_all)[::-1]
        evals_all, vecs = evals_all[order], vecs[:, order]
    evals_all = np.clip(evals_all, 0.0, None)
    total = float(evals_all.sum())
    if total <= 0:
        raise AdaptError(f"--adapt {spec.name}: the features of the {n} images do not vary; nothing to fit")
    comps = vecs[:, : spec.dim].copy()
    # Deterministic signs: the largest-magnitude loading of every component is positive.
    big = np.argmax(np.abs(comps), axis=0)
    comps *= np.where(comps[big, np.arange(spec.dim)] < 0, -1.0, 1.0)[None, :]
    evals = evals_all[: spec.dim]
    floored = np.maximum(evals, evals_all[0] * EIGEN_FLOOR)
    scales = floored ** (-spec.power / 2.0)
    return Projection(
        mean=mean.astype(np.float32),
        components=comps.astype(np.float32),
        scales=scales.astype(np.float32),
        eigenvalues=evals.astype(np.float64),
        spec=spec,
        fitted_on=n,
        fitted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        explained_variance=float(evals.sum() / total),
        meta=dict(meta or {}),
    )
