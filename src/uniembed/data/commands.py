"""``uniembed prepare``: image sources -> WebDataset shards + manifest.json + report (see docs/design.md)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from uniembed.core.interrupt import RESTART_HINT, exit_on_interrupt

SOURCES_HELP = "Image sources, each KIND:PATH[:key=value...]; kinds are listed above."


class ResizeMode(StrEnum):
    longest = "longest"
    square = "square"
    none = "none"


def prepare_command(
    sources: list[str] = typer.Argument(..., help=SOURCES_HELP, show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (shards, manifest.json, report)."),
    resize: ResizeMode = typer.Option(
        ResizeMode.longest,
        "--resize",
        help="longest: shrink so the longest side is at most --size, keeping the aspect ratio "
        "(never enlarges); square: squash to --size x --size; none: keep the decoded size.",
    ),
    size: int = typer.Option(336, "--size", min=16, help="Target side in pixels for --resize."),
    min_per_class: int = typer.Option(
        2,
        "--min-per-class",
        min=1,
        help="Drop classes with fewer decodable images than this (GLDv2-mini used 11).",
    ),
    cap_per_source: int = typer.Option(
        None,
        "--cap-per-source",
        min=1,
        help="At most this many images per source, taking whole classes in a seeded random order.",
        show_default="no cap",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the sample shuffle and the per-source cap."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Samples per tar shard."),
    workers: int = typer.Option(
        None, "--workers", "-j", min=1, help="Decoding processes.", show_default="number of CPU cores"
    ),
    domain: str = typer.Option(
        None,
        "--domain",
        help="Domain for imagefolder sources that give no domain=... (default: the folder's name).",
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild even when the output is up to date."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
) -> None:
    """Decode, check, resize and merge image sources into WebDataset shards with one global label space.

    Source kinds, written KIND:PATH[:key=value...]:
      labels.csv:/x/labels.csv  path,label[,domain]; paths relative to the CSV
      imagefolder:/dir          one sub-folder per class
      gldv2:/root               train.csv (id,url,landmark_id) + a/b/c/<id>.jpg
      products10k:/root         train.csv (name,class,group) + train/<name>
      fashion:/root             styles.csv + images/<id>.jpg
      imagenet:/root            \\[train/]nXXXXXXXX/*.JPEG synset folders
      omnibenchmark:/root       <realm>/<class>/*.jpg, the realm is the domain
    A bare .csv path, or a folder holding labels.csv, is a labels.csv source.
    Options, every kind: name=N (source name; native layouts prefix labels
    with it), domain=D. labels.csv: prefix=P. fashion: label=COLUMN (default
    articleType). imagefolder without domain=: --domain, else the folder name.

    Bad files (empty, truncated, not an image, decompression bombs ...) are
    skipped and listed with their reason in manifest.json. report.png and
    report.md show images and classes per source and domain.

    Example: uniembed prepare ../shared/data/grocery_store/labels.csv
    imagefolder:/photos/toys:domain=toys --out data/ds
    """
    from uniembed.data.prepare import prepare
    from uniembed.data.sources import DataError

    try:
        with exit_on_interrupt(RESTART_HINT):
            prepare(
                sources,
                out,
                resize=resize.value,
                size=size,
                min_per_class=min_per_class,
                cap_per_source=cap_per_source,
                seed=seed,
                shard_size=shard_size,
                workers=workers,
                default_domain=domain,
                force=force,
                progress=not quiet,
            )
    except DataError as e:
        typer.secho(f"Error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    """Add ``prepare`` to ``app``."""
    app.command("prepare", no_args_is_help=True)(prepare_command)
