"""Evaluation outputs: ``metrics.json``, ``report.md``, ``per_domain.png`` (grouped bars) and ``grid.png``
(queries with their top-5, right answers framed green, wrong ones red)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.fsutil import atomic_path, atomic_write_text

METRIC_KEYS = ("mP@5", "recall@1", "recall@5", "mAP@100")


def write_metrics_json(out: Path, result: dict) -> Path:
    path = out / "metrics.json"
    atomic_write_text(path, json.dumps(result, indent=2, default=float))
    return path


def _f(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.4f}"
    return str(v)


def write_report_md(out: Path, result: dict) -> Path:
    """Human-readable summary: overall table, per-domain tables, counts, figures."""
    methods = result["methods"]
    lines = [f"# Retrieval evaluation: {result['source_name']}", ""]
    lines += [
        f"- Source: `{result['source']}` ({result['source_kind']})",
        f"- Data: `{result['data']}`",
        f"- Split: {result['split']} ({result['split_note']})",
        f"- Domains: {', '.join(result['domains'])}",
        f"- Images: {result['n_images']} ({result['n_labels']} labels); skipped: "
        + (", ".join(f"{k}: {v}" for k, v in result["skipped"].items()) or "none"),
        f"- Protocol: {result['protocol']}",
        "",
        "## Overall",
        "",
        "| method | " + " | ".join(METRIC_KEYS) + " | queries | skipped (no other image of the label) |",
        "|---|" + "---|" * (len(METRIC_KEYS) + 2),
    ]
    for name, m in methods.items():
        o = m["overall"]
        lines.append(
            f"| {name} | " + " | ".join(_f(o[k]) for k in METRIC_KEYS) + f" | {o['queries']} | "
            f"{o['skipped_no_match']} |"
        )
    doms = result["domains"]
    for key in METRIC_KEYS:
        lines += [
            "",
            f"## {key} per query domain",
            "",
            "| method | " + " | ".join(doms) + " |",
            "|---|" + "---|" * len(doms),
        ]
        for name, m in methods.items():
            lines.append(
                f"| {name} | "
                + " | ".join(_f(m["per_domain"].get(d, {}).get(key, float("nan"))) for d in doms)
                + " |"
            )
    lines += ["", "| domain | queries | skipped |", "|---|---|---|"]
    first = next(iter(methods.values()))
    for d in doms:
        pd = first["per_domain"].get(d, {})
        lines.append(f"| {d} | {pd.get('queries', 0)} | {pd.get('skipped_no_match', 0)} |")
    notes = [f"- {name}: {m['notes']}" for name, m in methods.items() if m.get("notes")]
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += ["", "## Figures", "", "![per domain](per_domain.png)", ""]
    if result.get("grid"):
        g = result["grid"]
        lines += [
            "![retrieval grid](grid.png)",
            "",
            f"Retrieval grid ({g['method']}): {g['queries']} queries, top-5 each; green = same label, "
            f"red = different label; thumbnails missing: {g['missing_thumbnails']}.",
            "",
        ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """Write a figure atomically (a report reader never sees half a PNG) and free it."""
    plt = _plt()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


def plot_per_domain(out: Path, result: dict, keys: tuple[str, ...] = ("mP@5", "recall@1")) -> Path:
    """Grouped bars: one group per domain (+ ALL), one bar per method; a panel per metric."""
    plt = _plt()
    methods = list(result["methods"])
    groups = ["ALL", *result["domains"]]
    fig, axes = plt.subplots(
        1,
        len(keys),
        figsize=(max(6.0, 1.2 * len(groups) * max(1, len(methods)) / 1.5) * len(keys) / 1.3, 4.2),
        squeeze=False,
    )
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(groups))
    for ax, key in zip(axes[0], keys, strict=True):
        for j, name in enumerate(methods):
            m = result["methods"][name]
            vals = [m["overall"][key]] + [
                m["per_domain"].get(d, {}).get(key, float("nan")) for d in result["domains"]
            ]
            vals = [0.0 if v != v else v for v in vals]
            bars = ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, label=name)
            for b, v in zip(bars, vals, strict=True):
                ax.text(
                    b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7
                )
        ax.set_xticks(x)
        ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel(key)
        ax.set_title(f"{key} per query domain")
        ax.grid(axis="y", alpha=0.3)
        if len(methods) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(
        f"{result['source_name']} — split {result['split']}, {result['n_images']} images", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save_figure(fig, out / "per_domain.png", dpi=110)


def plot_grid(
    out: Path,
    queries: list[int],
    neighbors: np.ndarray,
    labels: np.ndarray,
    thumbs: dict[int, Any],
    title: str,
    label_text: Callable[[int], str],
) -> Path:
    """One row per query: the query, then its top-5 neighbours framed green (same label) or red."""
    plt = _plt()
    k = neighbors.shape[1]
    rows = max(1, len(queries))
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.9 * (k + 1), 2.05 * rows), squeeze=False)
    for r, q in enumerate(queries):
        cells = [q, *neighbors[q].tolist()]
        for c, idx in enumerate(cells):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if idx < 0:
                ax.axis("off")
                continue
            im = thumbs.get(idx)
            if im is not None:
                ax.imshow(im)
            else:
                ax.set_facecolor("#dddddd")
                ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            if c == 0:
                color, lw = "black", 2
                ax.set_title("query: " + label_text(idx), fontsize=7, fontweight="bold")
            else:
                ok = labels[idx] == labels[q]
                color, lw = ("#1a9850" if ok else "#d73027"), 4
                ax.set_title(f"{c}. " + label_text(idx), fontsize=7, color=color)
            for s in ax.spines.values():
                s.set_edgecolor(color)
                s.set_linewidth(lw)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / rows))
    return _save_figure(fig, out / "grid.png", dpi=90)


def load_thumbnails(
    rows: list[int], paths: list[str], keys: list[str], dataset_dir: str | None, size: int = 128
) -> tuple[dict[int, Any], int]:
    """Thumbnails (numpy RGB) for ``rows``: from the original image path if it is readable, else from the
    prepared dataset's shards by key. Returns (thumbs, number missing)."""
    from uniembed.data.images import BadImageError, load_image

    def thumb(src: str | bytes) -> np.ndarray | None:
        try:
            im = load_image(src)
        except BadImageError:
            return None
        im.thumbnail((size, size))
        return np.asarray(im)

    thumbs: dict[int, Any] = {}
    for r in rows:
        p = paths[r] if r < len(paths) else ""
        if p and Path(p).is_file() and (t := thumb(p)) is not None:
            thumbs[r] = t
    need = {keys[r]: r for r in rows if r not in thumbs and r < len(keys) and keys[r]}
    if need and dataset_dir and (Path(dataset_dir) / "manifest.json").exists():
        from uniembed.data.shards import iter_samples

        try:
            for s in iter_samples(dataset_dir):
                r = need.pop(s.key, None)
                if r is not None and (t := thumb(s.image_bytes)) is not None:
                    thumbs[r] = t
                if not need:
                    break
        except Exception:  # a damaged dataset only costs thumbnails here, never the evaluation
            pass
    return thumbs, len([r for r in set(rows) if r not in thumbs])


