"""``uniembed extract``: cache frozen backbone features of a prepared dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from uniembed.features.cache import ExtractResult

_DATASET = typer.Argument(
    ...,
    help="Prepared dataset folder (manifest.json + shard-*.tar, from `uniembed prepare`), or an "
    "image source as `uniembed prepare` takes it (a labels.csv, imagefolder:DIR:domain=D, gldv2:DIR, "
    "...): its files are then read directly, with no shard pass.",
)
_BACKBONE = typer.Option(
    "mobilenetv2",
    "--backbone",
    "-b",
    help="Backbone: mobilenetv2, efficientnet_lite0/1/2 (offline weights), timm:<model> or "
    "open_clip:<arch>/<pretrained tag> (downloaded by those libraries).",
)
_POOLING = typer.Option(
    "avg",
    "--pooling",
    "-p",
    help="Global pooling of the last feature map: avg or gem (GeM, p=3; gem4 sets p=4). Add "
    "'+stages' (e.g. avg+stages) to concatenate pooled maps of several stages, or '+stages_l2' "
    "(avg+stages_l2) to L2-normalise each stage before joining (mobilenetv2, efficientnet_lite*). "
    "timm: also 'native' (the model's own pooling, e.g. a ViT's class token). End with '+colour' "
    "(e.g. avg+stages_l2+colour, the make model recipe) to append a 512-bin colour histogram block.",
)
_OUT = typer.Option(
    Path("artifacts/features"),
    "--out",
    "-o",
    help="Root folder; features go to <out>/<backbone>-<fingerprint>-<dataset hash>/.",
)
_ENGINE = typer.Option(
    "auto",
    "--engine",
    "-e",
    help="auto (ONNX Runtime on CPU, torch on GPU), torch, onnxruntime (threads sleep when idle: "
    "best beside decode workers and on shared machines) or onnxruntime-spin (ONNX Runtime's "
    "busy-waiting threads, for dedicated many-core machines).",
)
_BATCH_SIZE = typer.Option(64, "--batch-size", min=1, help="Images per model call.")
_THREADS = typer.Option(
    None, "--threads", min=1, help="Intra-op threads of the model (default: all available cores)."
)
_WORKERS = typer.Option(
    None,
    "--workers",
    min=0,
    help="Decode worker processes, each taking whole shards (0 = decode in the main process; "
    "default: 1 on small CPUs, more on larger machines).",
)
_RANDOM_WEIGHTS = typer.Option(
    False, "--random-weights", help="Random (seeded) weights instead of pretrained ones, for tests."
)
_DEVICE = typer.Option(
    None, "--device", help="torch device for the torch engine (default: cuda if available, else cpu)."
)
_COMPILE = typer.Option(False, "--compile", help="torch.compile the model (torch engine only).")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
_CHECKPOINT = typer.Option(
    30.0,
    "--checkpoint-seconds",
    min=0.0,
    help="Save the progress of unfinished shards this often (and on Ctrl-C); a rerun continues from it.",
)
_RAY = typer.Option(
    None,
    "--ray",
    metavar="auto|HOST:PORT",
    help="Run on a Ray cluster (pip install 'uniembed\\[cluster]'): 'auto' joins the cluster of "
    "RAY_ADDRESS or a running local one, else starts a local one; HOST:PORT joins that head. Same cache, "
    "same features; finished blocks survive a killed run and a rerun resumes from them.",
)
_RAY_ACTORS = typer.Option(
    None, "--ray-actors", min=1, help="Model replicas (default: as many as the cluster's CPUs/GPUs fit)."
)
_RAY_CPUS = typer.Option(1.0, "--ray-cpus-per-actor", min=0.0, help="CPUs each model actor reserves.")
_RAY_GPUS = typer.Option(
    0.0, "--ray-gpus-per-actor", min=0.0, help="GPUs each model actor reserves (> 0: torch on the GPU)."
)
_RAY_TASK_CPUS = typer.Option(1.0, "--ray-cpus-per-task", min=0.01, help="CPUs each decode task reserves.")


def register(app: typer.Typer) -> None:
    """Add this stage's sub-commands to ``app``."""
    app.command("extract")(extract_cmd)


