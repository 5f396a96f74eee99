"""CLI: ``uniembed index`` (build/extend a FAISS index), ``uniembed search``, ``uniembed serve`` (HTTP).

Heavy imports (torch, faiss, fastapi) happen inside the commands so ``uniembed --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uniembed.features.commands import ray_request
from uniembed.serve.cli_options import (
    AdaptOption,
    AddOption,
    AllowEditsOption,
    BackboneOption,
    BatchSizeOption,
    DefaultKOption,
    DomainOption,
    EditTokenOption,
    EfConstructionOption,
    EfSearchOption,
    EngineOption,
    HnswMOption,
    ImagesOption,
    IndexModelOption,
    IndexTypeOption,
    LimitOption,
    MaxConcurrentOption,
    MaxKOption,
    MaxPixelsOption,
    MaxUploadOption,
    NlistOption,
    NoVerifyOption,
    NprobeOption,
    OutOption,
    PoolingOption,
    PqBitsOption,
    PqMOption,
    QueueOption,
    QueueTimeoutOption,
    RayActorsOption,
    RayCpusOption,
    RayGpusOption,
    RayOption,
    RayTaskCpusOption,
    RefitOption,
    RemoveFromOption,
    RemoveOption,
    ShardsOption,
    ThreadsOption,
    ThumbSizeOption,
)
from uniembed.serve.limits import (
    DEFAULT_K,
    DEFAULT_MAX_MEGAPIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_QUEUE,
    DEFAULT_QUEUE_WAIT_S,
    MAX_K,
    ServiceLimits,
)

if TYPE_CHECKING:  # pragma: no cover
    from uniembed.serve.build import BuildResult

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


def run_index(
    images: list[Path],
    out: Path,
    model: Path | None,
    adapt: str | None,
    backbone: str | None,
    pooling: str | None,
    index_type: str,
    add: bool,
    **build_options: Any,
) -> BuildResult:
    """Check the option combination, fill in the adapted default without --model, and build; every
    user-facing error becomes a one-line exit."""
    from uniembed.core.interrupt import RESTART_HINT, exit_on_interrupt
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
    try:
        with exit_on_interrupt(RESTART_HINT):
            return build_index(
                model,
                images,
                out,
                index_type=index_type,
                add=add,
                adapt=adapt,
                backbone=backbone,
                pooling=pooling,
                **build_options,
            )
    except (ImageIndexError, ModelError) as e:
        hint = (
            f" (no --model given: the default is --adapt {DEFAULT_ADAPT} --backbone {DEFAULT_BACKBONE}; "
            "pass a smaller --adapt pca<D>, or --model saved_model.pt)"
            if defaulted
            else ""
        )
        raise _fail(str(e) + hint) from None


def print_build_summary(res: BuildResult) -> None:
    """The table ``uniembed index`` prints, then the first skipped images with their reasons."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"index {res.out_dir}", show_header=False)
    t.add_row("images in index", str(res.count))
    t.add_row("added now", str(res.added))
    t.add_row("skipped", f"{len(res.skipped)} " + (str(res.skipped_counts) if res.skipped else ""))
    t.add_row("index", f"{res.index_type} {res.params or ''}")
    t.add_row("model fingerprint", res.fingerprint)
    if res.recall:
        r = res.recall
        t.add_row(
            f"recall@{r['k']}",
            f"{r['recall']:.3f} vs exact search ({r['queries']} queries, nprobe {r['nprobe']})",
        )
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