def bar_floor(values: list[float], top_floor: float = 0.6) -> float:
    """Lower y limit for mP@5 bars: ``top_floor`` (zoomed on the range that matters) unless a bar is lower,
    then 0.05 under that bar's tenth, so no bar disappears below the axis."""
    lowest = min((v for v in values if v), default=top_floor)
    return float(min(top_floor, np.floor(lowest * 10) / 10 - 0.05))


def plot_universality(
    path: Path,
    unseen: dict,
    lodo: dict,
    labels: dict[str, str] | None = None,
    new_photos: dict | None = None,
) -> Path:
    """Panels of grouped bars from a ``uniembed model`` report: mP@5 on each left-out domain (+ the mean over
    rotations; the primary figure, first and widest), on unseen labels of the training domains and, when
    given, on new photos of the training labels; one bar per method."""
    plt = _plt()
    labels = labels or {}
    by_method: dict[str, dict[str, float]] = {}
    for dom, vals in lodo.items():
        for m, v in vals.items():
            by_method.setdefault(m, {})[dom] = v
    for v in by_method.values():
        v["mean"] = float(np.mean(list(v.values())))
    panels = [
        ("left-out domain, merged index (trained on the others)", by_method),
        ("unseen labels of the training domains", unseen),
    ]
    if new_photos:
        panels.append(("new photos of the training labels", new_photos))
    methods = list(dict.fromkeys([*by_method, *unseen, *(new_photos or {})]))
    widths = [max(3, len({g for v in rows.values() for g in v})) for _, rows in panels]
    side_by_side = max(widths) <= 5
    if side_by_side:  # few domains: panels side by side, each as wide as its groups
        fig, grid = plt.subplots(
            1,
            len(panels),
            figsize=(1.6 * sum(widths) + 1.5, 5.0),
            squeeze=False,
            gridspec_kw={"width_ratios": widths},
        )
        axes = grid
    else:  # many domains: one panel a row, so the picture stays readable
        fig, grid = plt.subplots(
            len(panels), 1, figsize=(1.3 * max(widths) + 2.0, 3.8 * len(panels)), squeeze=False
        )
        axes = grid.T
    floor = bar_floor([v for _, rows in panels for per in rows.values() for v in per.values()])
    width = 0.8 / max(1, len(methods))
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        groups = sorted({g for v in rows.values() for g in v}, key=lambda g: (g in ("all", "mean"), g))
        x = np.arange(len(groups))
        for j, m in enumerate(methods):
            vals = [rows.get(m, {}).get(g, 0.0) for g in groups]
            bars = ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, label=labels.get(m, m))
            for b, v in zip(bars, vals, strict=True):
                if v:
                    ax.text(b.get_x() + b.get_width() / 2, v + 0.005, f"{v:.2f}", ha="center", fontsize=6)
        ax.set_xticks(x)
        ax.set_xticklabels(groups, rotation=15, ha="right", fontsize=8)
        ax.set_ylim(floor, 1.02)
        ax.set_ylabel("mP@5")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    ncol = min(len(names), 5 if side_by_side else 2)
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if side_by_side else 0.05, 1, 1))
    return _save_figure(fig, path, dpi=110)
