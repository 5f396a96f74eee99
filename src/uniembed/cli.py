"""The ``uniembed`` command line: a thin layer over the library's stage functions.

Each stage module exposes ``register(app)`` that adds its sub-command(s); heavy imports (torch, faiss)
happen inside the commands so ``uniembed --help`` stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points, version
from typing import Annotated

import typer

app = typer.Typer(
    name="uniembed",
    help="Universal image embeddings: prepare, extract, train, evaluate, export, index/search/serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Order here is the order of the pipeline in `uniembed --help`.
_COMMAND_MODULES = [
    "uniembed.data.commands",  # prepare
    "uniembed.features.commands",  # extract
    "uniembed.train.commands",  # train
    "uniembed.eval.commands",  # evaluate
    "uniembed.export.commands",  # export
    "uniembed.serve.commands",  # index, search, serve
    "uniembed.serve.dedup_cli",  # dedup
]
#: Other installed packages add commands through this entry point group: ``register(app)`` callables. The lab
#: (``uniembed_lab``: demo, model, bench) is one; the library itself never imports it.
COMMAND_ENTRY_POINTS = "uniembed.commands"


def _print_version(value: bool) -> None:
    """``--version``: the installed distribution's version (the one a bug report needs), then exit."""
    if value:
        typer.echo(f"uniembed {version('uniembed')}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the installed version and exit."
        ),
    ] = False,
) -> None:
    """Options of ``uniembed`` itself (before any command)."""


for _mod in _COMMAND_MODULES:
    importlib.import_module(_mod).register(app)
for _ep in sorted(entry_points(group=COMMAND_ENTRY_POINTS), key=lambda e: e.name):
    _ep.load()(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
