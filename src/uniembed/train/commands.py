"""``uniembed train``: train a projection head on cached features (see uniembed.train.trainer)."""

from __future__ import annotations

from pathlib import Path

import typer


def train_command(
    config: str = typer.Option(
        ...,
        "--config",
        "-c",
        help="Training config: a YAML file, or the name of a shipped one (default, smoke, demo, model).",
    ),
    features: list[Path] = typer.Option(
        None,
        "--features",
        "-f",
        help="Cached feature dir(s) written by `uniembed extract` (repeat to concatenate several; they must "
        "come from the same backbone). Overrides `features` in the config.",
    ),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="Run directory for outputs (default: config `out`, else artifacts/runs/<name>).",
    ),
    epochs: int = typer.Option(None, "--epochs", "-e", help="Number of epochs (overrides the config)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its checkpoint.pt, exactly where it stopped."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start over in a run directory that already holds a checkpoint."
    ),
    stop_after: int = typer.Option(
        None,
        "--stop-after",
        help="Stop after this many epochs in total, keeping the schedule of the full run (continue "
        "later with --resume).",
    ),
    set_: list[str] = typer.Option(
        None,
        "--set",
        "-s",
        help="Override a config value: key=value with dotted keys and YAML values, e.g. --set optim.lr=3e-4 "
        "--set loss.type=subcenter_arcface --set train_domains=produce,packaged_goods. Repeatable.",
    ),
    dump_config: bool = typer.Option(
        False, "--dump-config", help="Print the resolved config as YAML and exit without training."
    ),
) -> None:
    """Train a 64-d projection head (ArcFace-family margin loss) on cached backbone features.

    Validates every epoch on held-out labels (GUIE mP@5, per domain) next to raw-feature and PCA-64 baselines,
    checkpoints atomically (--resume continues exactly) and writes config.yaml, head.pt, metrics.jsonl,
    curve.png and summary.json to the run directory. Runs under `torchrun --nproc_per_node N` as DDP.
    """
    import yaml
    from rich.console import Console

    from uniembed.configs import config_path
    from uniembed.train import TrainConfig, train

    console = Console(stderr=True)
    try:
        cfg = TrainConfig.from_yaml(config_path(config))
        overrides = list(set_ or [])
        cfg = cfg.with_overrides(overrides)
        if features:
            cfg.features = [str(f) for f in features]
        if out is not None:
            cfg.out = str(out)
        if epochs is not None:
            cfg.epochs = int(epochs)
        cfg.validate()
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]config error:[/] {e}")
        raise typer.Exit(2) from e
    if dump_config:
        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    try:
        run = train(cfg, resume=resume, stop_after=stop_after, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        console.print(f"[red]train failed:[/] {e}")
        raise typer.Exit(1) from e
    typer.echo(str(run))


def register(app: typer.Typer) -> None:
    """Add ``train`` to the CLI."""
    app.command("train")(train_command)