def extract_cmd(
    dataset_dir: str = _DATASET,
    backbone: str = _BACKBONE,
    pooling: str = _POOLING,
    out: Path = _OUT,
    engine: str = _ENGINE,
    batch_size: int = _BATCH_SIZE,
    threads: int | None = _THREADS,
    workers: int | None = _WORKERS,
    random_weights: bool = _RANDOM_WEIGHTS,
    device: str | None = _DEVICE,
    compile: bool = _COMPILE,
    quiet: bool = _QUIET,
    checkpoint_seconds: float = _CHECKPOINT,
    ray: str | None = _RAY,
    ray_actors: int | None = _RAY_ACTORS,
    ray_cpus_per_actor: float = _RAY_CPUS,
    ray_gpus_per_actor: float = _RAY_GPUS,
    ray_cpus_per_task: float = _RAY_TASK_CPUS,
) -> None:
    """Extract pooled frozen-backbone features of every image of a prepared dataset (or of an image source
    read directly).

    Cached: a rerun with the same backbone, weights, pooling and dataset returns at once.

    Resumable: a killed or interrupted run continues from its last checkpoint (every --checkpoint-seconds).

    Cluster: --ray runs it as Ray Data batch inference (decode tasks, an actor pool of models).
    """
    from uniembed.core.interrupt import exit_on_interrupt

    common = dict(
        backbone=backbone,
        out_root=out,
        pooling=pooling,
        engine=engine,
        batch_size=batch_size,
        threads=threads,
        workers=workers,
        pretrained=not random_weights,
        device=device,
        progress=not quiet,
        checkpoint_seconds=checkpoint_seconds,
    )
    with exit_on_interrupt():
        cluster = ray_request(ray, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor, ray_cpus_per_task)
        result = _run_extract(dataset_dir, compile, common, cluster)
    _print_summary(result)


def ray_request(
    address: str | None,
    actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float,
    cpus_per_task: float,
) -> dict[str, Any] | None:
    """The ``--ray*`` options as ``features.ray_extract.RayOptions`` fields (None: no cluster)."""
    if address is None:
        return None
    return dict(
        address=address,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        cpus_per_task=cpus_per_task,
    )


def _run_extract(
    dataset_dir: str, compile: bool, common: dict[str, Any], cluster: dict[str, Any] | None = None
) -> ExtractResult:
    """Extract through the shards or straight from the files; user errors exit with status 1, a damaged input
    file (manifest, shard) with status 2.

    A prepared dataset (or any plain folder, which then gets extract's own "not prepared" error) goes
    through the shards; a labels.csv, a folder holding one, or a KIND:PATH spec is read directly."""
    from uniembed.core.integrity import DamagedFileError
    from uniembed.data.sources import DataError
    from uniembed.features import extract as ex

    arg = Path(dataset_dir)
    direct = not arg.is_dir() or ((arg / "labels.csv").exists() and not (arg / "manifest.json").exists())
    try:
        if cluster is not None:
            return _run_on_ray([dataset_dir] if direct else dataset_dir, common, cluster)
        if direct:
            return ex.extract_files_with_stats([dataset_dir], **common)
        return ex.extract_with_stats(dataset_dir, compile=compile, **common)
    except (ex.ExtractError, DataError, KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        typer.echo(f"extract failed: {msg}", err=True)
        raise typer.Exit(code=2 if isinstance(e, DamagedFileError) else 1) from None


def _run_on_ray(source: str | list[str], common: dict[str, Any], cluster: dict[str, Any]) -> ExtractResult:
    """The Ray path (``features/ray_extract.py``); decode workers and checkpoints are Ray's business there."""
    from uniembed.features import ray_extract as rx

    opts = {k: v for k, v in common.items() if k not in ("workers", "checkpoint_seconds")}
    return rx.extract_ray_with_stats(source, ray=rx.RayOptions(**cluster), **opts)


def _print_summary(result: ExtractResult) -> None:
    """The feature directory on the first line (plain echo, not rich, so it never wraps: scripts read it),
    then count, width, speed and skipped images."""
    path, st = result.path, result.stats
    info = json.loads((path / "info.json").read_text())
    typer.echo(str(path))
    if st.cached:
        speed = "cached (nothing to do)"
    else:
        reused = [f"{st.reused_shards} shard(s) reused"] if st.reused_shards else []
        if info.get("ray", {}).get("reused_blocks"):
            reused.append(f"{info['ray']['reused_blocks']} block(s) reused")
        if info.get("resumed_images"):
            reused.append(f"{info['resumed_images']} image(s) resumed from a checkpoint")
        speed = f"{st.images_per_s:.1f} images/s ({', '.join([st.engine, *reused])})"
    skipped = info.get("skipped", [])
    typer.echo(
        f"count={info['count']} dim={info['dim']} backbone={info['backbone']} pooling={info['pooling']} "
        f"skipped={len(skipped)} speed={speed}"
    )
    if skipped:
        counts = ", ".join(f"{k}: {v}" for k, v in info.get("skipped_counts", {}).items())
        typer.echo(f"skipped images by reason: {counts}")
