"""The feature cache's identity: where a feature set lives, when a finished one can be reused, what an
extraction did (its stats) and what ``info.json`` records about it.

Shared by both extraction paths (prepared shards in ``extract.py``, image files in ``files.py``), so a
cache hit and a fresh run describe themselves the same way.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniembed.features.pixels import PIPELINE_VERSION
from uniembed.features.store import FeatureCacheError, is_complete, load_feature_set
from uniembed.models.registry import Backbone, create_backbone

log = logging.getLogger(__name__)


@dataclass
class ExtractStats:
    """What one extraction call did (also stored in ``info.json``)."""

    images: int = 0
    seconds: float = 0.0
    reused_shards: int = 0
    skipped: list[dict] = field(default_factory=list)
    engine: str = ""
    cached: bool = False

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ExtractResult:
    """An extraction's feature directory and what the call did to produce it."""

    path: Path
    stats: ExtractStats


def as_backbone(backbone: str | Backbone, *, pretrained: bool = True, pooling: str = "avg") -> Backbone:
    """A ready ``Backbone`` as given, or a registry name built with ``pretrained``/``pooling``."""
    if isinstance(backbone, Backbone):
        return backbone
    return create_backbone(backbone, pretrained=pretrained, pooling=pooling)


def backbone_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def feature_dir_for(out_root: str | Path, backbone: Backbone, manifest_hash: str) -> Path:
    """``<out_root>/<backbone-slug>-<fingerprint>-<manifest hash[:12]>`` (docs/design.md)."""
    return Path(out_root) / f"{backbone_slug(backbone.name)}-{backbone.fingerprint()}-{manifest_hash[:12]}"


def cached_result(out: Path, fp: str, mhash: str, draft: bool, t_start: float) -> ExtractResult | None:
    """The finished result in ``out`` when it holds this feature function (``fp``, ``draft``) on this data
    (``mhash``); None when it must be computed, also when its files are damaged (checksums, shapes, rows:
    ``load_feature_set``), so a rerun of extract repairs a damaged cache."""
    if not is_complete(out):
        return None
    try:
        info = load_feature_set(out).info
    except FeatureCacheError as e:
        log.warning("%s; computing the features again", str(e).split("; ")[0])
        return None
    if (info.get("fingerprint"), info.get("manifest_hash"), info.get("draft")) != (fp, mhash, draft):
        return None
    stats = ExtractStats(
        images=int(info.get("count", 0)),
        seconds=time.perf_counter() - t_start,
        engine=str(info.get("engine", "")),
        cached=True,
        skipped=list(info.get("skipped", [])),
    )
    return ExtractResult(out, stats)


def feature_info(
    bb: Backbone, mhash: str, dataset_dir: str | None, stats: ExtractStats, draft: bool, **extra: Any
) -> dict:
    """info.json of a feature dir: what computed the features, on which data, how fast, what was skipped."""
    return {
        "backbone": bb.name,
        "fingerprint": bb.fingerprint(),
        "weights": bb.weights,
        "weights_hash": bb.weights_hash,
        "preprocess": bb.preprocess.to_dict(),
        "pooling": bb.pooling,
        "manifest_hash": mhash,
        "dataset_dir": dataset_dir,
        "engine": stats.engine,
        "pipeline_version": PIPELINE_VERSION,
        "draft": draft,
        "images_per_s": round(stats.images_per_s, 2),
        **extra,
        "skipped": stats.skipped,
        "skipped_counts": count_reasons(stats.skipped),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def count_reasons(skipped: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return counts
