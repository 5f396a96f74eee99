"""CLI commands of this stage (filled in by the stage's implementation)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this stage's sub-commands to ``app``."""
