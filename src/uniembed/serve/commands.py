"""CLI: ``uniembed index`` (build/extend a FAISS index), ``uniembed search``, ``uniembed serve`` (HTTP).

Heavy imports (torch, faiss, fastapi) happen inside the commands so ``uniembed --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

INDEX_TYPE_HELP = (
    "FAISS index type: 'auto' (exact 'flat' below 20k images, 'hnsw' up to 500k, 'ivf' beyond), 'flat' "
    "(IndexFlatL2, exact), 'ivf' (IndexIVFFlat), 'ivfpq' (IndexIVFPQ, compressed), 'hnsw' (IndexHNSWFlat)."
)


EngineOption = Annotated[
    str,
    typer.Option(
        "--engine",
        help="How to run the model: 'auto' (the export's model.onnx in onnxruntime when export.json ties it "
        "to this saved_model.pt and it agrees on probe images, else TorchScript), 'torch' (always the "
        "TorchScript file), 'onnxruntime' (error if there is no verified model.onnx).",
    ),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="Intra-op CPU threads for the model (default: the cores not already busy, by load average).",
    ),
]

_MODEL_HINT = " (this is the model recorded in the index; pass --model to use another copy of it)"


def _fail(msg: str, code: int = 2) -> typer.Exit:
    """Print a one-line error (no stack trace) and return the Exit to raise."""
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {msg}", highlight=False)
    return typer.Exit(code)


#: `uniembed index` without --model: a collection-adapted index, the measured winner on the merged
#: leave-one-domain-out protocol (left-out mean 0.619 vs 0.591 for the fixed 64-d model; docs/search.md).
DEFAULT_ADAPT = "pcaw256"
DEFAULT_BACKBONE = "mobilenetv2+efficientnet_lite2"


def index_mode(
    model: Path | None, adapt: str | None, backbone: str | None, add: bool
) -> tuple[str | None, str | None]:
    """(adapt, backbone) to build with: a --model index as asked; without --model, an adapted index with the
    default spec / backbone filled in (--add reads both from the index it extends)."""
    if model is None and not add:
        return adapt or DEFAULT_ADAPT, backbone or DEFAULT_BACKBONE
    return adapt, backbone


def index_command(
    images: Annotated[
        list[Path],
        typer.Option(
            "--images",
            "-i",
            help="Images to index; repeatable. A "
            "labels.csv (path,label,domain; paths relative to the CSV), a "
            "folder holding labels.csv, a prepared shards folder "
            "(manifest.json), a folder of images labelled by parent "
            "folder name, or single image files.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Index directory to write (replaced atomically; with --add, extended)."
        ),
    ] = Path("artifacts/index"),
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="GUIE TorchScript saved_model.pt (or the export folder holding it) used to embed the "
            "images. Without it the index is collection-adapted (--adapt, default pcaw256 on "
            "mobilenetv2+efficientnet_lite2): it fits and stores its own query model.",
        ),
    ] = None,
    adapt: Annotated[
        str | None,
        typer.Option(
            "--adapt",
            help="Collection-adapted index: embed the images with the frozen --backbone, fit a projection "
            "on those features (no labels) and store it with a query model in the index. 'pca<D>' (PCA to D "
            "dims), 'pcaw<D>' (PCA + square-root whitening), 'pcaw<D>@<power>' (whitening power in [0,1]; "
            "1 = full whitening). D <= min(images, feature dim). With --add --refit: refit to this spec.",
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            "--backbone",
            help="With --adapt: backbone computing the features (mobilenetv2, efficientnet_lite0/1/2, "
            "timm:<name>, ...). With --add on an adapted index it defaults to the stored one.",
        ),
    ] = None,
    pooling: Annotated[
        str | None,
        typer.Option(
            "--pooling", help="With --adapt: the backbone's pooling (avg, gem, avg+stages, ...; default avg)."
        ),
    ] = None,
    refit: Annotated[
        bool,
        typer.Option(
            "--refit",
            help="With --add on an adapted index: refit the projection on all stored features (old + new) "
            "and rewrite every vector and the query model (without it, --add keeps the projection).",
        ),
    ] = False,
    index_type: Annotated[str, typer.Option("--type", "-t", help=INDEX_TYPE_HELP)] = "auto",
    add: Annotated[
        bool,
        typer.Option(
            "--add",
            help="Append the images to the existing index at --out without "
            "re-embedding what is already there. Refuses a different model (its "
            "fingerprint must match); paths already indexed are skipped.",
        ),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            "-b",
            min=1,
            help="Images per model forward (images are resized by the model's own preprocessing first, so "
            "sizes mix; for models without it, images of one size are batched together).",
        ),
    ] = 32,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Index at most this many images (quick trials).")
    ] = None,
    domain: Annotated[
        str,
        typer.Option(
            "--domain",
            help="Domain recorded for images from plain folders (labels.csv and shards carry their own).",
        ),
    ] = "",
    nlist: Annotated[
        int | None, typer.Option("--nlist", min=1, help="IVF: number of inverted lists (default ~4*sqrt(N)).")
    ] = None,
    nprobe: Annotated[
        int | None,
        typer.Option(
            "--nprobe",
            min=1,
            help="IVF: lists visited per query; higher = better recall, slower (default max(8, nlist/8)).",
        ),
    ] = None,
    pq_m: Annotated[
        int | None,
        typer.Option(
            "--pq-m",
            min=1,
            help="IVFPQ: sub-quantizers; must divide the embedding dim (default 16 for 64-d).",
        ),
    ] = None,
    pq_bits: Annotated[
        int | None,
        typer.Option("--pq-bits", min=1, max=16, help="IVFPQ: bits per sub-quantizer code (default 8)."),
    ] = None,
    hnsw_m: Annotated[
        int | None, typer.Option("--hnsw-m", min=2, help="HNSW: graph neighbours per node (default 32).")
    ] = None,
    ef_construction: Annotated[
        int | None,
        typer.Option("--ef-construction", min=1, help="HNSW: build-time search depth (default 80)."),
    ] = None,
    ef_search: Annotated[
        int | None,
        typer.Option(
            "--ef-search", min=1, help="HNSW: query-time search depth; higher = better recall (default 64)."
        ),
    ] = None,
    thumb_size: Annotated[
        int,
        typer.Option(
            "--thumb-size",
            min=16,
            max=1024,
            help="Longest side of the stored thumbnails served by `uniembed serve`.",
        ),
    ] = 160,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Embed images with a saved_model.pt (or, with --adapt, a backbone + a projection fitted on the images)
    and build (or --add to) a FAISS index for search and serve."""
    from rich.console import Console
    from rich.table import Table

    from uniembed.export.embedder import ModelError
    from uniembed.serve.index import INDEX_TYPES, ImageIndexError, build_index

    if index_type not in INDEX_TYPES:
        raise _fail(f"--type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    if adapt is not None and model is not None:
        raise _fail("--adapt fits its own projection and query model: give --backbone NAME, not --model")
    defaulted = model is None and adapt is None and not add
    adapt, backbone = index_mode(model, adapt, backbone, add)
    if model is not None and (backbone is not None or pooling is not None):
        raise _fail("--backbone/--pooling are only used with --adapt; a --model embeds the images itself")
    params = {
        k: v
        for k, v in {
            "nlist": nlist,
            "nprobe": nprobe,
            "pq_m": pq_m,
            "pq_bits": pq_bits,
            "hnsw_m": hnsw_m,
            "ef_construction": ef_construction,
            "ef_search": ef_search,
        }.items()
        if v is not None
    }
    try:
        res = build_index(
            model,
            images,
            out,
            index_type=index_type,
            add=add,
            batch_size=batch_size,
            params=params,
            limit=limit,
            domain=domain,
            thumb_size=thumb_size,
            engine=engine,
            threads=threads,
            adapt=adapt,
            backbone=backbone,
            pooling=pooling,
            refit=refit,
        )
    except (ImageIndexError, ModelError) as e:
        hint = (
            f" (no --model given: the default is --adapt {DEFAULT_ADAPT} --backbone {DEFAULT_BACKBONE}; "
            "pass a smaller --adapt pca<D>, or --model saved_model.pt)"
            if defaulted
            else ""
        )
        raise _fail(str(e) + hint) from None
    console = Console()
    t = Table(title=f"index {res.out_dir}", show_header=False)
    t.add_row("images in index", str(res.count))
    t.add_row("added now", str(res.added))
    t.add_row("skipped", f"{len(res.skipped)} " + (str(res.skipped_counts) if res.skipped else ""))
    t.add_row("index", f"{res.index_type} {res.params or ''}")
    t.add_row("model fingerprint", res.fingerprint)
    if res.adapt:
        a = res.adapt
        t.add_row(
            "projection",
            f"{a['spec']} ({a['dim']}-d of {a['backbone']} {a['feature_dim']}-d, fitted on {a['fitted_on']} "
            f"images, {a['explained_variance']:.1%} of the variance) -> {res.out_dir / a['query_model']}",
        )
    t.add_row("engine", f"{res.embedder.get('engine')}, {res.embedder.get('threads')} thread(s)")
    t.add_row("time", f"{res.seconds:.1f} s ({res.added / max(res.seconds, 1e-9):.0f} images/s)")
    console.print(t)
    for s in res.skipped[:10]:
        console.print(f"  skipped {s['path']}: {s['reason']} {s.get('detail', '')}", highlight=False)
    if len(res.skipped) > 10:
        console.print(f"  … {len(res.skipped) - 10} more in {res.out_dir / 'index.json'}")


def search_command(
    images: Annotated[list[Path], typer.Argument(help="Query image file(s).")],
    index: Annotated[
        Path, typer.Option("--index", help="Index directory written by `uniembed index`.")
    ] = Path("artifacts/index"),
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Number of results per query.")] = 5,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="saved_model.pt to embed queries with "
            "(default: the model recorded in the index; it must have the "
            "same fingerprint). An index built with --adapt uses its own query_model.pt.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print results as JSON instead of a table.")
    ] = False,
    grid: Annotated[
        Path | None, typer.Option("--grid", help="Also draw each query beside its results into this PNG.")
    ] = None,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Find the indexed images nearest to each query image (top-k with distances, labels and paths)."""
    from rich.console import Console
    from rich.table import Table

    from uniembed.core.runtime import free_cores
    from uniembed.data.images import BadImageError, load_image
    from uniembed.export.embedder import ModelError
    from uniembed.serve.index import ImageIndexError, open_index_and_model

    try:
        ix, embedder = open_index_and_model(index, model, engine=engine, threads=threads or free_cores())
    except (ImageIndexError, ModelError) as e:
        raise _fail(str(e) + _MODEL_HINT * (model is None and isinstance(e, ModelError))) from None

    queries, pil, failed = [], [], []
    for p in images:
        try:
            pil.append(load_image(p))
            queries.append(p)
        except BadImageError as e:
            failed.append({"query": str(p), "error": str(e)})
    all_hits = ix.search_batch(embedder.embed_images(pil), k) if pil else []
    if ix.adapted and not as_json:  # JSON output stays machine-readable; the projection is in index.json
        line = f"{ix.describe_projection()} ({ix.query_model_path()})"
        Console(soft_wrap=True).print(line, highlight=False)

    if as_json:
        out = [
            {"query": str(q), "results": [h.to_dict() for h in hits]}
            for q, hits in zip(queries, all_hits, strict=True)
        ]
        typer.echo(json.dumps(out + failed, indent=2))
    else:
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
    if grid is not None and pil:
        from uniembed.serve.grid import draw_grid

        draw_grid(pil, all_hits, ix, grid)
        if not as_json:
            Console().print(f"grid written to {grid}")
    if failed:
        raise typer.Exit(1)


def serve_command(
    index: Annotated[
        Path, typer.Option("--index", help="Index directory written by `uniembed index`.")
    ] = Path("artifacts/index"),
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="saved_model.pt for query embeddings "
            "(default: the one recorded in the index; an index built with --adapt uses its own "
            "query_model.pt). The service refuses to start if its fingerprint differs from the index's.",
        ),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (127.0.0.1 = this machine only).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port to listen on.")] = 8000,
    max_upload_mb: Annotated[
        float,
        typer.Option(
            "--max-upload-mb", min=0.01, help="Largest accepted upload in MiB; bigger requests get HTTP 413."
        ),
    ] = 10.0,
    default_k: Annotated[
        int, typer.Option("--default-k", min=1, help="Results per query when the request gives no k.")
    ] = 5,
    max_k: Annotated[int, typer.Option("--max-k", min=1, help="Largest k a request may ask for.")] = 100,
    log_level: Annotated[
        str, typer.Option("--log-level", help="uvicorn log level (debug, info, warning, error).")
    ] = "info",
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Serve image search over HTTP: page at /, POST /search, POST /embed, GET /health, GET /thumb/{id}."""
    import faiss
    import uvicorn

    from uniembed.core.runtime import free_cores
    from uniembed.export.embedder import ModelError
    from uniembed.serve.app import create_app
    from uniembed.serve.index import ImageIndexError, open_index_and_model

    try:
        ix, embedder = open_index_and_model(index, model, engine=engine, threads=threads or free_cores())
        app = create_app(
            index,
            max_upload_mb=max_upload_mb,
            default_k=default_k,
            max_k=max(max_k, default_k),
            embedder=embedder,
        )
    except (ImageIndexError, ModelError) as e:
        hint = _MODEL_HINT * (model is None and isinstance(e, ModelError))
        raise _fail(f"not starting: {e}{hint}") from None
    # One query per request: FAISS's OpenMP threads only add overhead and contend between requests.
    faiss.omp_set_num_threads(1)
    typer.echo(
        f"serving {len(app.state.index)} images (model {embedder.fingerprint}, {embedder.engine}) "
        f"on http://{host}:{port}/"
    )
    if app.state.index.adapted:
        typer.echo(app.state.index.describe_projection())
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def register(app: typer.Typer) -> None:
    """Add ``index``, ``search`` and ``serve``."""
    app.command("index")(index_command)
    app.command("search")(search_command)
    app.command("serve")(serve_command)
