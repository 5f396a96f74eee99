"""What a run reports: ``metrics.jsonl``, ``curve.png``, ``summary.json``, ``split.json``, console lines.

Every file is rewritten whole and atomically (a reader sees the previous version or the new one), so they can
be watched while the run is going.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.fsutil import atomic_path, atomic_write_text
from uniembed.train.data import TrainData

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SPLIT_FILE = "split.json"
CURVE_FILE = "curve.png"


def step_progress(what: str, console: Any, enabled: bool) -> Any:
    """The per-step bar of head training and fine-tuning: '<what> <epoch>', steps done, running loss."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{what} {{task.fields[ep]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )


def write_split(run: Path, data: TrainData) -> None:
    """The label split itself, so evaluation can use the held-out labels without recomputing it."""
    split = {
        "train_labels": data.split.train_labels,
        "val_labels": data.split.val_labels,
        "label_domain": data.split.label_domain,
        "per_domain": data.split.summary(),
        "heldout_photos": [data.paths[i] for i in data.photo_idx.tolist()],
    }
    atomic_write_text(run / SPLIT_FILE, json.dumps(split, indent=1))


def write_metrics(run: Path, base: dict, history: list[dict], meta: dict) -> None:
    """One JSON line per record: the run setup, each baseline, each epoch."""
    lines = [json.dumps({"kind": "baseline", "name": k, **v}) for k, v in sorted(base.items())]
    lines = [json.dumps({"kind": "setup", **meta})] + lines
    lines += [json.dumps({"kind": "epoch", **h}) for h in history]
    atomic_write_text(run / METRICS_FILE, "\n".join(lines) + "\n")


def _plot_val(ax: Any, history: list[dict], base: dict[str, dict], colors: list[str]) -> None:
    vals = [h for h in history if h.get("val")]
    if vals:
        x = [h["epoch"] for h in vals]
        ax.plot(x, [h["val"]["mP@5"] for h in vals], "o-", color="black", label="head (all)")
        doms = sorted(vals[-1]["val"]["per_domain"])
        for i, d in enumerate(doms):
            ax.plot(
                x,
                [h["val"]["per_domain"].get(d, float("nan")) for h in vals],
                "-",
                lw=1,
                color=colors[i % len(colors)],
                label=f"head: {d}",
            )
    for j, (name, b) in enumerate(sorted(base.items())):
        ax.axhline(
            b["mP@5"], ls="--", color=("dimgray", "darkgoldenrod", "purple")[j % 3], label=f"{name} (all)"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mP@5 (unseen labels)")
    ax.set_title("validation mP@5")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:  # every label trained (split.val_fraction 0): nothing held out to validate on
        ax.text(0.5, 0.5, "no held-out labels", ha="center", va="center", transform=ax.transAxes)


def plot_curve(history: list[dict], base: dict[str, dict], path: Path) -> None:
    """Loss and val mP@5 per epoch; baselines as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history if h.get("loss") is not None]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if ep:
        a1.plot(ep, [h["loss"] for h in history if h.get("loss") is not None], "o-", label="train loss")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.set_title("training loss")
    a1.grid(alpha=0.3)
    a1.legend()
    _plot_val(a2, history, base, plt.rcParams["axes.prop_cycle"].by_key()["color"])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def epoch_line(rec: dict, epochs: int, train_s: float) -> str:
    """The console line of one epoch: loss, time, val mP@5 overall and per domain when validated."""
    v = rec.get("val", {})
    val = (
        f"  val mP@5 {v['mP@5']:.4f} (" + ", ".join(f"{d} {x:.3f}" for d, x in v["per_domain"].items()) + ")"
        if v
        else ""
    )
    return f"epoch {rec['epoch']}/{epochs}  loss {rec['loss']:.4f}  train {train_s:.2f}s" + val


def final_val(history: list[dict], best: dict | None, select_best: bool) -> dict | None:
    """The validation of the epoch that became head.pt (the last validated one unless ``select: best``)."""
    if select_best and best is not None:
        return next(h["val"] for h in history if h["epoch"] == best["epoch"] and h.get("val"))
    return next((h["val"] for h in reversed(history) if h.get("val")), None)


def write_summary(
    run: Path, history: list[dict], base: dict, meta: dict, final: dict | None, best: dict | None
) -> None:
    epochs_s = [h["train_s"] for h in history if "train_s" in h]
    summary = {
        "run_dir": str(run),
        "epochs_done": history[-1]["epoch"] if history else 0,
        "seconds_per_epoch": float(np.mean(epochs_s)) if epochs_s else None,
        "val": final,
        "baselines": base,
        "best_epoch": best["epoch"] if best else None,
        **meta,
    }
    atomic_write_text(run / SUMMARY_FILE, json.dumps(summary, indent=2))


def add_to_summary(run: Path, key: str, value: Any) -> None:
    """Set ``key`` in an existing summary.json (a later stage's record); no-op without one."""
    path = run / SUMMARY_FILE
    if path.exists():
        s = json.loads(path.read_text())
        s[key] = value
        atomic_write_text(path, json.dumps(s, indent=2))


def _pick(r: dict, d: str) -> float:
    return r["mP@5"] if d == "ALL" else r["per_domain"].get(d, float("nan"))


def summary_table(base: dict, final: dict | None, console: Any) -> None:
    """Val mP@5 per domain of the final head next to the baselines."""
    from rich.table import Table

    if not final:
        return
    t = Table(title="val mP@5 on unseen labels (leave-one-out)")
    t.add_column("domain")
    t.add_column("head", justify="right")
    for name in sorted(base):
        t.add_column(name, justify="right")
    doms = sorted(final["per_domain"])
    for d in ["ALL", *doms]:
        t.add_row(d, *[f"{_pick(r, d):.4f}" for r in (final, *(base[n] for n in sorted(base)))])
    console.print(t)
