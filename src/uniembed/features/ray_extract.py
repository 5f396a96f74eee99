"""Extraction on a Ray cluster (``uniembed extract --ray``): Ray Data batch inference over the blocks of
``ray_blocks.py``, writing the very feature cache the single-process path writes.

The pipeline: a Ray Dataset with one row per block -> ``map_batches`` *tasks* decode and squash-resize the
block's images into the single-process batches -> ``map_batches`` over an *actor pool* (``ActorPoolStrategy``,
``num_cpus`` / ``num_gpus`` per actor) runs the engine of ``engines.py`` (ONNX Runtime on CPU, torch when
the actor got a GPU) -> the driver writes each block's part file as soon as its last batch is back. Ray
restarts lost actors and retries lost tasks (a worker node dying mid-run); a run that dies anyway is rerun
and recomputes only the blocks without a part file.

Items travel between the stages pickled in one binary column, so any caller can ship its own decode
function and model factory through :func:`map_on_ray` (``uniembed index --ray`` does).

Ray is imported inside functions only: the CLI and every non-Ray path never load it.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.ray_cluster import ray_session as _ray_session
from uniembed.features.cache import (
    ExtractResult,
    ExtractStats,
    as_backbone,
    cached_result,
    feature_dir_for,
    feature_info,
)
from uniembed.features.engines import ExtractError, resolve_engine
from uniembed.features.pixels import PIPELINE_VERSION
from uniembed.features.ray_blocks import (
    BLOCK_BATCHES,
    Block,
    BlockCollector,
    assemble,
    block_stamp,
    decode_block,
    file_blocks,
    reusable_blocks,
    shard_blocks,
)
from uniembed.features.store import write_feature_set
from uniembed.models.registry import Backbone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` "auto" (``ray.init()``: the cluster of RAY_ADDRESS or a running local
    one, else a new local one) or HOST:PORT; ``actors`` model replicas (None: as many as the cluster's CPUs
    fit); resources per actor and per decode task."""

    address: str = "auto"
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    cpus_per_task: float = 1.0
    block_batches: int = BLOCK_BATCHES

    def check(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ExtractError("--ray-actors must be at least 1")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0 or self.cpus_per_task <= 0:
            raise ExtractError("--ray-cpus-per-actor/--ray-gpus-per-actor must be >= 0, task CPUs > 0")
        if self.cpus_per_actor == 0 and self.gpus_per_actor == 0:
            raise ExtractError(
                "an actor needs some CPU or GPU: set --ray-cpus-per-actor or --ray-gpus-per-actor"
            )


def ray_session(address: str) -> Any:
    """Ray connected to ``address`` for this stage (``core.ray_cluster``); failures are ``ExtractError``."""
    return _ray_session(address, ExtractError)


def _actors(ray: Any, opts: RayOptions, n_blocks: int) -> int:
    """Actor pool size: as asked, else what the cluster's CPUs (or GPUs) fit beside one decode task each."""
    if opts.actors is not None:
        return opts.actors
    res = ray.cluster_resources()
    if opts.gpus_per_actor > 0:
        n = int(res.get("GPU", 0) // opts.gpus_per_actor)
    else:
        n = int(res.get("CPU", 1) // (opts.cpus_per_actor + opts.cpus_per_task))
    return max(1, min(n, n_blocks))


def _decode_udf(batch: dict[str, np.ndarray], decode: Callable[[Any], Iterator[Any]]) -> Iterator[dict]:
    """Ray task body: every input row -> its items, one pickled item per output row (streamed)."""
    for raw in batch["row"]:
        for item in decode(pickle.loads(raw)):
            yield {"item": np.array([pickle.dumps(item, protocol=5)], dtype=object)}


class _ModelActor:
    """Ray actor body: builds its model once from the factory, then maps pickled items through it."""

    def __init__(self, factory: Callable[[], Callable[[Any], Any]]):
        self.model = factory()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [pickle.dumps(self.model(pickle.loads(raw)), protocol=5) for raw in batch["item"]]
        return {"item": np.array(out, dtype=object)}


def map_on_ray(
    rows: list[Any],
    decode: Callable[[Any], Iterator[Any]],
    factory: Callable[[], Callable[[Any], Any]],
    opts: RayOptions,
) -> Iterator[Any]:
    """``factory()(item)`` for every item ``decode(row)`` yields, over all ``rows``, on the cluster: decode in
    tasks, the model in an actor pool. Yields the results as they come back (not in order: items should say
    where they belong). ``decode`` and ``factory`` must be picklable (module-level functions, dataclasses)."""
    opts.check()
    with ray_session(opts.address) as ray:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": we know
        ds = ray.data.from_items([{"row": pickle.dumps(r)} for r in rows], override_num_blocks=len(rows))
        ds = ds.map_batches(
            _decode_udf, batch_size=1, num_cpus=opts.cpus_per_task, fn_kwargs={"decode": decode}
        )
        remote: dict[str, Any] = {"num_cpus": opts.cpus_per_actor}
        if opts.gpus_per_actor:
            remote["num_gpus"] = opts.gpus_per_actor
        ds = ds.map_batches(
            _ModelActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=_actors(ray, opts, len(rows))),
            fn_constructor_kwargs={"factory": factory},
            **remote,
        )
        for row in ds.iter_rows():
            yield pickle.loads(row["item"])


# ---------------------------------------------------------------------------------- feature extraction


@dataclass(frozen=True)
class BlockDecoder:
    """Picklable ``decode`` for :func:`map_on_ray`: a block -> its single-process batches."""

    pre: Any  # PreprocessConfig
    batch_size: int
    draft: bool

    def __call__(self, block: Block) -> Iterator[dict]:
        return decode_block(block, self.pre, self.batch_size, self.draft)


@dataclass
class FeatureModel:
    """Picklable model factory: the backbone's engine runner (``engines.make_runner``), built in the actor.
    ``threads`` None: the actor's CPUs (at least 1)."""

    backbone: Backbone
    engine: str
    threads: int | None
    device: str | None

    def __call__(self) -> Callable[[dict], dict]:
        from uniembed.features.engines import make_runner

        runner = make_runner(self.backbone, self.engine, threads=self.threads, device=self.device)
        dim = self.backbone.dim

        def embed(item: dict) -> dict:
            px = item.pop("pixels")
            n = 0 if px is None else int(px.shape[0])
            item["features"] = np.asarray(runner(px), np.float32) if n else np.zeros((0, dim), np.float32)
            item["engine"] = runner.engine
            return item

        return embed


@dataclass
class _Job:
    """What to extract: the blocks, the data's identity and how raw batch lists become cache rows."""

    blocks: list[Block]
    mhash: str
    dataset_dir: str | None
    labels: list[str]
    total: int
    rows: Callable[[list, list], tuple[list, list]]
    extra: dict[str, Any]


def _shards_job(dataset_dir: str | Path) -> _Job:
    from uniembed.features.extract import _open_dataset

    ds, manifest, shards, mhash = _open_dataset(dataset_dir)
    labels = list(manifest.get("labels", []))
    return _Job(shard_blocks(shards), mhash, str(ds), labels, int(manifest.get("count", 0)), _as_is, {})


def _as_is(meta: list, bad: list) -> tuple[list, list]:
    return meta, bad


def _files_job(sources: list[str], batch_size: int, block_batches: int) -> _Job:
    from uniembed.data.sources import DataError, parse_sources
    from uniembed.features.files import _meta_rows, files_hash

    try:
        records = [r for s in parse_sources(list(sources)) for r in s.records()]
    except DataError as e:
        raise ExtractError(str(e)) from e
    if not records:
        raise ExtractError(f"no images found in {', '.join(map(str, sources))}")
    labels = sorted({r.label for r in records})

    def rows(meta: list, bad: list) -> tuple[list, list]:
        skipped = [{"path": records[int(i)].path, "reason": str(r)} for i, r in bad]
        return _meta_rows(records, np.asarray(meta, np.int64), labels), skipped

    blocks = file_blocks([r.path for r in records], batch_size, block_batches)
    mhash = "files-" + files_hash(records)
    return _Job(blocks, mhash, None, labels, len(records), rows, {"sources": [str(s) for s in sources]})


def extract_ray_with_stats(
    source: str | Path | list[str],
    backbone: str | Backbone = "mobilenetv2",
    ray: RayOptions | None = None,
    out_root: str | Path = "artifacts/features",
    pooling: str = "avg",
    engine: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
    pretrained: bool = True,
    device: str | None = None,
    progress: bool = True,
    draft: bool = True,
) -> ExtractResult:
    """``extract_with_stats`` (a prepared dataset folder) or ``extract_files_with_stats`` (a list of image
    sources) on a Ray cluster: same cache folder, same files, same features in the same order.

    Finished blocks are kept in ``<out>/parts/block-*.npz`` until the end, so a rerun of a killed run
    computes only the blocks it had not finished (``info.json`` ``ray.reused_blocks``)."""
    t_start = time.perf_counter()
    opts = ray or RayOptions()
    opts.check()
    if batch_size < 1:
        raise ExtractError("batch_size must be at least 1")
    files = isinstance(source, list)
    job = _files_job(source, batch_size, opts.block_batches) if files else _shards_job(source)
    bb = as_backbone(backbone, pretrained=pretrained, pooling=pooling)
    fp = bb.fingerprint()
    out = feature_dir_for(out_root, bb, job.mhash)
    hit = cached_result(out, fp, job.mhash, draft, t_start)
    if hit is not None:
        return hit
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    base = {"fingerprint": fp, "manifest_hash": job.mhash, "dim": bb.dim, "pipeline": PIPELINE_VERSION}
    stamp = block_stamp(dict(base, draft=draft), batch_size, opts.block_batches)
    done, todo = reusable_blocks(job.blocks, parts, stamp)
    resumed = sum(len(m) + len(b) for _, m, b in done.values())
    collector = BlockCollector(parts, stamp, bb.dim, done, job.rows)
    stats = ExtractStats(engine=resolve_engine(engine, device))
    t0 = time.perf_counter()
    if todo:
        _prepare_engine(bb, engine, device)
        model = FeatureModel(bb, engine, threads or max(1, int(opts.cpus_per_actor)), device)
        decoder = BlockDecoder(bb.preprocess, batch_size, draft)
        stats.engine = _run(todo, decoder, model, opts, collector, job.total - resumed, progress, bb.name)
    stats.images = collector.images
    stats.seconds = time.perf_counter() - t0
    feats, meta, skipped = assemble(done, len(job.blocks), bb.dim)
    if not meta:
        raise ExtractError(f"no decodable images in {source} ({len(skipped)} skipped)")
    stats.skipped = skipped
    record = {
        "address": opts.address,
        "blocks": len(job.blocks),
        "reused_blocks": len(job.blocks) - len(todo),
    }
    record.update(actors=opts.actors, cpus_per_actor=opts.cpus_per_actor, gpus_per_actor=opts.gpus_per_actor)
    info = feature_info(bb, job.mhash, job.dataset_dir, stats, draft, **job.extra, resumed_images=resumed)
    info["ray"] = record
    write_feature_set(out, feats, meta, info, job.labels)
    shutil.rmtree(parts, ignore_errors=True)
    return ExtractResult(out, stats)


def _prepare_engine(bb: Backbone, engine: str, device: str | None) -> None:
    """Export the ONNX model once here, so actors on this machine find it in the cache instead of each
    exporting it at the same time."""
    if resolve_engine(engine, device).startswith("onnxruntime"):
        from uniembed.features.engines import export_onnx, onnx_cache_path

        path = onnx_cache_path(bb)
        if not path.exists():
            try:
                export_onnx(bb, path)
            except Exception as e:  # noqa: BLE001 - the actors fall back (or fail) exactly as make_runner does
                log.warning("ONNX export failed for %s (%s)", bb.name, e)


def _run(
    todo: list[Block],
    decoder: BlockDecoder,
    model: FeatureModel,
    opts: RayOptions,
    collector: BlockCollector,
    total: int,
    progress: bool,
    name: str,
) -> str:
    """Feed the blocks through the cluster into ``collector``; returns the engine the actors ran."""
    from tqdm.auto import tqdm

    engine = ""
    with tqdm(
        total=max(0, total) or None, unit="img", desc=f"extract {name} (ray)", disable=not progress
    ) as bar:
        for item in map_on_ray(todo, decoder, model, opts):
            if item.get("error"):
                raise ExtractError(f"cannot read shard: {item['error']}")
            engine = item.get("engine", engine)
            meta, bad = item["meta"], item["bad"]
            bar.update(collector.take(item["block"], item["seq"], item["last"], item["features"], meta, bad))
    return engine
