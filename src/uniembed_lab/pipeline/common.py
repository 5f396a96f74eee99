"""What the demo and the model job share: the stage timer, the method names in tables, the mP@5 table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

METHOD_LABELS = {
    "raw": "raw backbone features (the head's input)",
    "pca64": "PCA-64 of those",
    "head": "trained 64-d head",
    "raw_cnn": "raw CNN features (no colour block)",
    "pca64_cnn": "PCA-64 of the CNN features",
}


def baselines_for(pooling: str) -> list[str]:
    """Baselines scored beside the head: raw and PCA-64 of its input features and, for a ``+colour``
    pooling, of the CNN features alone (the backbone's own raw features: the yardstick a colour block must
    beat)."""
    from uniembed.models.colour import split_colour

    return ["raw", "pca64"] + (["raw_cnn", "pca64_cnn"] if split_colour(pooling)[1] else [])


def method_label(m: str) -> str:
    """What a method row of a report is, in words (leave-one-domain-out names first)."""
    from uniembed.eval.lodo import LODO_METHOD_LABELS, adapted_label

    if m.startswith("adapted_"):
        return adapted_label(m.removeprefix("adapted_"))
    return LODO_METHOD_LABELS.get(m) or METHOD_LABELS.get(m, m)


@dataclass
class StepTimer:
    """Records how long each stage took, for the closing summary."""

    console: Console
    times: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - t0
        self.console.print(f"[dim]{name}: {self.times[name]:.1f} s[/dim]")
        return out


def mp5_table(
    title: str, metrics: dict, console: Console, labels: dict[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """Print mP@5 per domain for every method in an evaluate() result; return {method: {domain: mP@5}}."""
    labels = {**METHOD_LABELS, **(labels or {})}
    methods = metrics.get("methods", {})
    domains: list[str] = sorted({d for m in methods.values() for d in m.get("per_domain", {})})
    wide = len(domains) > 4  # short names and headers, so seven domains fit an 80-column terminal
    table = Table(title=title)
    table.add_column("method", no_wrap=wide)
    for d in domains:
        table.add_column(d[:8] if wide else d, justify="right")
    table.add_column("all", justify="right")
    out: dict[str, dict[str, float]] = {}
    for name, m in methods.items():
        per = {d: m["per_domain"][d]["mP@5"] for d in domains if d in m.get("per_domain", {})}
        per["all"] = m["overall"]["mP@5"]
        out[name] = per
        table.add_row(
            name if wide else labels.get(name, name),
            *[f"{per[d]:.3f}" if d in per else "-" for d in domains],
            f"{per['all']:.3f}",
        )
    console.print(table)
    if wide:
        for name in methods:
            console.print(f"  [bold]{name}[/bold]: {labels.get(name, name)}", highlight=False)
    return out
