"""The measures of ``uniembed bench``: each one's sides, how its ratio is read, and its goal.

``ratio`` is always how many times better the project is: throughput project/baseline, or for times
(head_epoch) baseline/project.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from uniembed_lab.bench.common import BenchConfig


@dataclass
class Measure:
    """A measure: its sides (run in order, each in a process), how to turn them into a ratio, its goal."""

    name: str
    sides: list[tuple[str, str]]  # (side, "module:function")
    what: str
    higher_is_better: bool = True
    goal: str = ""
    goal_check: Callable[[dict], bool] | None = None
    extra_check: Callable[[BenchConfig, dict], dict] | None = None
    ratio: bool = True
    timeout_s: dict = field(default_factory=lambda: {"quick": 300, "full": 1500})


def _extract_goal(r: dict) -> bool:
    return r["ratio"] >= 5.0 and r["project"]["figure"] >= 120.0


def _ray_check(cfg: BenchConfig, r: dict) -> dict:
    from uniembed_lab.bench.ray_extract import same_features

    return same_features(cfg, r)


def _ray_goal(r: dict) -> bool:
    return bool(r["checks"]["features_identical"])


def _sharded_check(cfg: BenchConfig, r: dict) -> dict:
    from uniembed_lab.bench.sharded import sharded_check

    return sharded_check(cfg, r)


def _sharded_goal(r: dict) -> bool:
    from uniembed_lab.bench.sharded import sharded_goal

    return sharded_goal(r)


def _head_goal(r: dict) -> bool:
    return r["ratio"] >= 100.0


def _exact_check(cfg: BenchConfig, r: dict) -> dict:
    from uniembed_lab.bench.search import compare_topk

    return {"top_k_agreement": compare_topk(cfg.work_dir)}


def _exact_goal(r: dict) -> bool:
    return bool(r["checks"]["top_k_agreement"]["same_top_k"])


def _ann_check(cfg: BenchConfig, r: dict) -> dict:
    d = r["project"]["details"]
    return {f"recall_at_{cfg.k}": d[f"recall_at_{cfg.k}"], "nprobe": d["nprobe"], "goal": cfg.recall_goal}


def _ann_goal(r: dict) -> bool:
    c = r["checks"]
    rec = next(v for k, v in c.items() if k.startswith("recall_at_"))
    return rec >= c["goal"]


M = "uniembed_lab.bench"
MEASURES: dict[str, Measure] = {
    m.name: m
    for m in [
        Measure(
            "extract",
            [("baseline", f"{M}.extract:extract_baseline"), ("project", f"{M}.extract:extract_project")],
            "images/s from image files to MobileNetV2 features: prepare+extract vs torch eager loop",
            goal="ratio >= 5 and project >= 120 images/s",
            goal_check=_extract_goal,
        ),
        Measure(
            "extract_profile",
            [("profile", f"{M}.profile:extract_profile")],
            "where extraction time goes, stage by stage (ms/image)",
            ratio=False,
        ),
        Measure(
            "extract_ray",
            [
                ("baseline", f"{M}.ray_extract:extract_ray_baseline"),
                ("project", f"{M}.ray_extract:extract_ray_project"),
            ],
            "images/s from image files to features: Ray Data, 2 workers on a local cluster vs one process "
            "(same cores: the overhead)",
            goal="features identical to the single-process cache",
            goal_check=_ray_goal,
            extra_check=_ray_check,
        ),
        Measure(
            "head_epoch",
            [("project", f"{M}.head:head_epoch_project"), ("baseline", f"{M}.head:head_epoch_baseline")],
            "seconds per head epoch: cached features vs re-running the frozen backbone",
            higher_is_better=False,
            goal="ratio >= 100",
            goal_check=_head_goal,
        ),
        Measure(
            "search_exact",
            [
                ("baseline", f"{M}.search:search_exact_baseline"),
                ("project", f"{M}.search:search_exact_project"),
            ],
            "queries/s, exact top-5: FAISS IndexFlatL2 vs numpy brute force",
            goal="same top-5 as numpy",
            goal_check=_exact_goal,
            extra_check=_exact_check,
        ),
        Measure(
            "search_ann",
            [("baseline", f"{M}.search:search_ann_baseline"), ("project", f"{M}.search:search_ann_project")],
            "queries/s: IVF index vs exact search over the same vectors",
            goal="recall@5 >= 0.95",
            goal_check=_ann_goal,
            extra_check=_ann_check,
        ),
        Measure(
            "sharded_index",
            [("baseline", f"{M}.sharded:sharded_baseline"), ("project", f"{M}.sharded:sharded_project")],
            "queries/s: merged sharded IVF-PQ (memory-mapped) vs flat index; build time, recall@5 and "
            "serving RAM in the SHARDED line",
            goal="recall@5 >= 0.8 and less serving RAM than flat",
            goal_check=_sharded_goal,
            extra_check=_sharded_check,
            timeout_s={"quick": 600, "full": 1800},
        ),
        Measure(
            "dedup",
            [("project", f"{M}.dedup:dedup_project")],
            "vectors/s grouped into near-duplicate groups (FAISS range search + components), 100k 64-d",
            ratio=False,
        ),
    ]
}


class BenchError(RuntimeError):
    """Bad ``uniembed bench`` arguments."""


def resolve_names(only: list[str] | None) -> list[str]:
    """``--only`` values (repeatable, comma-separated allowed) -> measure names in run order."""
    if not only:
        return list(MEASURES)
    want = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in want if n not in MEASURES]
    if unknown:
        raise BenchError(f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    return [n for n in MEASURES if n in want]
