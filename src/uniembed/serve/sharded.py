"""Sharded, compressed IVF-PQ indexes for collections of 10M+ vectors.

Build: train the coarse quantizer and the product quantizer once, on a sample; fill N shards in parallel
(Ray tasks with ``address``, else one after the other in this process), each an empty copy of the trained
index that adds its slice of the vectors with their global ids (= FAISS rows = items.csv rows); merge the
shards on disk into FAISS on-disk inverted lists: ``index.faiss`` (quantizer + codebooks, small) and
``index.ivfdata`` (codes + ids). Serve: ``sharded_io.read_sharded`` maps the lists read-only; only the
lists a query probes are paged in, so a serving node needs RAM for the centroids, not for the codes.

A shard travels back to the driver as its serialized bytes (codes and ids: ``pq_m + 8`` bytes a vector), so
cluster nodes need no shared file system. Ray is imported only when ``address`` is given.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.ray_cluster import ray_session as _ray_session
from uniembed.serve.errors import ImageIndexError
from uniembed.serve.faiss_index import SHARDED_TYPE
from uniembed.serve.sharded_io import IVFDATA_FILE, quiet_faiss, read_sharded, tune_and_measure

INDEX_FILE = "index.faiss"
#: FAISS on-disk lists hold at most this many lists comfortably; 4*sqrt(N) reaches it at N ~ 268M.
MAX_NLIST = 65_536
#: At least this many training vectors (or all of them), and 64 per list beyond it.
MIN_TRAIN = 100_000
SHARD_DIR = "shards.tmp"


@dataclass
class ShardedBuild:
    """What ``build_sharded`` wrote: the merged index (mapped from ``out_dir``), its parameters and the
    recall measured against exact search (index.json ``index.params`` / ``index.recall``)."""

    index: Any
    params: dict[str, int]
    recall: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def sharded_params(n: int, dim: int, shards: int = 1) -> dict[str, int]:
    """Defaults for ``n`` vectors: ~4*sqrt(N) lists (at most MAX_NLIST, at least 39 training points each),
    PQ with dim/2 sub-quantizers (at most 32) of 8 bits: 32 bytes per 64-d vector, no OPQ rotation (see
    docs/scaling.md for the measured choice), nprobe a first guess that the build tunes."""
    train = int(min(n, max(MIN_TRAIN, 64 * min(MAX_NLIST, round(4 * math.sqrt(max(n, 1)))))))
    nlist = int(max(1, min(round(4 * math.sqrt(max(n, 1))), MAX_NLIST, train // 39 if train >= 39 else 1)))
    pq_m = max(d for d in range(1, max(1, min(32, dim // 2)) + 1) if dim % d == 0)
    bits = 8 if train >= 39 * 256 else int(max(4, min(8, math.floor(math.log2(max(train, 16) / 39)))))
    return {
        "nlist": nlist,
        "nprobe": int(min(nlist, max(16, nlist // 32))),
        "pq_m": pq_m,
        "pq_bits": bits,
        "opq": 0,
        "train_size": train,
        "shards": int(max(1, shards)),
    }


def factory_string(params: dict[str, int]) -> str:
    """The FAISS index_factory description of these parameters, e.g. ``IVF1024,PQ16x8``."""
    opq = f"OPQ{params['pq_m']}," if int(params.get("opq", 0)) else ""
    return f"{opq}IVF{params['nlist']},PQ{params['pq_m']}x{params['pq_bits']}"


def train_index(vectors: Any, params: dict[str, int], seed: int = 0) -> Any:
    """An empty IVF-PQ index trained on a random sample of ``train_size`` rows of ``vectors``."""
    import faiss

    n, dim = len(vectors), int(vectors.shape[1])
    if dim % int(params["pq_m"]):
        raise ImageIndexError(f"pq_m={params['pq_m']} must divide the embedding dim {dim}")
    size = int(min(n, params.get("train_size", n)))
    if size < int(params["nlist"]):
        raise ImageIndexError(f"{SHARDED_TYPE} needs at least nlist={params['nlist']} vectors, got {size}")
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    index = faiss.index_factory(dim, factory_string(params), faiss.METRIC_L2)
    index.train(sample)
    return index


def fill_shard(trained: np.ndarray, vectors: np.ndarray, first_id: int) -> np.ndarray:
    """One shard: the serialized trained index holding ``vectors`` with ids first_id, first_id+1, ...
    (a plain function: run in-process or as a Ray task; returns the shard serialized)."""
    import faiss

    index = faiss.deserialize_index(trained)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index.add_with_ids(x, np.arange(first_id, first_id + len(x), dtype=np.int64))
    return faiss.serialize_index(index)


def _bounds(n: int, shards: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _fill_local(
    trained: np.ndarray, vectors: Any, bounds: list[tuple[int, int]], first_id: int
) -> Iterator[tuple[int, Any]]:
    for i, (a, b) in enumerate(bounds):
        yield i, fill_shard(trained, vectors[a:b], first_id + a)


def ray_session(address: str) -> Any:
    """Ray connected to ``address`` (``core.ray_cluster``); failures are ``ImageIndexError``."""
    return _ray_session(address, ImageIndexError)


def _fill_ray(
    ray: Any, trained: np.ndarray, vectors: Any, bounds: list[tuple[int, int]], first_id: int
) -> Iterator[tuple[int, Any]]:
    """Shards as Ray tasks (one CPU each), at most twice the cluster's CPUs in flight so the object store
    never holds more than that many slices; yields (shard number, serialized shard) as they finish."""
    task = ray.remote(num_cpus=1, max_retries=3)(fill_shard)
    trained_ref = ray.put(trained)
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[Any, int] = {}
    todo = list(enumerate(bounds))
    while todo or pending:
        while todo and len(pending) < limit:
            i, (a, b) = todo.pop(0)
            pending[
                task.remote(trained_ref, np.ascontiguousarray(vectors[a:b], dtype=np.float32), first_id + a)
            ] = i
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            yield pending.pop(ref), ray.get(ref)


def merge_shards(trained: np.ndarray, shard_files: list[Path], out_dir: Path, extra_lists: Any = None) -> Any:
    """Merge shard files (and an already open index's lists, ``extra_lists``) into ``out_dir``/index.ivfdata
    with FAISS's on-disk inverted lists; writes ``out_dir``/index.faiss and returns it mapped read-only."""
    import faiss

    merged = faiss.deserialize_index(trained)
    ivf = faiss.extract_index_ivf(merged)
    sources, keep = [], []
    for f in shard_files:
        shard = faiss.read_index(str(f), faiss.IO_FLAG_MMAP)
        keep.append(shard)
        sources.append(faiss.extract_index_ivf(shard).invlists)
    if extra_lists is not None:
        sources.insert(0, extra_lists)
    # A hard link to the old index's lists (an edit links unchanged files) must not be written through.
    (out_dir / IVFDATA_FILE).unlink(missing_ok=True)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(out_dir / IVFDATA_FILE))
    vec = faiss.InvertedListsPtrVector()
    for s in sources:
        vec.push_back(s)
    with quiet_faiss():
        total = lists.merge_from_multiple(vec.data(), vec.size(), False)
    merged.ntotal = ivf.ntotal = total
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    faiss.write_index(merged, str(out_dir / INDEX_FILE))
    del merged, keep
    return read_sharded(out_dir / INDEX_FILE)


