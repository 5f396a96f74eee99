"""A built index directory, loaded: the FAISS index, its item table and index.json, and top-k search.

Index directory layout (written atomically by ``uniembed.serve.build``)::

    index.faiss   the FAISS index; row id i == items.csv row i
    items.csv     id,path,label,domain,source
    index.json    model fingerprint + path, index type + params, count, dim, skipped images with reasons
    thumbs/       <id>.jpg thumbnails made while indexing, so the service never reads arbitrary files

Distances are Euclidean (square root of FAISS's squared L2) between the model's L2-normalised embeddings,
so they lie in [0, 2] and 0 means the same picture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.export.embedder import Embedder
from uniembed.serve.errors import ImageIndexError, ModelMismatchError
from uniembed.serve.faiss_index import apply_search_params
from uniembed.serve.items import read_items

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.csv"
INFO_FILE = "index.json"
THUMBS_DIR = "thumbs"


@dataclass
class Hit:
    """One search result."""

    id: int
    path: str
    label: str
    domain: str
    distance: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "label": self.label,
            "domain": self.domain,
            "distance": round(self.distance, 6),
        }


@dataclass
class ImageIndex:
    """A loaded index directory: FAISS index + item table + metadata."""

    root: Path
    index: Any
    items: list[dict[str, str]]
    info: dict[str, Any]

    @classmethod
    def load(cls, index_dir: str | Path) -> ImageIndex:
        """Open an index directory; refuses one whose FAISS index, items.csv and index.json disagree."""
        import faiss

        root = Path(index_dir)
        for name in (INFO_FILE, INDEX_FILE, ITEMS_FILE):
            if not (root / name).is_file():
                raise ImageIndexError(
                    f"{root} is not an index directory (missing {name}); build one with `uniembed index`"
                )
        info = json.loads((root / INFO_FILE).read_text())
        index = faiss.read_index(str(root / INDEX_FILE))
        items = read_items(root / ITEMS_FILE)
        if index.ntotal != len(items) or index.ntotal != int(info.get("count", -1)):
            raise ImageIndexError(
                f"{root}: index holds {index.ntotal} vectors but items.csv has {len(items)} rows "
                f"and index.json says {info.get('count')}; rebuild it"
            )
        apply_search_params(index, info["index"]["type"], info["index"].get("params", {}))
        return cls(root=root, index=index, items=items, info=info)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def fingerprint(self) -> str:
        return str(self.info["model"]["fingerprint"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def adapted(self) -> bool:
        """Built with ``--adapt``: the index holds its own projection and query model."""
        return isinstance(self.info.get("adapt"), dict)

    @property
    def projection(self) -> dict[str, Any] | None:
        """The ``adapt`` block of index.json (spec, dim, fitted_on, fitted_at, backbone, ...), or None."""
        return dict(self.info["adapt"]) if self.adapted else None

    def query_model_path(self) -> Path:
        """The model that embeds queries for this index: the stored query model of an adapted index (found
        beside index.json, wherever the folder now lives), else the model recorded at build time."""
        if self.adapted:
            return self.root / str(self.info["adapt"].get("query_model") or "query_model.pt")
        return Path(self.info["model"]["path"])

    def describe_projection(self) -> str:
        """One line for people: which projection an adapted index uses ('' for a fixed-model index)."""
        a = self.projection
        if a is None:
            return ""
        return (
            f"projection {a['spec']} ({a['dim']}-d, whitening power {a.get('whiten_power', 0):g}) fitted on "
            f"{a['fitted_on']} images of {a.get('backbone')} features ({a.get('feature_dim')}-d) "
            f"at {a.get('fitted_at')}"
        )

    def check_model(self, fingerprint: str) -> None:
        """Refuse a model whose vectors live in a different space than the indexed ones."""
        if fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"model fingerprint {fingerprint} differs from the one the index at {self.root} was built "
                f"with ({self.fingerprint}, {self.info['model'].get('path')}); "
                "use that model or rebuild the index"
            )

    def check_embedder(self, embedder: Embedder) -> None:
        """Refuse a loaded model that is not the index's (fingerprint) or gives vectors of another width."""
        self.check_model(embedder.fingerprint)
        if embedder.dim != self.dim:
            raise ModelMismatchError(f"model gives {embedder.dim}-d vectors but the index holds {self.dim}-d")

    def search_batch(self, vectors: np.ndarray, k: int = 5) -> list[list[Hit]]:
        """Top-k for many query vectors in one FAISS call (nearest first)."""
        q = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ImageIndexError(f"query vectors have dim {q.shape[1]}, index has {self.dim}")
        k = int(max(1, min(k, len(self))))
        dist, ids = self.index.search(q, k)
        out: list[list[Hit]] = []
        for drow, irow in zip(dist, ids, strict=True):
            hits = []
            for d, i in zip(drow, irow, strict=True):
                if i < 0:  # fewer than k reachable (IVF with small nprobe)
                    continue
                it = self.items[int(i)]
                hits.append(
                    Hit(
                        id=int(i),
                        path=it["path"],
                        label=it["label"],
                        domain=it["domain"],
                        distance=float(math.sqrt(max(float(d), 0.0))),
                    )
                )
            out.append(hits)
        return out

    def thumbnail_path(self, item_id: int) -> Path | None:
        """The stored thumbnail of an indexed id, or None (ids only: callers never pass paths)."""
        if not 0 <= item_id < len(self):
            return None
        p = self.root / THUMBS_DIR / f"{int(item_id)}.jpg"
        return p if p.is_file() else None
