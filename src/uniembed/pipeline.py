"""The end-to-end jobs behind `uniembed demo` and `uniembed model` (`make demo`, `make model`).

Both chain the stage functions (prepare -> extract -> train -> evaluate -> export -> index/search); each stage
stays a plain files-in/files-out function, so this module holds only the order and the reporting.
"""

from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from uniembed.data.sources import write_labels_csv
from uniembed.paths import repo_root

METHOD_LABELS = {
    "raw": "raw backbone features (the head's input)",
    "pca64": "PCA-64 of those",
    "head": "trained 64-d head",
    "raw_cnn": "raw CNN features (no colour block)",
    "pca64_cnn": "PCA-64 of the CNN features",
}


def baselines_for(pooling: str) -> list[str]:
    """Baselines scored beside the head: raw and PCA-64 of its input features and, for a ``+colour``
    pooling, of the CNN features alone (the backbone's own raw features, issue #6's yardstick)."""
    from uniembed.models.colour import split_colour

    return ["raw", "pca64"] + (["raw_cnn", "pca64_cnn"] if split_colour(pooling)[1] else [])


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


def config_path(name: str) -> Path:
    """A config shipped in the checkout's ``configs/`` folder."""
    p = repo_root() / "configs" / name
    if not p.exists():
        raise FileNotFoundError(f"config {p} not found (run from a checkout of uniembed)")
    return p


def subset_labels_csv(
    csvs: list[Path], out_csv: Path, labels_per_domain: int, images_per_label: int, seed: int = 0
) -> dict[str, int]:
    """Write a small, domain-balanced subset of labels.csv files (absolute paths) for a quick demo."""
    rng = random.Random(seed)
    by_domain: dict[str, dict[str, list[str]]] = {}
    for c in csvs:
        with open(c, newline="") as f:
            for r in csv.DictReader(f):
                p = Path(r["path"])
                path = p if p.is_absolute() else (c.parent / p)
                by_domain.setdefault(r["domain"], {}).setdefault(r["label"], []).append(str(path))
    rows: list[dict] = []
    counts: dict[str, int] = {}
    for dom in sorted(by_domain):
        labels = sorted(lab for lab, paths in by_domain[dom].items() if len(paths) >= 2)
        rng.shuffle(labels)
        for lab in sorted(labels[:labels_per_domain]):
            paths = sorted(by_domain[dom][lab])
            rng.shuffle(paths)
            for p in sorted(paths[:images_per_label]):
                rows.append({"path": p, "label": lab, "domain": dom})
        counts[dom] = min(len(labels), labels_per_domain)
    write_labels_csv(out_csv, rows)
    return counts


def mp5_table(title: str, metrics: dict, console: Console) -> dict[str, dict[str, float]]:
    """Print mP@5 per domain for every method in an evaluate() result; return {method: {domain: mP@5}}."""
    methods = metrics.get("methods", {})
    domains: list[str] = sorted({d for m in methods.values() for d in m.get("per_domain", {})})
    table = Table(title=title)
    table.add_column("method")
    for d in domains:
        table.add_column(d, justify="right")
    table.add_column("all", justify="right")
    out: dict[str, dict[str, float]] = {}
    for name, m in methods.items():
        per = {d: m["per_domain"][d]["mP@5"] for d in domains if d in m.get("per_domain", {})}
        per["all"] = m["overall"]["mP@5"]
        out[name] = per
        table.add_row(
            METHOD_LABELS.get(name, name),
            *[f"{per[d]:.3f}" if d in per else "-" for d in domains],
            f"{per['all']:.3f}",
        )
    console.print(table)
    return out