def _fill_and_merge(
    trained: np.ndarray,
    vectors: Any,
    first_id: int,
    out_dir: Path,
    shards: int,
    address: str | None,
    progress: bool,
    extra_lists: Any = None,
) -> Any:
    """Fill the shards (Ray or in-process), write each to a scratch folder, merge them, drop the scratch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bounds = _bounds(len(vectors), shards)
    scratch = out_dir / SHARD_DIR
    scratch.mkdir(parents=True, exist_ok=True)
    files = [scratch / f"shard-{i:05d}.faiss" for i in range(len(bounds))]
    cols = [TextColumn("[bold]filling shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*cols, disable=not progress, transient=False) as bar, _filler(address) as fill:
        task = bar.add_task("shards", total=len(bounds))
        for i, data in fill(trained, vectors, bounds, first_id):
            files[i].write_bytes(np.asarray(data).tobytes())
            bar.advance(task)
    try:
        return merge_shards(trained, files, out_dir, extra_lists)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _filler(address: str | None) -> Iterator[Any]:
    """The shard filler: Ray tasks when an address is given, else in-process one shard after another."""
    if address is None:
        yield _fill_local
        return
    with ray_session(address) as ray:
        yield lambda trained, vectors, bounds, first_id: _fill_ray(ray, trained, vectors, bounds, first_id)


def build_sharded(
    vectors: Any,
    out_dir: str | Path,
    shards: int = 4,
    address: str | None = None,
    params: dict[str, int] | None = None,
    progress: bool = True,
    recall_queries: int = 1000,
    seed: int = 0,
) -> ShardedBuild:
    """Train on a sample of ``vectors`` (float32/float16 array or memmap, row i gets id i), fill ``shards``
    shards (Ray tasks on the cluster at ``address``, else in this process) and merge them into
    ``out_dir``/index.faiss + index.ivfdata; then tune nprobe and measure recall@5 against exact search on
    ``recall_queries`` sampled vectors (printed when ``progress``)."""
    import faiss

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, dim = len(vectors), int(vectors.shape[1])
    p = sharded_params(n, dim, shards)
    if params and "nlist" in params and "train_size" not in params:  # sample sized for the lists asked for
        p["train_size"] = int(min(n, max(MIN_TRAIN, 64 * int(params["nlist"]))))
    p.update(params or {})
    p["shards"] = int(max(1, shards))
    t0 = time.perf_counter()
    trained = faiss.serialize_index(train_index(vectors, p, seed))
    t1 = time.perf_counter()
    index = _fill_and_merge(trained, vectors, 0, out_dir, p["shards"], address, progress)
    t2 = time.perf_counter()
    recall = tune_and_measure(index, vectors, 5, recall_queries, seed=seed)
    p["nprobe"] = recall["nprobe"]
    seconds = {"train": t1 - t0, "fill_merge": t2 - t1, "recall": time.perf_counter() - t2}
    if progress:
        _print_recall(recall, n)
    return ShardedBuild(index, p, recall, seconds)


def _print_recall(recall: dict[str, Any], n: int) -> None:
    from rich.console import Console

    Console(stderr=True).print(
        f"recall@{recall['k']} {recall['recall']:.3f} against exact search ({recall['queries']} sampled "
        f"queries of {n:,} vectors, nprobe {recall['nprobe']})"
    )


def empty_trained(index: Any) -> np.ndarray:
    """The trained quantizer and codebooks of ``index`` without its vectors, serialized (its lists are
    swapped out for empty ones while it is written, then put back)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    saved, own, ntotal = ivf.invlists, ivf.own_invlists, index.ntotal
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)  # owned here, outlives the swap
    ivf.own_invlists = False
    ivf.replace_invlists(empty, False)
    index.ntotal = ivf.ntotal = 0
    try:
        return faiss.serialize_index(index)
    finally:
        ivf.replace_invlists(saved, own)
        index.ntotal = ivf.ntotal = ntotal