def index_command(
    images: ImagesOption = None,
    out: OutOption = Path("artifacts/index"),
    model: IndexModelOption = None,
    adapt: AdaptOption = None,
    backbone: BackboneOption = None,
    pooling: PoolingOption = None,
    refit: RefitOption = False,
    index_type: IndexTypeOption = "auto",
    add: AddOption = False,
    batch_size: BatchSizeOption = 32,
    limit: LimitOption = None,
    domain: DomainOption = "",
    nlist: NlistOption = None,
    nprobe: NprobeOption = None,
    pq_m: PqMOption = None,
    pq_bits: PqBitsOption = None,
    hnsw_m: HnswMOption = None,
    ef_construction: EfConstructionOption = None,
    ef_search: EfSearchOption = None,
    thumb_size: ThumbSizeOption = 160,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    no_verify: NoVerifyOption = False,
    remove: RemoveOption = None,
    remove_from: RemoveFromOption = None,
    ray: RayOption = None,
    ray_actors: RayActorsOption = None,
    ray_cpus_per_actor: RayCpusOption = 1.0,
    ray_gpus_per_actor: RayGpusOption = 0.0,
    ray_cpus_per_task: RayTaskCpusOption = 1.0,
    shards: ShardsOption = None,
) -> None:
    """Embed images with a saved_model.pt (or, with --adapt, a backbone + a projection fitted on the images)
    and build (or --add to) a FAISS index for search and serve; or --remove items from it."""
    if remove or remove_from is not None:
        from uniembed.serve.edit_cli import run_remove

        if images or add:
            raise _fail("--remove edits the index at --out: run it without --images/--add (add separately)")
        run_remove(out, remove or [], remove_from, verify=not no_verify)
        return
    if not images:
        raise _fail("give --images SOURCE to index (or --remove ID_OR_PATH to remove items from --out)")
    overrides = dict(nlist=nlist, nprobe=nprobe, pq_m=pq_m, pq_bits=pq_bits, hnsw_m=hnsw_m)
    overrides.update(ef_construction=ef_construction, ef_search=ef_search)
    res = run_index(
        images,
        out,
        model,
        adapt,
        backbone,
        pooling,
        index_type,
        add,
        refit=refit,
        batch_size=batch_size,
        params={k: v for k, v in overrides.items() if v is not None},
        limit=limit,
        domain=domain,
        thumb_size=thumb_size,
        engine=engine,
        threads=threads,
        verify=not no_verify,
        shards=shards,
        ray=ray_request(ray, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor, ray_cpus_per_task),
    )
    print_build_summary(res)


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
    max_upload_mb: MaxUploadOption = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_MEGAPIXELS,
    max_concurrent: MaxConcurrentOption = None,
    queue: QueueOption = DEFAULT_QUEUE,
    queue_timeout: QueueTimeoutOption = DEFAULT_QUEUE_WAIT_S,
    default_k: DefaultKOption = DEFAULT_K,
    max_k: MaxKOption = MAX_K,
    log_level: Annotated[
        str, typer.Option("--log-level", help="uvicorn log level (debug, info, warning, error).")
    ] = "info",
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    no_verify: NoVerifyOption = False,
    allow_edits: AllowEditsOption = False,
    edit_token: EditTokenOption = None,
) -> None:
    """Serve image search over HTTP: page at /, POST /search, GET /search?id=N (more like this), GET /facets,
    POST /embed, GET /health, GET /thumb/{id}. Searches take k, max_distance and repeatable filter=COL=VALUE.

    The index is loaded once at start: restart the server to serve what a later `uniembed index --add` added.
    With --allow-edits and a token, POST /items and DELETE /items/{id} edit the live index (atomically).

    Memory: an upload over --max-upload-mb gets HTTP 413; one over --max-pixels gets HTTP 422 (checked from
    its header, before decoding). The rest are decoded straight to about the model's input size, at most
    --max-concurrent at a time; others wait in a --queue and get HTTP 503 with Retry-After when it is full or
    --queue-timeout passes. Freed memory goes back to the OS after each upload (glibc malloc_trim); if RSS
    still stays high after bursts, MALLOC_ARENA_MAX=2 in the environment limits glibc's per-thread heaps.
    """
    from uniembed.serve.listen import StartError, run_service

    limits = ServiceLimits(
        max_upload_mb=max_upload_mb,
        default_k=default_k,
        max_k=max(max_k, default_k),
        max_megapixels=max_pixels,
        max_concurrent=max_concurrent,
        queue=queue,
        queue_wait_s=queue_timeout,
    )
    if allow_edits and not (edit_token or "").strip():
        raise _fail("--allow-edits needs a token: --edit-token TOKEN or the UNIEMBED_EDIT_TOKEN variable")
    try:
        started = run_service(
            index,
            model,
            limits,
            host,
            port,
            engine,
            threads,
            not no_verify,
            log_level,
            edit_token=edit_token.strip() if allow_edits and edit_token else None,
        )
    except StartError as e:
        raise _fail(str(e) + _MODEL_HINT * e.model_hint) from None
    if not started:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``index``, ``search`` and ``serve``."""
    app.command("index")(index_command)
    from uniembed.serve.search_cli import search_command

    app.command("search")(search_command)
    app.command("serve")(serve_command)
