"""Put the FAISS index of a build together: a fresh one over the new rows, the old one extended, or a
rebuild after a projection refit; sharded indexes are assembled by ``serve.sharded``.

Apart from ``build.py`` (which embeds the images and writes the folder) so each stays readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.serve.errors import ImageIndexError
from uniembed.serve.faiss_index import (
    SHARDED_TYPE,
    apply_search_params,
    choose_index_type,
    default_params,
    make_faiss_index,
)
from uniembed.serve.store import ImageIndex


@dataclass
class NewRows:
    """The rows this build adds and the model that produced them, as index.json records it."""

    items: list[dict[str, str]]
    vectors: np.ndarray
    rebuild: np.ndarray | None  # all vectors, when the whole FAISS index must be rewritten
    model_record: dict[str, Any]
    fingerprint: str
    adapt_info: dict[str, Any] | None


@dataclass
class Assembled:
    """The FAISS index to write and what index.json says about it."""

    index: Any
    items: list[dict[str, str]]
    kind: str
    params: dict[str, int]
    dim: int
    prev_skipped: list[dict[str, str]]
    recall: dict[str, Any] | None = None  # sharded index: recall@5 against exact search at build time


def assemble(
    old: ImageIndex | None,
    rows: NewRows,
    index_type: str,
    params: dict[str, int] | None,
    tmp: Path,
    address: str | None = None,
    bar: bool = True,
) -> Assembled:
    """A fresh FAISS index over the new rows, or the old one extended (rebuilt after a projection refit);
    a sharded index is written into ``tmp`` as it is built (shards filled on Ray at ``address``)."""
    new = rows.vectors
    if (old.info["index"]["type"] if old else index_type) == SHARDED_TYPE:
        from uniembed.serve.sharded import assemble_sharded

        was = old.info["index"] if old else {}
        old_ix = old.index if old else None
        b = assemble_sharded(old_ix, was.get("params"), new, rows.rebuild, params, tmp, address, bar)
        items = (old.items if old else []) + rows.items
        prev = list(old.info.get("skipped", [])) if old else []
        dim = int(new.shape[1]) if old is None else old.dim
        return Assembled(b.index, items, SHARDED_TYPE, b.params, dim, prev, b.recall or was.get("recall"))
    if old is None:
        kind = choose_index_type(len(new)) if index_type == "auto" else index_type
        kind_params = default_params(kind, len(new), new.shape[1])
        kind_params.update(params or {})
        index = make_faiss_index(new, kind, kind_params)
        return Assembled(index, rows.items, kind, kind_params, int(new.shape[1]), [])
    kind = old.info["index"]["type"]
    kind_params = dict(old.info["index"].get("params", {}))
    kind_params.update(params or {})
    items = old.items + rows.items
    prev_skipped = list(old.info.get("skipped", []))
    if rows.rebuild is not None:
        index = make_faiss_index(rows.rebuild, kind, kind_params)
        return Assembled(index, items, kind, kind_params, int(rows.rebuild.shape[1]), prev_skipped)
    index = old.index
    if new.shape[0] and new.shape[1] != old.dim:
        raise ImageIndexError(f"model gives {new.shape[1]}-d vectors, index holds {old.dim}-d")
    apply_search_params(index, kind, kind_params)
    if new.shape[0]:
        index.add(new)
    return Assembled(index, items, kind, kind_params, old.dim, prev_skipped)