def extend_sharded(
    old_index: Any,
    vectors: Any,
    out_dir: str | Path,
    shards: int = 1,
    address: str | None = None,
    progress: bool = True,
) -> Any:
    """``--add``: a new merged index in ``out_dir`` holding ``old_index``'s lists (read from its mapped
    ivfdata, never loaded whole) plus ``vectors`` encoded with its trained quantizers, with ids continuing
    at ``old_index.ntotal``. The old folder is only read."""
    import faiss

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if int(vectors.shape[1]) != old_index.d:
        raise ImageIndexError(f"model gives {vectors.shape[1]}-d vectors, index holds {old_index.d}-d")
    trained = empty_trained(old_index)
    old_lists = faiss.extract_index_ivf(old_index).invlists
    first = int(old_index.ntotal)
    return _fill_and_merge(trained, vectors, first, out_dir, shards, address, progress, old_lists)


def assemble_sharded(
    old_index: Any,
    old_params: dict[str, int] | None,
    vectors: Any,
    rebuild: Any,
    params: dict[str, int] | None,
    out_dir: str | Path,
    address: str | None = None,
    progress: bool = True,
) -> ShardedBuild:
    """What ``uniembed index`` does for a sharded index, written into ``out_dir``: a fresh build over
    ``vectors`` (no ``old_index``) or over ``rebuild`` (all vectors after a projection refit), else
    ``--add``: the old lists merged with ``vectors``' (recall left as it was measured: empty here)."""
    from uniembed.serve.faiss_index import apply_search_params

    p = {**(old_params or {}), **(params or {})}
    shards = int(p.get("shards", 1))
    if old_index is None or rebuild is not None:
        x = vectors if old_index is None else rebuild
        kept = {k: v for k, v in p.items() if k not in ("nprobe", "shards")}
        return build_sharded(x, out_dir, shards, address, kept, progress)
    index = extend_sharded(old_index, vectors, out_dir, shards, address, progress)
    apply_search_params(index, SHARDED_TYPE, p)
    return ShardedBuild(index, p, {})
