"""The model job's report: the console summary of leave-one-domain-out, universality.png and report.md."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from uniembed_lab.pipeline.common import method_label

PHOTO_FRACTION = 0.2  # share of each training label's photos held out for the "new photos" figure


def lodo_summary(lodo: dict[str, dict[str, float]], console: Console) -> None:
    """Mean over the left-out domains first (the figure that picks the recipe), then each domain."""
    from uniembed.eval.lodo import lodo_means

    means = lodo_means(lodo)
    methods = sorted(means, key=lambda m: -means[m])
    table = Table(title="leave-one-domain-out, merged index: mP@5 of each left-out domain's queries")
    table.add_column("method", no_wrap=True)
    table.add_column("MEAN", justify="right", style="bold")
    for d in lodo:  # short headers: the table must fit an 80-column terminal
        table.add_column(d[:8], justify="right")
    for m in methods:
        table.add_row(m, f"{means[m]:.3f}", *[f"{lodo[d].get(m, float('nan')):.3f}" for d in lodo])
    console.print(table)
    for m in methods:
        console.print(f"  [bold]{m}[/bold]: {method_label(m)}", highlight=False)


def plot_report(report: dict, path: Path) -> None:
    """universality.png: mP@5 per domain and method, unseen labels beside the left-out domains."""
    from uniembed.eval.report import plot_universality

    plot_universality(
        path,
        report["unseen_labels"],
        report["leave_one_domain_out"],
        {m: method_label(m) for v in report["leave_one_domain_out"].values() for m in v}
        | {m: method_label(m) for m in report["unseen_labels"]},
        new_photos=report.get("new_photos"),
    )


def _md_table(
    lines: list[str], title: str, rows: dict[str, dict[str, float]], first: str | None = None
) -> None:
    """A markdown table of {method: {column: mP@5}}, ``first`` as the leading column."""
    cols = sorted({c for v in rows.values() for c in v} - {first})
    cols = ([first] if first else []) + cols
    lines.append(f"\n## {title}\n\n| method | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for m, v in rows.items():
        lines.append(
            f"| {method_label(m)} | " + " | ".join(f"{v.get(c, float('nan')):.3f}" for c in cols) + " |"
        )


def _lodo_md(report: dict, lines: list[str]) -> None:
    """The primary section: the mean over left-out domains, then each domain, best method first."""
    by_method: dict[str, dict[str, float]] = {}
    for dom, vals in report["leave_one_domain_out"].items():
        for m, v in vals.items():
            by_method.setdefault(m, {})[dom] = v
    for m, v in by_method.items():
        v["MEAN"] = report["lodo_mean"][m]
    by_method = dict(sorted(by_method.items(), key=lambda kv: -kv[1]["MEAN"]))
    head = report["lodo_mean"].get("head")
    raw = report["lodo_mean"].get("raw")
    lines.append(
        "\n## Leave-one-domain-out, merged index (the figure that picks the recipe)\n\n"
        f"**Mean over the {len(by_method['raw']) - 1} left-out domains: trained 64-d head {head:.3f}, "
        f"raw full-width backbone features {raw:.3f} (ratio {head / raw:.3f}).**\n\n"
        "Each domain in turn is left out of training; the head trained on the others embeds every image, "
        "and the left-out domain's images query the merged index of all domains (the rest are "
        "distractors)."
    )
    _md_table(lines, "mP@5 of each left-out domain's queries", by_method, first="MEAN")


def write_report_md(report: dict, path: Path) -> None:
    """report.md: the same figures as report.json, primary protocol first, for people."""
    lines = [
        f"# uniembed model report\n\nData: {report['data']}  \nConfig: `{report['config']}`  \n"
        f"Backbone: `{report['backbone']}`, pooling `{report.get('pooling', '')}`\n"
    ]
    if "leave_one_domain_out" in report:
        _lodo_md(report, lines)
    if "unseen_labels" in report:
        _md_table(
            lines,
            "Secondary: mP@5 on unseen labels of the training domains (half of each domain's labels "
            "held out; scored within the domain)",
            report["unseen_labels"],
        )
    if "new_photos" in report:
        _md_table(
            lines,
            f"Secondary: mP@5 on new photos of the training labels ({PHOTO_FRACTION:.0%} of each label's "
            "photos held out of a training run, scored among themselves)",
            report["new_photos"],
        )
    lines.append("\n## Which run is which\n")
    lines += [f"- {k}: {v}" for k, v in report.get("runs", {}).items()]
    if "leave_one_domain_out" in report:
        from uniembed_lab.universality import universality_checks

        lines.append("\n## Universality checks (`scripts/check_universality.py <this dir>`)\n")
        lines.append("![mP@5 per domain and method](universality.png)\n")
        lines += [
            f"- {'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in universality_checks(report)
        ]
    lines.append("\n## Time per stage (s)\n")
    lines += [f"- {k}: {v:.1f}" for k, v in report["seconds"].items()]
    path.write_text("\n".join(lines) + "\n")
