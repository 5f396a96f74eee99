"""``uniembed evaluate``: GUIE mP@5, recall@1/5, mAP@100 overall and per domain, with report and figures."""

from __future__ import annotations

from pathlib import Path

import typer


def _csv_option(flag: str, default: str | None, help: str) -> typer.models.OptionInfo:
    """A comma-separated list option (parsed by :func:`_split_csv`)."""
    return typer.Option(default, flag, help=help)


def _split_csv(value: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None or "" -> []."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` to the CLI."""

    @app.command("evaluate")
    def evaluate_cmd(
        source: Path = typer.Argument(
            ...,
            help="What to score: a training run dir (head.pt), an exported saved_model.pt (or the folder "
            "holding it), or a feature dir (then only the --compare baselines are scored).",
        ),
        data: Path = typer.Option(
            None,
            "--data",
            "-d",
            help="Images / features to score on: a feature dir, a prepared dataset dir (manifest.json) or a "
            "labels.csv (path,label,domain). Default for a run: the run's own cached features.",
        ),
        out: Path = typer.Option(
            Path("artifacts/eval"),
            "--out",
            "-o",
            help="Output dir for metrics.json, report.md, per_domain.png and grid.png. Use RUN/eval so "
            "`uniembed export` puts these metrics into the model card.",
        ),
        split: str = typer.Option(
            "auto",
            "--split",
            help="val: only the labels the run held out from training (recomputed from its config.yaml); "
            "photos: the photos of its training labels it held out (a run trained with "
            "split.photo_fraction > 0); all: every image; auto: val when the training run is known, "
            "else all.",
        ),
        domains: str = _csv_option(
            "--domains", None, "Comma-separated domains to keep (e.g. produce,packaged_goods); default: all."
        ),
        compare: str = _csv_option(
            "--compare",
            "",
            "Comma-separated baselines scored on the same images: raw (L2-normalised backbone features) "
            "and/or pca<k> (e.g. pca64, fitted on the training labels); raw_cnn / pca<k>_cnn score them "
            "without the colour block of '+colour' features. Needs features.",
        ),
        batch_size: int = typer.Option(
            32, "--batch-size", min=1, help="Images per batch when embedding images with a model."
        ),
        grid_queries: int = typer.Option(
            8,
            "--grid-queries",
            min=0,
            help="Queries shown in grid.png, spread over domains; half are queries with a miss (0: no grid).",
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Score retrieval with the GUIE protocol (leave-one-out mP@5 and friends), overall and per domain;
        several methods side by side with --compare."""
        from rich.console import Console
        from rich.table import Table

        from uniembed.eval.evaluate import EvalError, evaluate
        from uniembed.export.embedder import ModelError

        console = Console(stderr=True)
        try:
            res = evaluate(
                source,
                data,
                out,
                split=split,
                domains=_split_csv(domains) or None,
                compare=_split_csv(compare),
                batch_size=batch_size,
                grid_queries=grid_queries,
                progress=not quiet,
            )
        except (EvalError, ModelError, FileNotFoundError) as e:
            console.print(f"[red]error:[/] {e}")
            raise typer.Exit(2) from None
        t = Table(
            title=f"{res['source_name']}: split {res['split']}, {res['n_images']} images, "
            f"{res['n_labels']} labels"
        )
        t.add_column("method")
        t.add_column("domain", overflow="fold")
        for k in ("mP@5", "recall@1", "recall@5", "mAP@100", "queries"):
            t.add_column(k, justify="right")
        for name, m in res["methods"].items():
            for dom, r in [("ALL", m["overall"]), *m["per_domain"].items()]:
                t.add_row(
                    name,
                    dom,
                    *[f"{r[k]:.4f}" for k in ("mP@5", "recall@1", "recall@5", "mAP@100")],
                    str(r["queries"]),
                )
        Console().print(t)
        if res["skipped"]:
            console.print("skipped: " + ", ".join(f"{k}: {v}" for k, v in res["skipped"].items()))
        grid = ", grid.png" if res.get("grid") else ""
        console.print(f"wrote {out}/metrics.json, report.md, per_domain.png{grid}")
