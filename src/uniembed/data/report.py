"""``report.png`` + ``report.md``: how images and classes spread over sources and domains.

The numbers come straight from the manifest, so the picture, the table and the JSON always agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uniembed.data.shards import MANIFEST_NAME


def report_markdown(manifest: dict) -> str:
    """The manifest's distribution as Markdown tables (per source x domain, per domain, skipped by reason)."""
    lines = [
        "# Prepared dataset",
        "",
        f"- images: **{manifest['count']}**, labels: **{len(manifest['labels'])}**, "
        f"domains: **{len(manifest['domains'])}**, shards: {len(manifest['shards'])}",
        f"- content hash: `{manifest['hash']}`",
        f"- options: `{manifest['options']}`",
        "",
        "## Images and classes per source and domain",
        "",
        "| source | domain | images | classes |",
        "|---|---|---:|---:|",
    ]
    for row in manifest["per_source_domain"]:
        lines.append(f"| {row['source']} | {row['domain']} | {row['images']} | {row['classes']} |")
    lines.append(f"| **total** | | **{manifest['count']}** | **{len(manifest['labels'])}** |")
    lines += ["", "## Per domain", "", "| domain | images | classes |", "|---|---:|---:|"]
    for dom, v in manifest["domains"].items():
        lines.append(f"| {dom} | {v['images']} | {v['classes']} |")
    lines += [
        "",
        "## Per source",
        "",
        "| source | kind | listed | kept | labels | label offset | skipped | over cap | missing on disk |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in manifest["sources"]:
        lines.append(
            f"| {s['name']} | {s['kind']} | {s.get('n_listed', '')} | {s['n_images']} | {s['n_labels']} | "
            f"{s['label_offset']} | {s.get('n_skipped', '')} | {s.get('n_capped', '')} | "
            f"{s.get('n_missing', '')} |"
        )
    lines += ["", "## Skipped files by reason", ""]
    if manifest["skipped_counts"]:
        lines += ["| reason | files |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in manifest["skipped_counts"].items()]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def report_png(manifest: dict, path: Path) -> None:
    """Two horizontal bar charts (images, classes) with one bar per source/domain pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = manifest["per_source_domain"]
    names = [f"{r['source']} / {r['domain']}" for r in rows]
    height = max(2.5, 0.45 * len(rows) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(12, height), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    sources = list(dict.fromkeys(r["source"] for r in rows))
    bar_colors = [colors(sources.index(r["source"]) % 10) for r in rows]
    for ax, key, title in ((axes[0], "images", "Images"), (axes[1], "classes", "Classes")):
        values = [r[key] for r in rows]
        bars = ax.barh(range(len(rows)), values, color=bar_colors)
        ax.set_yticks(range(len(rows)), names if key == "images" else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_title(f"{title} per source / domain (total {sum(values)})")
        ax.bar_label(bars, labels=[str(v) for v in values], padding=3, fontsize=8)
        ax.margins(x=0.15)
    skipped = manifest["skipped_counts"]
    note = "skipped: " + (", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "none")
    fig.suptitle(
        f"{manifest['count']} images, {len(manifest['labels'])} labels, "
        f"{len(manifest['domains'])} domains; {note}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(manifest: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    md = out_dir / "report.md"
    md.write_text(report_markdown(manifest))
    png = out_dir / "report.png"
    report_png(manifest, png)
    return png, md


def print_summary(manifest: dict, out_dir: Path, console: Any) -> None:
    """A short table: images, labels, domains, skipped by reason, and where the files are."""
    from rich.table import Table

    table = Table(title=f"Prepared dataset {out_dir}", show_lines=False)
    for col in ("source", "domain", "images", "classes"):
        table.add_column(col, justify="right" if col in ("images", "classes") else "left")
    for row in manifest["per_source_domain"]:
        table.add_row(row["source"], row["domain"], str(row["images"]), str(row["classes"]))
    table.add_row(
        "[bold]total",
        f"{len(manifest['domains'])} domains",
        f"[bold]{manifest['count']}",
        f"[bold]{len(manifest['labels'])}",
    )
    console.print(table)
    if manifest["skipped_counts"]:
        parts = ", ".join(f"{k}: {v}" for k, v in manifest["skipped_counts"].items())
        console.print(f"Skipped {len(manifest['skipped'])} files ({parts}); see 'skipped' in the manifest.")
    else:
        console.print("Skipped 0 files.")
    console.print(
        f"{len(manifest['shards'])} shard(s), manifest {out_dir / MANIFEST_NAME}, "
        f"report {out_dir / 'report.png'} + report.md, content hash {manifest['hash'][:12]}"
        + (f", built in {manifest['build_seconds']} s" if "build_seconds" in manifest else "")
    )
