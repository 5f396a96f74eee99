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

import numpy as np
from rich.console import Console
from rich.table import Table

from uniembed.configs import config_path
from uniembed.data.sources import write_labels_csv

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


def _demo_labels(dim: int) -> dict[str, str]:
    """Row names for the demo's table that say what each row is and how wide it is."""
    return {
        "raw": f"raw backbone features, {dim:,}-d (uncompressed reference)",
        "pca64": "PCA-64 of those (64-d, no training)",
        "head": "trained 64-d head (the exported model)",
    }


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
    width = int(json.loads((Path(feats) / "info.json").read_text()).get("dim", 0))
    table = mp5_table(f"mP@5 on held-out labels ({description})", ev, console, labels=_demo_labels(width))
    console.print(
        "[bold]How to read it:[/bold] higher is better. The fair comparison is the trained 64-d head against "
        f"PCA-64: both are 64-d. The raw row is the backbone's full-width features ({width:,}-d, "
        f"{width / 64:.0f}x larger), shown as the uncompressed reference (the GUIE format allows 64 floats). "
        "`make model` has the full protocol."
    )
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
#: Collection-adapted index projections scored beside the fixed model (``uniembed index --adapt <spec>``).
ADAPT_SPECS = ("pcaw256",)


def build_model(
    data: Path | None, out: Path, config: Path, work: Path, lodo: bool = True, console: Console | None = None
) -> dict:
    """The project's recipe (configs/model.yaml) on every shared domain: choose/verify it by
    leave-one-domain-out on a merged index (the primary figure), score unseen labels and new photos of known
    labels (secondary), then train the shipped model on every label of every domain and export it."""
    from uniembed.data.demo_data import resolve_demo_data
    from uniembed.data.prepare import prepare
    from uniembed.eval.evaluate import evaluate, head_embeddings
    from uniembed.eval.lodo import leave_one_domain_out, lodo_means
    from uniembed.export.guie import export_guie
    from uniembed.features.extract import extract
    from uniembed.features.store import load_features
    from uniembed.train import TrainConfig, load_head, train

    console = console or Console()
    timer = StepTimer(console)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    csvs, description, kind = resolve_demo_data(data, console=console, shared_sets=None)
    console.print(f"[bold]data:[/bold] {description}")
    base = TrainConfig.from_yaml(config)
    ds = work / "data"
    timer.run("prepare", prepare, [str(c) for c in csvs], ds, console=console)
    feats = timer.run(
        "extract", extract, ds, backbone=base.backbone, pooling=base.pooling, out_root=work / "features"
    )

    def run_recipe(name: str, step: str, train_domains: list[str] | None = None, **split_cfg: Any) -> Path:
        """One training of the recipe on the cached features, with the split settings changed."""
        cfg = TrainConfig.from_yaml(config)
        cfg.features = [str(feats)]
        cfg.out = str(work / "runs" / name)
        cfg.progress = False
        cfg.train_domains = train_domains
        for k, v in split_cfg.items():
            setattr(cfg.split, k, v)
        return timer.run(step, train, cfg, overwrite=True)

    report: dict[str, Any] = {
        "data": description,
        "config": str(config),
        "backbone": base.backbone,
        "pooling": base.pooling,
        "runs": {},
    }
    if lodo:
        fs, names, _ = load_features([str(feats)])
        x = np.asarray(fs.features, np.float32)
        all_domains = sorted(set(fs.domains.tolist()))
        report["domains"] = all_domains

        def embed_without(left_out: str) -> np.ndarray:
            others = [d for d in all_domains if d != left_out]
            r = run_recipe(f"lodo-{left_out}", f"train without {left_out}", others, val_fraction=0.0)
            return head_embeddings(load_head(r)[0], x)

        def show(left_out: str, scores: dict[str, float]) -> None:
            console.print(
                f"  left out [bold]{left_out}[/bold]: " + ", ".join(f"{m} {v:.3f}" for m, v in scores.items())
            )

        console.rule("[bold]leave-one-domain-out, merged index of every domain (the recipe's yardstick)")
        t0 = time.perf_counter()
        scores = leave_one_domain_out(x, names, fs.domains, embed_without, ADAPT_SPECS, on_domain=show)
        timer.times["leave-one-domain-out (scoring)"] = (
            time.perf_counter() - t0 - sum(v for k, v in timer.times.items() if k.startswith("train without"))
        )
        report["leave_one_domain_out"] = scores
        report["lodo_mean"] = lodo_means(scores)
        report["runs"]["leave_one_domain_out"] = (
            f"{len(all_domains)} runs ({work / 'runs'}/lodo-*), each trained on every label of the other "
            "domains"
        )
        _lodo_summary(scores, console)

        # Secondary columns: unseen labels of the training domains, new photos of the training labels.
        def secondary(
            key: str, name: str, step: str, split: str, title: str, what: str, **split_cfg: Any
        ) -> None:
            r = run_recipe(name, step, **split_cfg)
            ev = evaluate(
                r,
                out_dir=out / "evaluation" / name,
                split=split,
                compare=baselines_for(base.pooling),
                progress=False,
            )
            report[key] = mp5_table(title, ev, console)
            report["runs"][key] = f"{r}: {what}"

        secondary(
            "unseen_labels",
            "unseen-labels",
            "train (half of each domain's labels held out)",
            "val",
            "mP@5, unseen labels of the training domains",
            "half of each domain's labels held out (split.val_fraction)",
        )
        secondary(
            "new_photos",
            "photos",
            f"train ({PHOTO_FRACTION:.0%} of the photos held out)",
            "photos",
            "mP@5, new photos of the training labels",
            f"{PHOTO_FRACTION:.0%} of each training label's photos held out",
            photo_fraction=PHOTO_FRACTION,
        )
    run = run_recipe("model", "train the shipped model (every label of every domain)", val_fraction=0.0)
    report["runs"]["shipped"] = f"{run}: every label of every domain (exported as saved_model.pt)"
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
            {m: _method_label(m) for v in report["leave_one_domain_out"].values() for m in v}
            | {m: _method_label(m) for m in report["unseen_labels"]},
            new_photos=report.get("new_photos"),
        )
    _write_report_md(report, out / "report.md")
    if lodo:
        from uniembed_lab.universality import universality_checks

        for c in universality_checks(report):
            mark = "[green]PASS[/green]" if c.passed else "[red]FAIL[/red]"
            console.print(f"{mark} {c.name}: {c.detail}")
    console.print(
        f"[bold green]model done[/bold green] in {sum(timer.times.values()) / 60:.1f} min: "
        f"{out / 'saved_model.pt'}  (report: {out / 'report.md'})"
    )
    return report


