"""The collection-adapted side of a build: which backbone embeds the images, and whether the projection is
fitted now, refitted over old + new features, or kept from the index being extended (``--add``).

``uniembed.serve.adapt`` (torch) is imported inside the methods, so loading the index code stays light.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.runtime import torch_threads
from uniembed.export.embedder import file_fingerprint
from uniembed.serve.errors import ImageIndexError, ModelMismatchError
from uniembed.serve.store import ImageIndex


def _check_add_arguments(
    old: ImageIndex, model_path: str | Path | None, spec: Any, backbone: Any, pooling: str | None, refit: bool
) -> None:
    """``--add`` to an adapted index: refuse options that contradict what the index stores."""
    if not old.adapted:
        raise ImageIndexError(
            f"--adapt with --add: the index at {old.root} was built with a fixed model, not --adapt; "
            "rebuild it without --add to make a collection-adapted index"
        )
    stored = old.info["adapt"]
    if model_path is not None:
        raise ImageIndexError(
            f"the index at {old.root} is collection-adapted ({stored['spec']}): --add embeds new images "
            f"with its stored backbone {stored['backbone']!r}; drop --model"
        )
    if spec is not None and not refit and spec.name != stored["spec"]:
        raise ImageIndexError(
            f"--add keeps the stored projection {stored['spec']}; add --refit to refit it as {spec.name}"
        )
    if isinstance(backbone, str) and backbone != stored["backbone"]:
        raise ImageIndexError(
            f"--backbone {backbone!r}: the index's features come from {stored['backbone']!r}; "
            "rebuild without --add to switch backbones"
        )
    if pooling is not None and pooling != stored.get("pooling"):
        raise ImageIndexError(
            f"--pooling {pooling!r}: the index's features use pooling {stored.get('pooling')!r}"
        )


@dataclass
class AdaptPlan:
    """What a collection-adapted build or --add will do: the backbone, and the projection to fit or keep."""

    backbone: Any
    spec: Any  # adapt.AdaptSpec, or None to keep the stored projection
    keep: Any  # adapt.Projection kept from the old index, or None

    @classmethod
    def make(
        cls,
        old: ImageIndex | None,
        model_path: str | Path | None,
        adapt: str | None,
        backbone: Any,
        pooling: str | None,
        refit: bool,
    ) -> AdaptPlan:
        from uniembed.serve import adapt as ad

        spec = ad.parse_adapt_spec(adapt) if adapt is not None else None
        if old is None:
            if model_path is not None:
                raise ImageIndexError(
                    "--adapt fits its own projection on the backbone's features and writes its own query "
                    "model into the index; use --backbone NAME instead of --model"
                )
            return cls(ad.resolve_backbone(backbone, pooling), spec, None)
        _check_add_arguments(old, model_path, spec, backbone, pooling, refit)
        stored = old.info["adapt"]
        bb = ad.resolve_backbone(
            backbone if backbone is not None else stored["backbone"], stored.get("pooling") or None
        )
        if str(bb.fingerprint()) != stored["feature_fingerprint"]:
            raise ModelMismatchError(
                f"backbone {bb.name!r} now has fingerprint {bb.fingerprint()}, but the index's features were "
                f"computed with {stored['feature_fingerprint']} (weights or preprocessing changed); rebuild "
                "the index without --add"
            )
        keep = None
        if refit:
            spec = spec or ad.parse_adapt_spec(stored["spec"])
        else:
            keep = ad.Projection.load(old.root / ad.PROJECTION_FILE)
        return cls(bb, spec, keep)

    @staticmethod
    def _all_features(tmp: Path, old: ImageIndex | None, new16: np.ndarray) -> np.ndarray:
        """Stored (float16) features of the old index followed by the new ones, saved as features.npy."""
        from uniembed.serve import adapt as ad

        feats = new16
        if old is not None:
            stored = np.load(old.root / ad.FEATURES_FILE, mmap_mode="r")
            if stored.shape[0] != len(old):
                raise ImageIndexError(
                    f"{old.root / ad.FEATURES_FILE} holds {stored.shape[0]} rows for {len(old)} indexed "
                    "images; rebuild the index"
                )
            feats = np.concatenate([np.asarray(stored), new16]) if len(new16) else np.asarray(stored)
        np.save(tmp / ad.FEATURES_FILE, feats)
        return feats

    def finish(
        self, tmp: Path, old: ImageIndex | None, new_feats: np.ndarray, threads: int
    ) -> tuple[np.ndarray, np.ndarray | None, str, dict[str, Any]]:
        """Write features.npy, projection.npz and query_model.pt into ``tmp``. Returns (vectors of the new
        images, all vectors when the index must be rebuilt (a fit or refit) else None, the query model's
        fingerprint, the ``adapt`` block of index.json)."""
        from uniembed.serve import adapt as ad

        new16 = new_feats.astype(np.float16)
        if not np.isfinite(new16).all():
            raise ad.AdaptError("backbone features overflow float16")
        feats = self._all_features(tmp, old, new16)
        if self.keep is not None:  # --add: same projection, same query model file (same fingerprint)
            assert old is not None
            proj = self.keep
            shutil.copy2(old.root / ad.PROJECTION_FILE, tmp / ad.PROJECTION_FILE)
            shutil.copy2(old.root / ad.QUERY_MODEL, tmp / ad.QUERY_MODEL)
            vectors, rebuild = proj.apply(new_feats), None
            how = old.info["adapt"].get("backbone_compiled", "")
        else:
            # Fit on the stored (float16) features, so a refit of the same rows gives the same projection.
            proj = ad.fit_projection(feats.astype(np.float32), self.spec, ad.feature_meta(self.backbone))
            proj.save(tmp / ad.PROJECTION_FILE)
            with torch_threads(threads):
                how = ad.write_query_model(self.backbone, proj, tmp / ad.QUERY_MODEL)
            n_old = len(old) if old is not None else 0
            # Index vectors: new images from their float32 features (what the query model computes, up to
            # the feature engine's rounding); stored images from their float16 features.
            vectors = proj.apply(new_feats)
            rebuild = (
                np.concatenate([proj.apply(feats[:n_old].astype(np.float32)), vectors]) if n_old else None
            )
        info = {
            **proj.describe(),
            "backbone_compiled": how,
            "features": ad.FEATURES_FILE,
            "projection": ad.PROJECTION_FILE,
            "query_model": ad.QUERY_MODEL,
        }
        return vectors, rebuild, file_fingerprint(tmp / ad.QUERY_MODEL), info
