"""The universality acceptance, checked on a ``uniembed model`` report (``artifacts/model/report.json``).

On the leave-one-domain-out protocol with a merged index (eval/lodo.py), against the *backbone's own*
features (for a ``+colour`` pooling the CNN columns alone, ``raw_cnn`` / ``pca64_cnn``; otherwise ``raw`` /
``pca64``):

1. the 64-d head beats PCA-64 of the backbone features on every left-out domain;
2. its mean over the left-out domains is at least ``RAW_RATIO_TARGET`` (0.95) of the raw full-width
   features' mean -- the ratio is the figure reported; the target is the aim;

and, as a secondary column, the unseen-label mP@5 >= 0.95 on every training domain (the first universality
issue's bar, which no frozen offline backbone has met; docs/experiments.md).

Kept as a function over the report (not inside ``build_model``) so the same verdict can be printed for any
model directory, and tested on a synthetic report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

UNSEEN_LABEL_TARGET = 0.95
RAW_RATIO_TARGET = 0.95


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def _backbone_methods(methods: set[str]) -> tuple[str, str]:
    """(raw, pca) method names that stand for the backbone's own features in a report."""
    if {"raw_cnn", "pca64_cnn"} <= methods:
        return "raw_cnn", "pca64_cnn"
    return "raw", "pca64"


def universality_checks(
    report: dict, target: float = UNSEEN_LABEL_TARGET, ratio_target: float = RAW_RATIO_TARGET
) -> list[Check]:
    """The acceptance checks on a ``build_model`` report dict (see the module docstring)."""
    lodo: dict[str, dict[str, float]] = report.get("leave_one_domain_out") or {}
    unseen: dict[str, dict[str, float]] = report.get("unseen_labels") or {}
    if not lodo or not unseen:
        raise ValueError("report has no leave_one_domain_out / unseen_labels results (run with --lodo)")
    methods = {m for v in lodo.values() for m in v}
    raw, pca = _backbone_methods(methods)
    for m in ("head", raw, pca):
        if m not in methods:
            raise ValueError(f"report lacks method {m!r} in leave_one_domain_out")
    domains = sorted(lodo)
    checks: list[Check] = []

    margins = {d: lodo[d]["head"] - lodo[d][pca] for d in domains}
    checks.append(
        Check(
            f"head > {pca} on every left-out domain",
            all(v > 0 for v in margins.values()),
            ", ".join(f"{d} {lodo[d]['head']:.3f} vs {lodo[d][pca]:.3f}" for d in domains),
        )
    )
    head_mean = sum(lodo[d]["head"] for d in domains) / len(domains)
    raw_mean = sum(lodo[d][raw] for d in domains) / len(domains)
    ratio = head_mean / raw_mean if raw_mean > 0 else float("nan")
    checks.append(
        Check(
            f"head >= {ratio_target:.2f} x {raw} on the left-out mean",
            ratio >= ratio_target - 1e-9,
            f"{head_mean:.3f} vs {raw_mean:.3f}: ratio {ratio:.3f} (mean of {len(domains)} left-out domains)",
        )
    )
    head_unseen = {d: v for d, v in unseen.get("head", {}).items() if d != "all"}
    if not head_unseen:
        raise ValueError("report lacks the head's unseen-label scores")
    checks.append(
        Check(
            f"unseen-label mP@5 >= {target:.2f} on every training domain",
            all(v >= target for v in head_unseen.values()),
            ", ".join(f"{d} {v:.3f}" for d, v in sorted(head_unseen.items())),
        )
    )
    return checks


def check_model_dir(model_dir: str | Path) -> list[Check]:
    path = Path(model_dir) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `uniembed model` (make model) first")
    return universality_checks(json.loads(path.read_text()))