def _lodo_summary(lodo: dict[str, dict[str, float]], console: Console) -> None:
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
        console.print(f"  [bold]{m}[/bold]: {_method_label(m)}", highlight=False)


def _method_label(m: str) -> str:
    from uniembed.eval.lodo import LODO_METHOD_LABELS, adapted_label

    if m.startswith("adapted_"):
        return adapted_label(m.removeprefix("adapted_"))
    return LODO_METHOD_LABELS.get(m) or METHOD_LABELS.get(m, m)


def _write_report_md(report: dict, path: Path) -> None:
    lines = [
        f"# uniembed model report\n\nData: {report['data']}  \nConfig: `{report['config']}`  \n"
        f"Backbone: `{report['backbone']}`, pooling `{report.get('pooling', '')}`\n"
    ]

    def table(title: str, rows: dict[str, dict[str, float]], first: str | None = None) -> None:
        cols = sorted({c for v in rows.values() for c in v} - {first})
        cols = ([first] if first else []) + cols
        lines.append(f"\n## {title}\n\n| method | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for m, v in rows.items():
            lines.append(
                f"| {_method_label(m)} | " + " | ".join(f"{v.get(c, float('nan')):.3f}" for c in cols) + " |"
            )

    if "leave_one_domain_out" in report:
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
        table("mP@5 of each left-out domain's queries", by_method, first="MEAN")
    if "unseen_labels" in report:
        table(
            "Secondary: mP@5 on unseen labels of the training domains (half of each domain's labels "
            "held out; scored within the domain)",
            report["unseen_labels"],
        )
    if "new_photos" in report:
        table(
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
