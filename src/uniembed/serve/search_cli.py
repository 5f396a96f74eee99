"""CLI: ``uniembed search``: query images, or an indexed item (``--id``, more like this), against an index,
with ``--max-distance`` and ``--filter`` (syntax in ``serve/filters.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uniembed.serve.cli_options import (
    EngineOption,
    FilterOption,
    ItemIdOption,
    MaxDistanceOption,
    NoExpandOption,
    NoVerifyOption,
    ThreadsOption,
)
from uniembed.serve.commands import _MODEL_HINT, _fail
from uniembed.serve.limits import DEFAULT_K, MAX_K, k_error

if TYPE_CHECKING:  # pragma: no cover
    from uniembed.serve.store import Hit


def print_search_tables(queries: list[Path], all_hits: list[list[Hit]], failed: list[dict[str, str]]) -> None:
    """One table of results per query, then the queries that could not be read (on stderr)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for q, hits in zip(queries, all_hits, strict=True):
        t = Table(title=f"query {q}")
        for col in ("#", "distance", "label", "domain", "path"):
            t.add_column(col, overflow="fold")
        for rank, h in enumerate(hits, 1):
            t.add_row(str(rank), f"{h.distance:.4f}", h.label, h.domain, h.path)
        console.print(t)
    for f in failed:
        Console(stderr=True, soft_wrap=True).print(
            f"[red]cannot read {f['query']}:[/] {f['error']}", highlight=False
        )


SearchIndexOption = Annotated[
    Path, typer.Option("--index", help="Index directory written by `uniembed index`.")
]
TopKOption = Annotated[
    int, typer.Option("-k", "--top-k", help=f"Number of results per query (1 to {MAX_K}).")
]
QueryModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="saved_model.pt to embed queries with (default: the model recorded in the index; it must "
        "have the same fingerprint). An index built with --adapt uses its own query_model.pt.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print results as JSON instead of a table.")]
GridOption = Annotated[
    Path | None, typer.Option("--grid", help="Also draw each query beside its results into this PNG.")
]


def search_command(
    images: Annotated[list[Path] | None, typer.Argument(help="Query image file(s) (or --id).")] = None,
    index: SearchIndexOption = Path("artifacts/index"),
    k: TopKOption = DEFAULT_K,
    model: QueryModelOption = None,
    as_json: JsonOption = False,
    grid: GridOption = None,
    max_distance: MaxDistanceOption = None,
    filters: FilterOption = None,
    item_id: ItemIdOption = None,
    no_expand: NoExpandOption = False,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    no_verify: NoVerifyOption = False,
) -> None:
    """Find the indexed images nearest to each query image, or to indexed item --id (top-k with
    distances, labels and paths), optionally within --max-distance and passing every --filter."""
    from rich.console import Console

    from uniembed.core.runtime import free_cores
    from uniembed.export.embedder import ModelError
    from uniembed.serve.filters import parse_filters
    from uniembed.serve.index import ImageIndexError, open_index_and_model

    if k_error(k):
        raise _fail(str(k_error(k)))
    if bool(images) == (item_id is not None):
        raise _fail("give query image files, or --id N for more like an indexed item (one of the two)")
    if item_id is not None:
        return search_by_id(
            index, item_id, k, max_distance, filters or [], as_json, not no_verify, not no_expand
        )
    try:
        ix, embedder = open_index_and_model(
            index, model, engine=engine, threads=threads or free_cores(), verify=not no_verify
        )
        checked = parse_filters(filters)
        ix.columns.check(checked)
    except (ImageIndexError, ModelError) as e:
        raise _fail(str(e) + _MODEL_HINT * (model is None and isinstance(e, ModelError))) from None

    queries, pil, all_hits, failed = _search_files(
        ix, embedder, images or [], k, max_distance, checked, not no_expand
    )
    if ix.adapted and not as_json:  # JSON output stays machine-readable; the projection is in index.json
        line = f"{ix.describe_projection()} ({ix.query_model_path()})"
        Console(soft_wrap=True).print(line, highlight=False)

    if as_json:
        counts = {"matched": ix.matching(checked), "total": len(ix)}
        out = [
            {"query": str(q), **counts, "results": [h.to_dict() for h in hits]}
            for q, hits in zip(queries, all_hits, strict=True)
        ]
        typer.echo(json.dumps(out + failed, indent=2))
    else:
        print_search_tables(queries, all_hits, failed)
    if grid is not None and pil:
        from uniembed.serve.grid import draw_grid

        draw_grid(pil, all_hits, ix, grid)
        if not as_json:
            Console().print(f"grid written to {grid}")
    if failed:
        raise typer.Exit(1)


def _search_files(
    ix: Any,
    embedder: Any,
    images: list[Path],
    k: int,
    max_distance: float | None,
    filters: list,
    expand: bool,
) -> tuple[list[Path], list[Any], list[list[Hit]], list[dict[str, str]]]:
    """(readable queries, their images, their hits, unreadable queries with the reason) for query files."""
    from uniembed.data.images import BadImageError, load_image

    queries, pil, failed = [], [], []
    for p in images:
        try:
            pil.append(load_image(p))
            queries.append(p)
        except BadImageError as e:
            failed.append({"query": str(p), "error": str(e)})
    vecs = embedder.embed_images(pil) if pil else None
    all_hits = ix.search_batch(vecs, k, max_distance, filters, expand=expand) if vecs is not None else []
    return queries, pil, all_hits, failed


def search_by_id(
    index: Path,
    item_id: int,
    k: int,
    max_distance: float | None,
    filters: list[str],
    as_json: bool,
    verify: bool,
    expand: bool = True,
) -> None:
    """``uniembed search --id N``: more like indexed item N from its stored vector (no model needed)."""
    from uniembed.serve.index import ImageIndex, ImageIndexError

    try:
        ix = ImageIndex.load(index, verify=verify)
        item = ix.item(item_id)
        if item is None:
            raise ImageIndexError(f"no item with id {item_id} in the index at {index}")
        hits = ix.search_batch(ix.vector(item_id), k, max_distance, filters, [item_id], expand)[0]
        matched = ix.matching(filters, [item_id])
    except ImageIndexError as e:
        raise _fail(str(e)) from None
    if as_json:
        out = {"query": f"id:{item_id}", "path": item["path"], "matched": matched, "total": len(ix)}
        typer.echo(json.dumps([{**out, "results": [h.to_dict() for h in hits]}], indent=2))
    else:
        print_search_tables([Path(f"id {item_id} ({item['path']})")], [hits], [])
        typer.echo(f"{len(hits)} results of {matched} matching ({len(ix)} indexed)")
