"""`uniembed model` (`make model`): the project's recipe on every shared domain, chosen and verified by
leave-one-domain-out on a merged index, then trained on every label and exported.

Each stage stays a plain files-in/files-out library function; this module holds only their order, the
trainings the protocol needs, and the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from uniembed_lab.pipeline.common import StepTimer, baselines_for, mp5_table
from uniembed_lab.pipeline.report import PHOTO_FRACTION, lodo_summary, plot_report, write_report_md

#: Collection-adapted index projections scored beside the fixed model (``uniembed index --adapt <spec>``).
ADAPT_SPECS = ("pcaw256",)


@dataclass
class ModelJob:
    """One `uniembed model` run: where it writes, its recipe, the cached features and the growing report."""

    config: Path
    out: Path
    work: Path
    console: Console
    timer: StepTimer
    base: Any  # the recipe as read (TrainConfig)
    feats: Path
    report: dict[str, Any]

    def run_recipe(
        self, name: str, step: str, train_domains: list[str] | None = None, **split_cfg: Any
    ) -> Path:
        """One training of the recipe on the cached features, with the split settings changed."""
        from uniembed.train import TrainConfig, train

        cfg = TrainConfig.from_yaml(self.config)
        cfg.features = [str(self.feats)]
        cfg.out = str(self.work / "runs" / name)
        cfg.progress = False
        cfg.train_domains = train_domains
        for k, v in split_cfg.items():
            setattr(cfg.split, k, v)
        return self.timer.run(step, train, cfg, overwrite=True)


def build_model(
    data: Path | None, out: Path, config: Path, work: Path, lodo: bool = True, console: Console | None = None
) -> dict:
    """The project's recipe (configs/model.yaml) on every shared domain: choose/verify it by
    leave-one-domain-out on a merged index (the primary figure), score unseen labels and new photos of known
    labels (secondary), then train the shipped model on every label of every domain and export it."""
    job = _start(data, out, config, work, console or Console())
    if lodo:
        _leave_one_domain_out(job)
        _secondary_runs(job)
    _ship(job)
    _finish(job, lodo)
    return job.report


def _start(data: Path | None, out: Path, config: Path, work: Path, console: Console) -> ModelJob:
    """Resolve the data, prepare it and extract (or reuse) the recipe's features."""
    from uniembed.data.demo_data import resolve_demo_data
    from uniembed.data.prepare import prepare
    from uniembed.features.extract import extract
    from uniembed.train import TrainConfig

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
    report: dict[str, Any] = {
        "data": description,
        "config": str(config),
        "backbone": base.backbone,
        "pooling": base.pooling,
        "runs": {},
    }
    return ModelJob(config, out, work, console, timer, base, feats, report)


def _leave_one_domain_out(job: ModelJob) -> None:
    """Train without each domain in turn; score its queries on the merged index of every domain."""
    from uniembed.eval.evaluate import head_embeddings
    from uniembed.eval.lodo import leave_one_domain_out, lodo_means
    from uniembed.features.store import load_features
    from uniembed.train import load_head

    console, timer, report = job.console, job.timer, job.report
    fs, names, _ = load_features([str(job.feats)])
    x = np.asarray(fs.features, np.float32)
    all_domains = sorted(set(fs.domains.tolist()))
    report["domains"] = all_domains

    def embed_without(left_out: str) -> np.ndarray:
        others = [d for d in all_domains if d != left_out]
        r = job.run_recipe(f"lodo-{left_out}", f"train without {left_out}", others, val_fraction=0.0)
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
        f"{len(all_domains)} runs ({job.work / 'runs'}/lodo-*), each trained on every label of the other "
        "domains"
    )
    lodo_summary(scores, console)


def _secondary_runs(job: ModelJob) -> None:
    """Secondary columns: unseen labels of the training domains, new photos of the training labels."""
    _secondary(
        job,
        "unseen_labels",
        "unseen-labels",
        "train (half of each domain's labels held out)",
        "val",
        "mP@5, unseen labels of the training domains",
        "half of each domain's labels held out (split.val_fraction)",
    )
    _secondary(
        job,
        "new_photos",
        "photos",
        f"train ({PHOTO_FRACTION:.0%} of the photos held out)",
        "photos",
        "mP@5, new photos of the training labels",
        f"{PHOTO_FRACTION:.0%} of each training label's photos held out",
        photo_fraction=PHOTO_FRACTION,
    )


def _secondary(
    job: ModelJob, key: str, name: str, step: str, split: str, title: str, what: str, **split_cfg: Any
) -> None:
    """One validation training, evaluated on its held-out ``split`` beside the baselines."""
    from uniembed.eval.evaluate import evaluate

    r = job.run_recipe(name, step, **split_cfg)
    ev = evaluate(
        r,
        out_dir=job.out / "evaluation" / name,
        split=split,
        compare=baselines_for(job.base.pooling),
        progress=False,
    )
    job.report[key] = mp5_table(title, ev, job.console)
    job.report["runs"][key] = f"{r}: {what}"


def _ship(job: ModelJob) -> None:
    """Train the shipped model on every label of every domain, export it, write report.json."""
    from uniembed.export.guie import export_guie

    report = job.report
    run = job.run_recipe("model", "train the shipped model (every label of every domain)", val_fraction=0.0)
    report["runs"]["shipped"] = f"{run}: every label of every domain (exported as saved_model.pt)"
    export = job.timer.run("export", export_guie, run, job.out, onnx=True, parity_images=8)
    report["export"] = {k: export.get(k) for k in ("fingerprint", "parity") if k in export}
    report["seconds"] = job.timer.times
    (job.out / "report.json").write_text(json.dumps(report, indent=2, default=str))


def _finish(job: ModelJob, lodo: bool) -> None:
    """The figure, report.md and the universality verdicts."""
    out, console = job.out, job.console
    if lodo:
        plot_report(job.report, out / "universality.png")
    write_report_md(job.report, out / "report.md")
    if lodo:
        from uniembed_lab.universality import universality_checks

        for c in universality_checks(job.report):
            mark = "[green]PASS[/green]" if c.passed else "[red]FAIL[/red]"
            console.print(f"{mark} {c.name}: {c.detail}")
    console.print(
        f"[bold green]model done[/bold green] in {sum(job.timer.times.values()) / 60:.1f} min: "
        f"{out / 'saved_model.pt'}  (report: {out / 'report.md'})"
    )
