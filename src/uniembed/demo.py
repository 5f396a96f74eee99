"""`uniembed demo` and `uniembed model`: the end-to-end jobs (see uniembed.pipeline)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        data: Path | None = typer.Option(
            None,
            "--data",
            help="Folder with labels.csv file(s) (path,label,domain). Default: ../shared/data if "
            "present, else a cached/downloaded Grocery Store Dataset, else the built-in smoke set.",
        ),
        out: Path = typer.Option(
            Path("artifacts/demo"), "--out", help="Where every stage writes its outputs."
        ),
        full: bool = typer.Option(
            False, "--full", help="A larger subset (40 labels per domain) instead of 12."
        ),
    ) -> None:
        """Run prepare -> extract -> train -> evaluate -> export -> index -> search on a small real subset
        and print the mP@5 table (a few minutes on a laptop CPU)."""
        from uniembed.pipeline import run_demo

        _friendly(lambda: run_demo(data, out, quick=not full))

    @app.command("model")
    def model(
        data: Path | None = typer.Option(
            None, "--data", help="Folder with labels.csv file(s); default as demo."
        ),
        config: Path | None = typer.Option(
            None, "--config", help="Training recipe (YAML). Default: configs/model.yaml of the checkout."
        ),
        out: Path = typer.Option(
            Path("artifacts/model"),
            "--out",
            help="Where saved_model.pt, model.onnx, the card and the report go.",
        ),
        work: Path = typer.Option(
            Path("artifacts/work"),
            "--work",
            help="Intermediate files: prepared shards, cached features, training runs.",
        ),
        lodo: bool = typer.Option(
            True,
            "--lodo/--no-lodo",
            help="Also train and score the leave-one-domain-out rotations (one per domain, merged index), "
            "the unseen-labels and the new-photos runs. --no-lodo: only the shipped model.",
        ),
    ) -> None:
        """The project's recipe on every shared domain (`make model`): leave-one-domain-out on a merged
        index first, then the model trained on every label, exported to artifacts/model/saved_model.pt,
        model.onnx, model_card.md, report.md."""
        from uniembed.pipeline import build_model, config_path

        _friendly(lambda: build_model(data, out, config or config_path("model.yaml"), work, lodo=lodo))


def _friendly(fn) -> None:
    """Known input errors end with one clear line instead of a stack trace."""
    from rich.console import Console

    from uniembed.data.sources import DataError

    try:
        fn()
    except (DataError, FileNotFoundError, ValueError) as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
