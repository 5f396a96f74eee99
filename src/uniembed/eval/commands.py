"""``uniembed evaluate``: GUIE mP@5, recall@1/5, mAP@100 overall and per domain, with report and figures."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.table import Table

SourceArg = Annotated[
    Path,
    typer.Argument(
        help="What to score: a training run dir (head.pt), an exported saved_model.pt (or the folder "
        "holding it), or a feature dir (then only the --compare baselines are scored).",
    ),
]
DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        "-d",
        help="Images / features to score on: a feature dir, a prepared dataset dir (manifest.json) or a "
        "labels.csv (path,label,domain). Default for a run: the run's own cached features.",
    ),
]
OutOption = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Output dir for metrics.json, report.md, per_domain.png and grid.png. Use RUN/eval so "
        "`uniembed export` puts these metrics into the model card.",
    ),
]
SplitOption = Annotated[
    str,
    typer.Option(
        "--split",
        help="val: only the labels the run held out from training (recomputed from its config.yaml); "
        "photos: the photos of its training labels it held out (a run trained with "
        "split.photo_fraction > 0); all: every image; auto: val when the training run is known, "
        "else all.",
    ),
]
DomainsOption = Annotated[
    str | None,
    typer.Option(
        "--domains", help="Comma-separated domains to keep (e.g. produce,packaged_goods); default: all."
    ),
]
CompareOption = Annotated[
    str,
    typer.Option(
        "--compare",
        help="Comma-separated baselines scored on the same images: raw (L2-normalised backbone features) "
        "and/or pca<k> (e.g. pca64, fitted on the training labels); raw_cnn / pca<k>_cnn score them "
        "without the colour block of '+colour' features. Needs features.",
    ),
]
BatchSizeOption = Annotated[
    int, typer.Option("--batch-size", min=1, help="Images per batch when embedding images with a model.")
]
GridQueriesOption = Annotated[
    int,
    typer.Option(
        "--grid-queries",
        min=0,
        help="Queries shown in grid.png, spread over domains; half are queries with a miss (0: no grid).",
    ),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def _split_csv(value: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None or "" -> []."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` to the CLI."""

    @app.command("evaluate")
    def evaluate_cmd(
        source: SourceArg,
        data: DataOption = None,
        out: OutOption = Path("artifacts/eval"),
        split: SplitOption = "auto",
        domains: DomainsOption = None,
        compare: CompareOption = "",
        batch_size: BatchSizeOption = 32,
        grid_queries: GridQueriesOption = 8,
        quiet: QuietOption = False,
    ) -> None:
        """Score retrieval with the GUIE protocol (leave-one-out mP@5 and friends), overall and per domain;
        several methods side by side with --compare."""
        run_evaluate(source, data, out, split, domains, compare, batch_size, grid_queries, quiet)


def run_evaluate(
    source: Path,
    data: Path | None,
    out: Path,
    split: str,
    domains: str | None,
    compare: str,
    batch_size: int,
    grid_queries: int,
    quiet: bool,
) -> None:
    """``uniembed evaluate``: score, print the table, say what was written (exit 2 on bad input)."""
    from rich.console import Console

    from uniembed.core.integrity import DamagedFileError
    from uniembed.core.interrupt import RESTART_HINT, exit_on_interrupt
    from uniembed.eval.evaluate import EvalError, evaluate
    from uniembed.export.embedder import ModelError

    console = Console(stderr=True, soft_wrap=True)
    try:
        with exit_on_interrupt(RESTART_HINT):
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
    except (EvalError, ModelError, DamagedFileError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    Console().print(_results_table(res))
    if res["skipped"]:
        console.print("skipped: " + ", ".join(f"{k}: {v}" for k, v in res["skipped"].items()))
    grid = ", grid.png" if res.get("grid") else ""
    console.print(f"wrote {out}/metrics.json, report.md, per_domain.png{grid}")


def _results_table(res: dict) -> Table:
    """A rich table: one row per method and domain (ALL first)."""
    from rich.table import Table

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
    return t
