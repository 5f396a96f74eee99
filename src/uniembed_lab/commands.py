"""The lab's commands: `uniembed demo`, `uniembed model` (the end-to-end jobs in uniembed_lab.pipeline) and
`uniembed bench` (uniembed_lab.bench). They reach the `uniembed` command line through the
``uniembed.commands`` entry point group, so the library never imports the lab."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add ``demo``, ``model`` and ``bench`` (the entry point ``uniembed.commands: lab``)."""
    from uniembed_lab.bench.commands import register as register_bench

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
        _friendly(lambda: demo_command(data, out, full))

    @app.command("model")
    def model(
        data: Path | None = typer.Option(
            None, "--data", help="Folder with labels.csv file(s); default as demo."
        ),
        config: str = typer.Option(
            "model", "--config", help="Training recipe: a YAML file or a shipped config name."
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
        _friendly(lambda: model_command(data, config, out, work, lodo))

    register_bench(app)


def demo_command(data: Path | None, out: Path, full: bool) -> dict:
    """`uniembed demo`: the quick subset unless ``full``."""
    from uniembed_lab.pipeline import run_demo

    return run_demo(data, out, quick=not full)


def model_command(data: Path | None, config: str, out: Path, work: Path, lodo: bool) -> dict:
    """`uniembed model`: ``config`` is a YAML path or a shipped config name."""
    from uniembed.configs import config_path
    from uniembed_lab.pipeline import build_model

    return build_model(data, out, config_path(config), work, lodo=lodo)


def _friendly(fn: Callable[[], object]) -> None:
    """Known input errors end with one clear line instead of a stack trace."""
    from rich.console import Console

    from uniembed.data.sources import DataError

    try:
        fn()
    except (DataError, FileNotFoundError, ValueError) as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
