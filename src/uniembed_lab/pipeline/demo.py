"""`uniembed demo` (`make demo`): every stage once on a small, domain-balanced subset of real photos."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from rich.console import Console

from uniembed.configs import config_path
from uniembed.data.sources import write_labels_csv
from uniembed_lab.pipeline.common import StepTimer, mp5_table


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
    _print_reading_guide(width, query, hits[0], console)
    outputs = {
        "dataset": str(ds),
        "features": str(feats),
        "run": str(run),
        "evaluation": str(out / "eval"),
        "model": str(model_dir / "saved_model.pt"),
        "index": str(index_dir),
    }
    summary = {
        "data": description,
        "data_kind": kind,
        "mP@5": table,
        "seconds": timer.times,
        "outputs": outputs,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold green]demo done[/bold green] in {sum(timer.times.values()):.0f} s; outputs:")
    for k, v in summary["outputs"].items():
        console.print(f"  {k:11s} {v}")
    return summary


def _print_reading_guide(width: int, query: str, hits: list[dict], console: Console) -> None:
    """How to read the table (which rows compare fairly), then the search example's hits."""
    console.print(
        "[bold]How to read it:[/bold] higher is better. The fair comparison is the trained 64-d head against "
        f"PCA-64: both are 64-d. The raw row is the backbone's full-width features ({width:,}-d, "
        f"{width / 64:.0f}x larger), shown as the uncompressed reference (the GUIE format allows 64 floats). "
        "`make model` has the full protocol."
    )
    console.print(f"search for {query}:")
    for h in hits:
        console.print(f"  {h['distance']:.3f}  {h['label']}  {h['path']}")


def _first_path(labels_csv: Path) -> str:
    with open(labels_csv, newline="") as f:
        return next(csv.DictReader(f))["path"]
