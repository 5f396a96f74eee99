"""Build, extend and query a FAISS image index made with a GUIE ``saved_model.pt`` (or, with ``--adapt``, with
a projection fitted on the collection itself: see ``uniembed.serve.adapt``).

This module is what callers import: opening an index with its query model and searching it, plus the names
of the modules behind it (``items``: image sources and items.csv; ``faiss_index``: index types; ``store``:
a loaded index directory; ``build``: building and ``--add``).

Index directory layout (written atomically: a temp dir beside it, then a rename)::

    index.faiss   the FAISS index; row id i == items.csv row i
    items.csv     id,path,label,domain,source[,meta] (paths absolute: see items.py; meta: the extra
                  labels.csv columns of an item as JSON, searchable with filters: see filters.py)
    index.json    model fingerprint + path, index type + params, count, dim, skipped images with reasons,
                  size + sha256 of the other files (verified on load)
    thumbs/       <id>.jpg thumbnails made while indexing, so the service never reads arbitrary files
    features.npy, projection.npz, query_model.pt   only in an index built with --adapt (see adapt.py)

Distances are Euclidean (square root of FAISS's squared L2) between the model's L2-normalised embeddings,
so they lie in [0, 2] and 0 means the same picture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.runtime import torch_threads
from uniembed.export.embedder import Embedder, file_fingerprint, load_embedder, resolve_model_path
from uniembed.serve.build import BuildResult, build_index
from uniembed.serve.errors import DamagedIndexError, ImageIndexError, ModelMismatchError
from uniembed.serve.faiss_index import (
    FLAT_MAX,
    HNSW_MAX,
    INDEX_TYPES,
    IVF_MAX_NLIST,
    apply_search_params,
    choose_index_type,
    default_params,
    make_faiss_index,
)
from uniembed.serve.filters import Filter, FilterError, parse_filters
from uniembed.serve.items import IMAGE_EXTENSIONS, ITEM_FIELDS, ImageRecord, absolute_path, open_sources
from uniembed.serve.store import INDEX_FILE, INFO_FILE, ITEMS_FILE, THUMBS_DIR, Hit, ImageIndex

__all__ = [
    "FLAT_MAX",
    "HNSW_MAX",
    "IMAGE_EXTENSIONS",
    "INDEX_FILE",
    "INDEX_TYPES",
    "INFO_FILE",
    "ITEMS_FILE",
    "ITEM_FIELDS",
    "IVF_MAX_NLIST",
    "THUMBS_DIR",
    "BuildResult",
    "DamagedIndexError",
    "Filter",
    "FilterError",
    "Hit",
    "ImageIndex",
    "ImageIndexError",
    "ImageRecord",
    "ModelMismatchError",
    "apply_search_params",
    "build_index",
    "choose_index_type",
    "default_params",
    "make_faiss_index",
    "open_index_and_model",
    "absolute_path",
    "open_sources",
    "parse_filters",
    "search_paths",
]


def open_index_and_model(
    index_dir: str | Path,
    model_path: str | Path | None = None,
    engine: str = "auto",
    batch_size: int = 32,
    threads: int | None = None,
    verify: bool = True,
) -> tuple[ImageIndex, Embedder]:
    """Load an index and the model to embed queries with (default: the one recorded in the index; for an
    index built with ``--adapt``, its own ``query_model.pt``).

    The model file's fingerprint is checked against the index *before* the model is loaded, so a wrong
    model fails fast with ``ModelMismatchError``; a missing or broken one raises ``ModelError``. A damaged
    index file raises ``DamagedIndexError`` (an ``ImageIndexError``); ``verify`` False skips its checksums."""
    ix = ImageIndex.load(index_dir, verify=verify)
    if ix.adapted:
        model_file = resolve_model_path(ix.query_model_path())
        if model_path is not None:
            given = resolve_model_path(model_path)
            if given.resolve() != model_file.resolve() and file_fingerprint(given) != ix.fingerprint:
                raise ModelMismatchError(
                    f"the index at {ix.root} is collection-adapted ({ix.info['adapt']['spec']}): its queries "
                    f"are embedded by its own query model {model_file}; drop --model {model_path}"
                )
    else:
        model_file = resolve_model_path(model_path if model_path is not None else ix.query_model_path())
    fingerprint = file_fingerprint(model_file)
    if fingerprint != ix.fingerprint and (model_path is None or ix.adapted):
        raise ModelMismatchError(
            f"{model_file}, the model recorded in the index at {ix.root}, has changed since the index was "
            f"built (fingerprint {fingerprint}, the index expects {ix.fingerprint}): it was replaced or is "
            "damaged; restore it, or rebuild the index with the model you have now"
        )
    ix.check_model(fingerprint)
    embedder = load_embedder(model_file, batch_size=batch_size, engine=engine, threads=threads)
    ix.check_embedder(embedder)
    return ix, embedder


def search_paths(
    index_dir: str | Path,
    queries: Sequence[str | Path],
    k: int = 5,
    model_path: str | Path | None = None,
    batch_size: int = 32,
    engine: str = "auto",
    verify: bool = True,
    max_distance: float | None = None,
    filters: Sequence[Filter | str] | None = None,
    exclude_ids: Iterable[int] = (),
    expand: Callable[[ImageIndex, np.ndarray], np.ndarray] | bool | None = True,
) -> list[list[dict[str, Any]]]:
    """Top-k for query image files, one list of result dicts (id, path, label, domain, distance, and
    ``meta`` when the item has extra labels.csv columns) per query.

    The library form of ``uniembed search``; the model defaults to the one recorded in the index and must
    have the same fingerprint. An unreadable query raises ``BadImageError`` naming it. ``max_distance``,
    ``filters`` (``domain=toys``, ``label^=coil100:``, ``colour!=red``), ``exclude_ids`` and ``expand``: see
    ``ImageIndex.search_batch``; an unknown filter column raises ``FilterError`` listing the known ones.
    """
    from uniembed.data.images import BadImageError, load_image

    images = []
    for q in queries:
        try:
            images.append(load_image(q))
        except BadImageError as e:
            raise BadImageError(e.reason, f"query {q}: {e.detail}") from e
    with torch_threads(None) as n:
        ix, embedder = open_index_and_model(
            index_dir, model_path, engine, batch_size, threads=n, verify=verify
        )
        vecs = embedder.embed_images(images)
    hits = ix.search_batch(vecs, k, max_distance, filters, exclude_ids, expand)
    return [[h.to_dict() for h in row] for row in hits]
