"""CLI: ``uniembed dedup SOURCE`` (near-duplicate and exact-duplicate groups; deletes nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uniembed.serve.cli_options import (
    AdaptOption,
    BackboneOption,
    BatchSizeOption,
    EngineOption,
    ThreadsOption,
)
from uniembed.serve.dedup import DEFAULT_THRESHOLD
from uniembed.serve.dedup_files import KEEP_POLICIES

SourceArgument = Annotated[
    Path,
    typer.Argument(
        help="A folder of images, a labels.csv, or an index directory built by `uniembed index` (its stored "
        "vectors are used as they are: nothing is embedded again).",
        show_default=False,
    ),
]
ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="GUIE saved_model.pt to embed a folder / labels.csv with. Without it: what `uniembed index` "
        "does without --model (a collection-adapted pcaw256 on mobilenetv2+efficientnet_lite2; pcaw<N/2> "
        "below 512 images). Ignored for an index directory.",
    ),
]
ThresholdOption = Annotated[
    float,
    typer.Option(
        "--threshold",
        "-t",
        min=0.0,
        max=2.0,
        help="Largest embedding distance (Euclidean between unit vectors, 0..2) at which two images are "
        "near-duplicates; groups are linked transitively. The default was calibrated for the default "
        "embedding on real photos with made duplicates (docs/search.md); another model needs its own.",
    ),
]
KeepOption = Annotated[
    str | None,
    typer.Option(
        "--keep",
        help="Write to_delete.txt: every grouped file but the one each group keeps: 'largest' (most pixels, "
        "then bytes), 'oldest' (mtime) or 'first' (source order). Files are never deleted by this command.",
    ),
]
DedupOutOption = Annotated[
    Path,
    typer.Option(
        "--out", "-o", help="Folder for groups.csv, summary.json, contact_sheet.png, to_delete.txt."
    ),
]
IndexOutOption = Annotated[
    Path | None,
    typer.Option(
        "--index-out",
        help="Keep the index built from a folder / labels.csv here (search or dedup it again later); "
        "default: a temporary folder, removed afterwards.",
    ),
]


def print_summary(summary: dict, keep: str | None) -> None:
    """The table ``uniembed dedup`` prints."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="uniembed dedup", show_header=False)
    t.add_row("images", str(summary["images"]))
    t.add_row("threshold", f"{summary['threshold']:g}")
    t.add_row("exact groups (same bytes)", str(summary["exact_groups"]))
    t.add_row("near-duplicate groups", str(summary["near_groups"]))
    t.add_row("files in groups", str(summary["files_in_groups"]))
    policy = f" (keep {keep}; nothing deleted)" if keep else " (pass --keep to write to_delete.txt)"
    t.add_row("would delete", f"{summary['would_delete']}{policy}")
    counts = summary["skipped_counts"]
    t.add_row("skipped / unreadable", f"{summary['skipped']} {counts if counts else ''}")
    for name, path in summary["files"].items():
        t.add_row(name, path)
    Console().print(t)


def dedup_command(
    source: SourceArgument,
    model: ModelOption = None,
    threshold: ThresholdOption = DEFAULT_THRESHOLD,
    keep: KeepOption = None,
    out: DedupOutOption = Path("artifacts/dedup"),
    index_out: IndexOutOption = None,
    adapt: AdaptOption = None,
    backbone: BackboneOption = None,
    batch_size: BatchSizeOption = 32,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Find near-duplicate images (embedding distance, FAISS range search) and exact byte duplicates in a
    folder, labels.csv or index. Writes a report and, with --keep, a list of files to delete: it deletes
    nothing itself."""
    from uniembed.core.interrupt import RESTART_HINT, exit_on_interrupt
    from uniembed.export.embedder import ModelError
    from uniembed.serve.commands import _fail
    from uniembed.serve.dedup_run import dedup_source
    from uniembed.serve.errors import ImageIndexError

    if keep is not None and keep not in KEEP_POLICIES:
        raise _fail(f"--keep must be one of {', '.join(KEEP_POLICIES)}, got {keep!r}")
    if not source.exists():
        raise _fail(f"{source} does not exist (give a folder of images, a labels.csv or an index directory)")
    if adapt is not None and model is not None:
        raise _fail("--adapt fits its own projection: give --backbone NAME, not --model")
    options = {
        "batch_size": batch_size,
        "engine": engine,
        "threads": threads,
        "adapt": adapt,
        "backbone": backbone,
    }
    try:
        with exit_on_interrupt(RESTART_HINT):
            report = dedup_source(source, out, model, threshold, keep, index_out, **options)
    except (ImageIndexError, ModelError, ValueError) as e:
        raise _fail(str(e)) from None
    print_summary(report.summary(), keep)


def register(app: typer.Typer) -> None:
    """Add ``dedup``."""
    app.command("dedup")(dedup_command)
