"""``uniembed train``: train a projection head on cached features (see uniembed.train.trainer)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from uniembed.train import TrainConfig


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
    from uniembed.train import TrainConfig

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
    run = _run_training(cfg, console, resume=resume, stop_after=stop_after, overwrite=overwrite)
    typer.echo(str(run))


def _run_training(cfg: TrainConfig, console: Any, **how: Any) -> Path:
    """Train: a damaged input file exits 2 and a user error 1, with one line; Ctrl-C exits 130 saying how to
    continue."""
    from uniembed.core.integrity import DamagedFileError
    from uniembed.core.interrupt import exit_on_interrupt
    from uniembed.train import train

    before = _checkpoint_stamp(cfg)
    try:
        with exit_on_interrupt(lambda: _interrupted_hint(cfg, bool(how.get("resume")), before)):
            return train(cfg, **how)
    except DamagedFileError as e:
        console.print(f"[red]train failed:[/] {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        console.print(f"[red]train failed:[/] {e}")
        raise typer.Exit(1) from e


def _checkpoint_stamp(cfg: TrainConfig) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of the run's checkpoint.pt, None while there is none: a checkpoint is replaced
    atomically (a new inode), so a changed stamp means this command wrote one."""
    from uniembed.train.checkpoint import CHECKPOINT_FILE
    from uniembed.train.trainer import run_dir_for

    try:
        st = (run_dir_for(cfg) / CHECKPOINT_FILE).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _interrupted_hint(cfg: TrainConfig, resume: bool, before: tuple[int, int, int] | None) -> str:
    """How to continue an interrupted run: add ``--resume`` once this command wrote a checkpoint; a run
    that was resuming already, the same command; one that saved nothing yet, the same command starts again."""
    from uniembed.core.interrupt import RESTART_HINT, RESUME_FLAG_HINT, RESUME_HINT

    if resume:
        return RESUME_HINT
    now = _checkpoint_stamp(cfg)
    return RESUME_FLAG_HINT if now is not None and now != before else RESTART_HINT


def register(app: typer.Typer) -> None:
    """Add ``train`` to the CLI."""
    app.command("train")(train_command)
