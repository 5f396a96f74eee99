"""``uniembed index --remove ID_OR_PATH`` / ``--remove-from FILE``: the CLI side of ``edits.remove_items``."""

from __future__ import annotations

from pathlib import Path

import typer


def read_targets(values: list[str], remove_from: Path | None) -> list[str]:
    """The ``--remove`` values, then one per line of ``--remove-from`` (blank lines and ``#`` comments
    skipped; e.g. the to_delete.txt ``uniembed dedup --keep`` writes)."""
    targets = list(values)
    if remove_from is not None:
        try:
            text = remove_from.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise typer.BadParameter(f"cannot read {remove_from}: {e}", param_hint="--remove-from") from None
        targets += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return targets


def run_remove(out: Path, values: list[str], remove_from: Path | None, verify: bool) -> None:
    """Remove the items, print what was done; one-line error and exit 2 for unknown ids/paths (nothing
    changes then) or a damaged index."""
    from rich.console import Console

    from uniembed.core.interrupt import RESTART_HINT, exit_on_interrupt
    from uniembed.serve.edits import remove_items, split_targets
    from uniembed.serve.errors import ImageIndexError

    err = Console(stderr=True, soft_wrap=True)
    targets = read_targets(values, remove_from)
    if not targets:
        err.print("[bold red]error:[/] nothing to remove (no id or path given)", highlight=False)
        raise typer.Exit(2)
    ids, paths = split_targets(targets)
    try:
        with exit_on_interrupt(RESTART_HINT):
            res = remove_items(out, ids=ids, paths=paths, verify=verify)
    except ImageIndexError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    console = Console(soft_wrap=True)
    for it in res.removed[:10]:
        console.print(f"  removed id {it['id']}: {it['path']}", highlight=False)
    if len(res.removed) > 10:
        console.print(f"  … and {len(res.removed) - 10} more")
    console.print(
        f"removed {len(res.removed)} item(s) from {out}: {res.count} left, next id {res.next_id} "
        f"({res.seconds:.2f} s)",
        highlight=False,
    )