def run_demo(data: Path | None, out: Path, quick: bool = True, console: Console | None = None) -> dict:
    """prepare -> extract -> train -> evaluate -> export -> index -> search on a small real subset."""
    from uniembed.data.demo_data import resolve_demo_data
    from uniembed.data.prepare import prepare
    from uniembed.eval.evaluate import evaluate
    from uniembed.export.guie import export_guie
    from uniembed.features.extract import extract
    from uniembed.serve.index import build_index, search_paths
    from uniembed.train import TrainConfig, train

    console = console or Console()
    timer = StepTimer(console)
    out.mkdir(parents=True, exist_ok=True)
    csvs, description, kind = resolve_demo_data(data, console=console)
    console.print(f"[bold]data:[/bold] {description}")
    if kind == "smoke":
        console.print(
            "[yellow]NOTE: running on the built-in smoke set (views of scikit-image sample photos), "
            "not on a real retrieval dataset: the numbers below only show the pipeline works.[/yellow]"
        )
    subset = out / "subset_labels.csv"
    counts = subset_labels_csv(csvs, subset, labels_per_domain=12 if quick else 40, images_per_label=10)
    console.print(f"subset: {subset} (labels per domain: {counts})")
    ds = out / "data"
    timer.run("prepare", prepare, [str(subset)], ds, size=256, shard_size=200, console=console)
    feats = timer.run("extract", extract, ds, backbone="mobilenetv2", out_root=out / "features")
    cfg = TrainConfig.from_yaml(config_path("demo.yaml"))
    cfg.features = [str(feats)]
    cfg.out = str(out / "run")
    run = timer.run("train", train, cfg, overwrite=True)
    ev = timer.run(
        "evaluate", evaluate, run, out_dir=out / "eval", split="val", compare=["raw", "pca64"], progress=True
    )
    model_dir = out / "model"
    timer.run("export", export_guie, run, model_dir, onnx=True, parity_images=4)
    index_dir = out / "index"
    timer.run("index", build_index, model_dir / "saved_model.pt", str(subset), index_dir)
    query = _first_path(subset)
    hits = timer.run("search", search_paths, index_dir, [query], k=5)
    table = mp5_table(f"mP@5 on held-out labels ({description})", ev, console)
    console.print(f"search for {query}:")
    for h in hits[0]:
        console.print(f"  {h['distance']:.3f}  {h['label']}  {h['path']}")
    summary = {
        "data": description,
        "data_kind": kind,
        "mP@5": table,
        "seconds": timer.times,
        "outputs": {
            "dataset": str(ds),
            "features": str(feats),
            "run": str(run),
            "evaluation": str(out / "eval"),
            "model": str(model_dir / "saved_model.pt"),
            "index": str(index_dir),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold green]demo done[/bold green] in {sum(timer.times.values()):.0f} s; outputs:")
    for k, v in summary["outputs"].items():
        console.print(f"  {k:11s} {v}")
    return summary


def _first_path(labels_csv: Path) -> str:
    with open(labels_csv, newline="") as f:
        return next(csv.DictReader(f))["path"]


PHOTO_FRACTION = 0.2  # share of each training label's photos held out for the "new photos" figure


def build_model(
    data: Path | None, out: Path, config: Path, work: Path, lodo: bool = True, console: Console | None = None
) -> dict:
    """The project's best offline recipe (configs/model.yaml) on the shared data: train, evaluate on unseen
    labels and on every left-out domain, export the GUIE model with its card and report."""
    from uniembed.data.demo_data import resolve_demo_data
    from uniembed.data.prepare import prepare
    from uniembed.eval.evaluate import evaluate
    from uniembed.export.guie import export_guie
    from uniembed.features.extract import extract
    from uniembed.train import TrainConfig, train

    console = console or Console()
    timer = StepTimer(console)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    csvs, description, kind = resolve_demo_data(data, console=console)
    console.print(f"[bold]data:[/bold] {description}")
    base = TrainConfig.from_yaml(config)
    ds = work / "data"
    timer.run("prepare", prepare, [str(c) for c in csvs], ds, console=console)
    feats = timer.run(
        "extract", extract, ds, backbone=base.backbone, pooling=base.pooling, out_root=work / "features"
    )
    base.features = [str(feats)]
    base.out = str(work / "runs" / "model")
    run = timer.run("train", train, base, overwrite=True)
    report: dict[str, Any] = {"data": description, "config": str(config), "backbone": base.backbone}
    ev = timer.run(
        "evaluate (unseen labels)",
        evaluate,
        run,
        out_dir=out / "evaluation",
        split="val",
        compare=baselines_for(base.pooling),
    )
    report["unseen_labels"] = mp5_table("mP@5, unseen labels of the training domains", ev, console)
    if lodo:

        def side_run(name: str, step: str, split: str, domains: list[str] | None = None, **split_cfg) -> dict:
            """One more training of the same recipe on the same features (split settings changed), scored
            on ``split`` next to the baselines: the new-photos run and each leave-one-domain-out rotation."""
            cfg = TrainConfig.from_yaml(config)
            cfg.features = [str(feats)]
            cfg.out = str(work / "runs" / name)
            cfg.progress = False
            if domains:
                cfg.train_domains = [d for d in all_domains if d not in domains]
            for k, v in split_cfg.items():
                setattr(cfg.split, k, v)
            r = timer.run(step, train, cfg, overwrite=True)
            return evaluate(
                r,
                out_dir=out / "evaluation" / name,
                split=split,
                domains=domains,
                compare=baselines_for(base.pooling),
                progress=False,
            )

        all_domains = sorted(ev["methods"]["head"]["per_domain"])
        # Known products, new photos: the same recipe with PHOTO_FRACTION of each training label's photos
        # held out, scored among those photos. A head that generalises but forgets its training labels
        # fails here.
        e = side_run(
            "photos",
            f"train ({PHOTO_FRACTION:.0%} of the photos held out)",
            "photos",
            photo_fraction=PHOTO_FRACTION,
        )
        report["new_photos"] = mp5_table("mP@5, new photos of the training labels", e, console)
        report["leave_one_domain_out"] = {}
        for left_out in all_domains:
            e = side_run(
                f"lodo-{left_out}",
                f"train without {left_out}",
                "val",
                domains=[left_out],
                unseen_domains_all_labels=True,
            )
            trained_on = ", ".join(d for d in all_domains if d != left_out)
            per = mp5_table(f"mP@5 on {left_out}, trained on {trained_on}", e, console)
            report["leave_one_domain_out"][left_out] = {
                m: v[left_out] for m, v in per.items() if left_out in v
            }
        _lodo_summary(report["leave_one_domain_out"], console)
    export = timer.run("export", export_guie, run, out, onnx=True, parity_images=8)
    report["export"] = {k: export.get(k) for k in ("fingerprint", "parity") if k in export}
    report["seconds"] = timer.times
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if lodo:
        from uniembed.eval.report import plot_universality

        plot_universality(
            out / "universality.png",
            report["unseen_labels"],
            report["leave_one_domain_out"],
            METHOD_LABELS,
            new_photos=report.get("new_photos"),
        )
    _write_report_md(report, out / "report.md")
    if lodo:
        from uniembed.eval.universality import universality_checks

        for c in universality_checks(report):
            mark = "[green]PASS[/green]" if c.passed else "[red]FAIL[/red]"
            console.print(f"{mark} {c.name}: {c.detail}")
    console.print(
        f"[bold green]model done[/bold green] in {sum(timer.times.values()) / 60:.1f} min: "
        f"{out / 'saved_model.pt'}  (report: {out / 'report.md'})"
    )
    return report


def _lodo_summary(lodo: dict[str, dict[str, float]], console: Console) -> None:
    methods = sorted({m for v in lodo.values() for m in v})
    table = Table(title="leave-one-domain-out: mP@5 on the left-out domain")
    table.add_column("method")
    for d in lodo:
        table.add_column(d, justify="right")
    table.add_column("mean", justify="right")
    for m in methods:
        vals = [lodo[d].get(m, float("nan")) for d in lodo]
        table.add_row(METHOD_LABELS.get(m, m), *[f"{v:.3f}" for v in vals], f"{sum(vals) / len(vals):.3f}")
    console.print(table)


def _write_report_md(report: dict, path: Path) -> None:
    lines = [
        f"# uniembed model report\n\nData: {report['data']}  \nConfig: `{report['config']}`  \n"
        f"Backbone: `{report['backbone']}`\n"
    ]

    def table(title: str, rows: dict[str, dict[str, float]]) -> None:
        cols = sorted({c for v in rows.values() for c in v})
        lines.append(f"\n## {title}\n\n| method | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for m, v in rows.items():
            lines.append(
                f"| {METHOD_LABELS.get(m, m)} | "
                + " | ".join(f"{v.get(c, float('nan')):.3f}" for c in cols)
                + " |"
            )

    table("mP@5 on unseen labels of the training domains", report["unseen_labels"])
    if "new_photos" in report:
        table(
            f"mP@5 on new photos of the training labels ({PHOTO_FRACTION:.0%} of each label's photos "
            "held out of a second training run, scored among themselves)",
            report["new_photos"],
        )
    if "leave_one_domain_out" in report:
        by_method: dict[str, dict[str, float]] = {}
        for dom, vals in report["leave_one_domain_out"].items():
            for m, v in vals.items():
                by_method.setdefault(m, {})[dom] = v
        for v in by_method.values():
            v["mean"] = sum(v.values()) / len(v)
        table("mP@5 on the left-out domain (trained on the other two)", by_method)
    if "leave_one_domain_out" in report:
        from uniembed.eval.universality import universality_checks

        lines.append("\n## Universality checks (issue #6; `scripts/check_universality.py <this dir>`)\n")
        lines.append("![mP@5 per domain and method](universality.png)\n")
        lines += [
            f"- {'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in universality_checks(report)
        ]
    lines.append("\n## Time per stage (s)\n")
    lines += [f"- {k}: {v:.1f}" for k, v in report["seconds"].items()]
    path.write_text("\n".join(lines) + "\n")
