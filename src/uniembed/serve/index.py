"""Build, extend and query a FAISS image index made with a GUIE ``saved_model.pt`` (or, with ``--adapt``, with
a projection fitted on the collection itself: see ``uniembed.serve.adapt``).

Index directory layout (written atomically: a temp dir beside it, then a rename)::

    index.faiss   the FAISS index; row id i == items.csv row i
    items.csv     id,path,label,domain,source
    index.json    model fingerprint + path, index type + params, count, dim, skipped images with reasons
    thumbs/       <id>.jpg thumbnails made while indexing, so the service never reads arbitrary files
    features.npy, projection.npz, query_model.pt   only in an index built with --adapt (see adapt.py)

Distances are Euclidean (square root of FAISS's squared L2) between the model's L2-normalised embeddings,
so they lie in [0, 2] and 0 means the same picture.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.fsutil import building_dir
from uniembed.core.runtime import torch_threads
from uniembed.export.embedder import (
    Embedder,
    file_fingerprint,
    load_embedder,
    resolve_model_path,
)

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.csv"
INFO_FILE = "index.json"
THUMBS_DIR = "thumbs"
ITEM_FIELDS = ["id", "path", "label", "domain", "source"]
INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq", "hnsw")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

#: Below this many vectors an exact scan is fast enough (64-d: ~1 ms per query at 20k) and has perfect recall.
FLAT_MAX = 20_000
#: Up to this many, HNSW: no training, high recall; beyond, IVF keeps build time and memory in check.
HNSW_MAX = 500_000


class ImageIndexError(RuntimeError):
    """A clear, user-facing problem with an index directory or its inputs (not a bug)."""


class ModelMismatchError(ImageIndexError):
    """The index was built with a different model than the one given: its vectors are not comparable."""


# --------------------------------------------------------------------------------------------- image sources
@dataclass
class ImageRecord:
    """One image to index: where it came from (``path``), its label and domain, and how to read it."""

    path: str
    label: str
    domain: str
    source: str
    file: Path | None = None  # read from disk ...
    data: bytes | None = None  # ... or already in memory (shards)


def _read_labels_csv(csv_path: Path) -> list[ImageRecord]:
    """labels.csv rows (path,label[,domain]); relative paths are relative to the CSV's folder."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        if not {"path", "label"} <= cols:
            raise ImageIndexError(f"{csv_path}: needs columns path,label[,domain]; found {sorted(cols)}")
        out = []
        for row in reader:
            rel = (row.get("path") or "").strip()
            p = Path(rel) if os.path.isabs(rel) else csv_path.parent / rel
            out.append(
                ImageRecord(
                    path=str(p),
                    label=(row.get("label") or "").strip(),
                    domain=(row.get("domain") or "").strip(),
                    source=str(csv_path),
                    file=p if rel else None,
                )
            )
    return out


def _read_folder(root: Path, domain: str) -> list[ImageRecord]:
    """Every image file under ``root`` (sorted), labelled by its parent folder's name."""
    out = []
    for p in sorted(root.rglob("*")):
        if (
            p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ):
            out.append(ImageRecord(path=str(p), label=p.parent.name, domain=domain, source=str(root), file=p))
    return out


def _iter_shards(ds_dir: Path) -> Iterator[ImageRecord]:
    """Samples of a prepared WebDataset directory (design.md contract), with their original paths."""
    from uniembed.data.shards import iter_samples
    from uniembed.data.sources import DataError

    try:
        for s in iter_samples(ds_dir):
            meta = s.meta or {}
            yield ImageRecord(
                path=str(meta.get("path") or f"{ds_dir}#{s.key}"),
                label=str(meta.get("label", "")),
                domain=str(meta.get("domain", "")),
                source=str(ds_dir),
                data=s.image_bytes,
            )
    except (
        DataError,
        OSError,
        tarfile.TarError,
    ) as e:  # a broken or missing shard: stop with the reason, not a tar traceback
        raise ImageIndexError(f"cannot read prepared dataset {ds_dir}: {e}") from e


def open_sources(images: Sequence[str | Path], domain: str = "") -> tuple[Iterator[ImageRecord], int]:
    """Turn ``--images`` arguments into one record stream and its length (for the progress bar).

    Each argument is a labels.csv, a folder holding labels.csv, a prepared shards folder (manifest.json), a
    plain folder of images labelled by parent folder name, or one image file (labelled the same way).
    """
    streams: list[Iterable[ImageRecord]] = []
    total = 0
    for arg in images:
        p = Path(arg)
        if p.is_file() and p.suffix.lower() == ".csv":
            recs = _read_labels_csv(p)
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            recs = [ImageRecord(path=str(p), label=p.parent.name, domain=domain, source=str(p), file=p)]
        elif p.is_dir() and (p / "manifest.json").is_file():
            try:
                manifest = json.loads((p / "manifest.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ImageIndexError(f"{p / 'manifest.json'}: unreadable manifest: {e}") from e
            streams.append(_iter_shards(p))
            total += int(manifest.get("count", 0))
            continue
        elif p.is_dir() and (p / "labels.csv").is_file():
            recs = _read_labels_csv(p / "labels.csv")
        elif p.is_dir():
            recs = _read_folder(p, domain)
        else:
            raise ImageIndexError(
                f"--images {p}: not a labels.csv, an image folder or a prepared shards folder"
            )
        streams.append(recs)
        total += len(recs)

    def chain() -> Iterator[ImageRecord]:
        for s in streams:
            yield from s

    return chain(), total


# ---------------------------------------------------------------------------------------------- FAISS index
#: Cap on automatic IVF list counts (override with --nlist for very large collections).
IVF_MAX_NLIST = 1024


def choose_index_type(n: int) -> str:
    """``auto`` by collection size: exact below FLAT_MAX, HNSW up to HNSW_MAX, IVF beyond."""
    if n < FLAT_MAX:
        return "flat"
    return "hnsw" if n < HNSW_MAX else "ivf"


def default_params(index_type: str, n: int, dim: int) -> dict[str, int]:
    """Parameters that give high recall for ``n`` vectors; any of them can be overridden by the caller."""
    if index_type == "flat":
        return {}
    if index_type == "hnsw":
        return {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64}
    # IVF: ~4*sqrt(N) lists, but FAISS wants >= 39 training points per list, and at most IVF_MAX_NLIST so
    # k-means training stays in minutes on a laptop CPU. nprobe = nlist/32 (at least 16): `make bench`
    # measured recall@5 0.98 at nprobe 16 with 1,024 lists over 2M clustered vectors, while nlist/8
    # (707 of 5,657 lists) searched ~7x slower for 0.998.
    nlist = int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39 if n >= 39 else 1, IVF_MAX_NLIST)))
    params = {"nlist": nlist, "nprobe": int(min(nlist, max(16, nlist // 32)))}
    if index_type == "ivfpq":
        m = max(d for d in range(1, min(dim, 16) + 1) if dim % d == 0)
        # 8-bit codes need ~39*256 training points per sub-quantizer; use fewer bits for smaller sets.
        bits = int(min(8, max(4, math.floor(math.log2(max(n, 1) / 39))))) if n >= 16 * 39 else 4
        params.update({"pq_m": m, "pq_bits": bits})
    return params


def make_faiss_index(vectors: np.ndarray, index_type: str, params: dict[str, int]) -> Any:
    """A trained FAISS index of ``index_type`` holding ``vectors`` (row i gets id i)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    if index_type == "flat":
        index = faiss.IndexFlatL2(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["hnsw_m"]))
        index.hnsw.efConstruction = int(params["ef_construction"])
    elif index_type in ("ivf", "ivfpq"):
        quantizer = faiss.IndexFlatL2(dim)
        if index_type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]))
        else:
            if dim % int(params["pq_m"]):
                raise ImageIndexError(f"pq_m={params['pq_m']} must divide the embedding dim {dim}")
            index = faiss.IndexIVFPQ(
                quantizer, dim, int(params["nlist"]), int(params["pq_m"]), int(params["pq_bits"])
            )
        if n < int(params["nlist"]):
            raise ImageIndexError(
                f"{index_type} needs at least nlist={params['nlist']} vectors to train, got {n}"
            )
        index.train(x)
    else:
        raise ImageIndexError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    apply_search_params(index, index_type, params)
    index.add(x)
    return index


def apply_search_params(index: Any, index_type: str, params: dict[str, int]) -> None:
    """Query-time knobs (nprobe, efSearch) live in index.json so they can be tuned without rebuilding."""
    import faiss

    if index_type in ("ivf", "ivfpq") and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if index_type == "hnsw" and "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])


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
        import faiss

        root = Path(index_dir)
        for name in (INFO_FILE, INDEX_FILE, ITEMS_FILE):
            if not (root / name).is_file():
                raise ImageIndexError(
                    f"{root} is not an index directory (missing {name}); build one with `uniembed index`"
                )
        info = json.loads((root / INFO_FILE).read_text())
        index = faiss.read_index(str(root / INDEX_FILE))
        with open(root / ITEMS_FILE, newline="", encoding="utf-8") as f:
            items = list(csv.DictReader(f))
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


# ------------------------------------------------------------------------------------------------- building
@dataclass
class BuildResult:
    """What ``build_index`` did, for the CLI summary and tests."""

    out_dir: Path
    count: int
    added: int
    skipped: list[dict[str, str]]
    index_type: str
    params: dict[str, int]
    fingerprint: str
    seconds: float
    skipped_counts: dict[str, int] = field(default_factory=dict)
    embedder: dict[str, Any] = field(default_factory=dict)  # engine, batching, threads (as in index.json)
    adapt: dict[str, Any] | None = None  # the projection of a collection-adapted index (index.json "adapt")


def _thumbnail_jpeg(im: Any, size: int) -> bytes:
    t = im.copy()
    t.thumbnail((size, size))
    buf = io.BytesIO()
    t.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _decode(rec: ImageRecord, thumb_size: int, prepare: Any) -> tuple[Any, bytes] | dict[str, str]:
    """(model-ready image from ``prepare``, thumbnail JPEG), or a skip entry {path, reason, detail}.

    Runs in worker threads: decoding, the thumbnail and the model's own resize all release the GIL."""
    from uniembed.data.images import BadImageError, load_image

    if rec.file is None and rec.data is None:
        return {"path": rec.path, "reason": "empty path", "detail": ""}
    try:
        im = load_image(rec.data if rec.data is not None else rec.file)
    except BadImageError as e:
        return {"path": rec.path, "reason": e.reason, "detail": e.detail}
    return prepare(im), _thumbnail_jpeg(im, thumb_size)


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link old thumbnails into the new index (instant, no extra space); copy if links are refused."""
    dst.mkdir(parents=True, exist_ok=True)
    if not src.is_dir():
        return
    for p in src.iterdir():
        try:
            os.link(p, dst / p.name)
        except OSError:
            shutil.copy2(p, dst / p.name)


def build_index(
    model_path: str | Path | None,
    images: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    index_type: str = "auto",
    add: bool = False,
    batch_size: int = 32,
    params: dict[str, int] | None = None,
    limit: int | None = None,
    domain: str = "",
    thumb_size: int = 160,
    workers: int | None = None,
    progress: bool = True,
    engine: str = "auto",
    threads: int | None = None,
    adapt: str | None = None,
    backbone: Any = None,
    pooling: str | None = None,
    refit: bool = False,
) -> BuildResult:
    """Embed ``images`` with the model and write (or with ``add`` extend) a FAISS index at ``out_dir``.

    Unreadable images are skipped and recorded with their reason. With ``add`` the existing vectors are kept
    as they are (no re-embedding); the model must be the same file (fingerprint) the index was built with,
    and paths already in the index are skipped as duplicates. ``engine``/``threads``: see
    ``uniembed.export.embedder.load_embedder`` (``threads`` None: the cores not already busy).

    Collection-adapted mode (``uniembed.serve.adapt``): ``adapt`` (``pca64``, ``pcaw64``, ``pcaw256@1``...)
    with ``backbone`` (a name for ``create_backbone(name, pooling=pooling)``, or a ``Backbone``) and no
    ``model_path``: the images are embedded by the frozen backbone, a projection is fitted on those features
    and a query model is written into the index. ``add`` on an adapted index keeps its projection (no model
    needed; ``backbone`` defaults to the stored one); ``add`` + ``refit`` refits on all stored features (with
    ``adapt``: to that spec) and rewrites every vector and the query model.
    """
    import faiss

    from uniembed.serve import adapt as ad

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if isinstance(images, (str, Path)):  # one source given bare
        images = [images]
    if index_type not in INDEX_TYPES:
        raise ImageIndexError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")

    old: ImageIndex | None = None
    if add:
        if not (out_dir / INFO_FILE).is_file():
            raise ImageIndexError(f"--add: no index at {out_dir} to add to; build it first without --add")
        old = ImageIndex.load(out_dir)
        if index_type not in ("auto", old.info["index"]["type"]):
            raise ImageIndexError(
                f"--add keeps the existing index type {old.info['index']['type']!r}; "
                f"rebuild without --add to switch to {index_type!r}"
            )
    elif out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / INFO_FILE).is_file():
        raise ImageIndexError(f"{out_dir} exists and is not an index directory; refusing to overwrite it")
    if refit and not add:
        raise ImageIndexError("--refit refits an existing adapted index: use it with --add")

    adapted = adapt is not None or (old is not None and old.adapted)
    plan: _AdaptPlan | None = None
    model_file: Path | None = None
    fingerprint = ""
    try:
        if adapted:
            plan = _AdaptPlan.make(old, model_path, adapt, backbone, pooling, refit)
        else:
            if refit:
                raise ImageIndexError("--refit only applies to an index built with --adapt")
            if backbone is not None:
                raise ImageIndexError("--backbone is only used with --adapt (a collection-adapted index)")
            if model_path is None:
                raise ImageIndexError(
                    "give --model (a GUIE saved_model.pt), or --adapt SPEC --backbone NAME to fit a "
                    "collection-adapted projection"
                )
            model_file = resolve_model_path(model_path)
            fingerprint = file_fingerprint(model_file)
            if old is not None:
                old.check_model(fingerprint)
    except ad.AdaptError as e:
        raise ImageIndexError(str(e)) from e

    records, total = open_sources(images, domain=domain)
    if limit is not None:
        total = min(total, limit)
    known = {it["path"] for it in old.items} if old else set()
    start_id = len(old) if old else 0

    with torch_threads(threads) as n_threads, building_dir(out_dir) as tmp:
        if plan is not None:
            embedder = ad.feature_embedder(plan.backbone, batch_size, engine=engine, threads=n_threads)
        else:
            assert model_file is not None
            embedder = load_embedder(model_file, batch_size=batch_size, engine=engine, threads=n_threads)
        thumbs = tmp / THUMBS_DIR
        if old is not None:
            _link_or_copy_tree(old.root / THUMBS_DIR, thumbs)
        thumbs.mkdir(exist_ok=True)
        new_items, new, skipped, seen = _embed_records(
            embedder,
            records,
            total,
            limit,
            known,
            start_id,
            thumbs,
            batch_size,
            thumb_size,
            workers,
            progress,
        )

        counts = dict(Counter(s["reason"] for s in skipped))
        if not new_items and old is None:
            raise ImageIndexError(f"no image could be indexed ({seen} seen; skipped: {counts or 'none'})")
        adapt_info: dict[str, Any] | None = None
        rebuild: np.ndarray | None = None  # all vectors, when the whole FAISS index must be rewritten
        if plan is not None:
            try:
                new, rebuild, fingerprint, adapt_info = plan.finish(tmp, old, new, n_threads)
            except ad.AdaptError as e:
                raise ImageIndexError(str(e)) from e
            model_record = {
                "fingerprint": fingerprint,
                "path": str((out_dir / ad.QUERY_MODEL).resolve()),
                "adapted": True,
            }
        else:
            assert model_file is not None
            model_record = {"fingerprint": fingerprint, "path": str(model_file.resolve())}

        if old is not None:
            kind = old.info["index"]["type"]
            kind_params = dict(old.info["index"].get("params", {}))
            kind_params.update(params or {})
            items = old.items + new_items
            prev_skipped = list(old.info.get("skipped", []))
            if rebuild is not None:
                index = make_faiss_index(rebuild, kind, kind_params)
                dim = int(rebuild.shape[1])
            else:
                index = old.index
                if new.shape[0] and new.shape[1] != old.dim:
                    raise ImageIndexError(f"model gives {new.shape[1]}-d vectors, index holds {old.dim}-d")
                apply_search_params(index, kind, kind_params)
                if new.shape[0]:
                    index.add(new)
                dim = old.dim
        else:
            kind = choose_index_type(len(new)) if index_type == "auto" else index_type
            kind_params = default_params(kind, len(new), new.shape[1])
            kind_params.update(params or {})
            index = make_faiss_index(new, kind, kind_params)
            items = new_items
            prev_skipped = []
            dim = int(new.shape[1])

        faiss.write_index(index, str(tmp / INDEX_FILE))
        with open(tmp / ITEMS_FILE, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=ITEM_FIELDS)
            w.writeheader()
            w.writerows(items)
        all_skipped = prev_skipped + skipped
        info = {
            "version": 1,
            "model": model_record,
            "embedder": {**embedder.describe(), "threads": n_threads},
            "index": {
                "type": kind,
                "params": kind_params,
                "metric": "l2",
                "requested": old.info["index"].get("requested", "auto") if old else index_type,
            },
            "count": len(items),
            "dim": dim,
            "thumb_size": thumb_size,
            "sources": sorted({*(old.info.get("sources", []) if old else []), *(str(p) for p in images)}),
            "skipped": all_skipped,
            "skipped_counts": dict(Counter(s["reason"] for s in all_skipped)),
            "created": old.info.get("created") if old else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if adapt_info is not None:
            info["adapt"] = adapt_info
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    return BuildResult(
        out_dir=out_dir,
        count=len(items),
        added=len(new_items),
        skipped=skipped,
        index_type=kind,
        params=kind_params,
        fingerprint=fingerprint,
        seconds=time.perf_counter() - t0,
        skipped_counts=counts,
        embedder=info["embedder"],
        adapt=adapt_info,
    )


def _embed_records(
    embedder: Embedder,
    records: Iterator[ImageRecord],
    total: int,
    limit: int | None,
    known: set[str],
    start_id: int,
    thumbs: Path,
    batch_size: int,
    thumb_size: int,
    workers: int | None,
    progress: bool,
) -> tuple[list[dict[str, str]], np.ndarray, list[dict[str, str]], int]:
    """Decode (worker threads), thumbnail and embed a record stream: (new items, their vectors [n, D],
    skipped entries, records seen). Paths in ``known`` or repeated are skipped; ids start at ``start_id``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    new_items: list[dict[str, str]] = []
    vectors: list[np.ndarray] = []
    skipped: list[dict[str, str]] = []
    seen_now: set[str] = set()
    chunk_size = max(1, batch_size) * 4
    n_workers = workers or min(8, (os.cpu_count() or 2) * 2)

    def flush(chunk: list[ImageRecord], pool: ThreadPoolExecutor) -> None:
        decoded = list(pool.map(lambda r: _decode(r, thumb_size, embedder.prepare), chunk))
        ok = [(r, d) for r, d in zip(chunk, decoded, strict=True) if isinstance(d, tuple)]
        skipped.extend(d for d in decoded if isinstance(d, dict))
        if not ok:
            return
        emb = embedder.embed_prepared([d[0] for _, d in ok], batch_size=batch_size)
        finite = np.isfinite(emb).all(axis=1)
        for (r, d), vec, good in zip(ok, emb, finite, strict=True):
            if not good:
                skipped.append({"path": r.path, "reason": "non-finite embedding", "detail": ""})
                continue
            item_id = start_id + len(new_items)
            (thumbs / f"{item_id}.jpg").write_bytes(d[1])
            new_items.append(
                {
                    "id": str(item_id),
                    "path": r.path,
                    "label": r.label,
                    "domain": r.domain,
                    "source": r.source,
                }
            )
            vectors.append(vec)

    cols = [TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    seen = 0
    with (
        Progress(*cols, disable=not progress, transient=False) as bar,
        ThreadPoolExecutor(n_workers) as pool,
    ):
        task = bar.add_task("embed", total=total)
        chunk: list[ImageRecord] = []
        for rec in records:
            if limit is not None and seen >= limit:
                break
            seen += 1
            if rec.path in known or rec.path in seen_now:
                why = "already indexed" if rec.path in known else "duplicate path"
                skipped.append({"path": rec.path, "reason": why, "detail": ""})
                bar.advance(task)
                continue
            seen_now.add(rec.path)
            chunk.append(rec)
            if len(chunk) >= chunk_size:
                flush(chunk, pool)
                bar.advance(task, len(chunk))
                chunk = []
        if chunk:
            flush(chunk, pool)
            bar.advance(task, len(chunk))
    new = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, embedder.dim), np.float32)
    return new_items, new, skipped, seen


@dataclass
class _AdaptPlan:
    """What a collection-adapted build or --add will do: the backbone, and the projection to fit or keep."""

    backbone: Any
    spec: Any  # adapt.AdaptSpec, or None to keep the stored projection
    keep: Any  # adapt.Projection kept from the old index, or None

    @classmethod
    def make(
        cls,
        old: ImageIndex | None,
        model_path: str | Path | None,
        adapt: str | None,
        backbone: Any,
        pooling: str | None,
        refit: bool,
    ) -> _AdaptPlan:
        from uniembed.serve import adapt as ad

        spec = ad.parse_adapt_spec(adapt) if adapt is not None else None
        if old is None:
            if model_path is not None:
                raise ImageIndexError(
                    "--adapt fits its own projection on the backbone's features and writes its own query "
                    "model into the index; use --backbone NAME instead of --model"
                )
            return cls(ad.resolve_backbone(backbone, pooling), spec, None)
        if not old.adapted:
            raise ImageIndexError(
                f"--adapt with --add: the index at {old.root} was built with a fixed model, not --adapt; "
                "rebuild it without --add to make a collection-adapted index"
            )
        stored = old.info["adapt"]
        if model_path is not None:
            raise ImageIndexError(
                f"the index at {old.root} is collection-adapted ({stored['spec']}): --add embeds new images "
                f"with its stored backbone {stored['backbone']!r}; drop --model"
            )
        if spec is not None and not refit and spec.name != stored["spec"]:
            raise ImageIndexError(
                f"--add keeps the stored projection {stored['spec']}; add --refit to refit it as {spec.name}"
            )
        if isinstance(backbone, str) and backbone != stored["backbone"]:
            raise ImageIndexError(
                f"--backbone {backbone!r}: the index's features come from {stored['backbone']!r}; "
                "rebuild without --add to switch backbones"
            )
        if pooling is not None and pooling != stored.get("pooling"):
            raise ImageIndexError(
                f"--pooling {pooling!r}: the index's features use pooling {stored.get('pooling')!r}"
            )
        bb = ad.resolve_backbone(
            backbone if backbone is not None else stored["backbone"], stored.get("pooling") or None
        )
        if str(bb.fingerprint()) != stored["feature_fingerprint"]:
            raise ModelMismatchError(
                f"backbone {bb.name!r} now has fingerprint {bb.fingerprint()}, but the index's features were "
                f"computed with {stored['feature_fingerprint']} (weights or preprocessing changed); rebuild "
                "the index without --add"
            )
        keep = None
        if refit:
            spec = spec or ad.parse_adapt_spec(stored["spec"])
        else:
            keep = ad.Projection.load(old.root / ad.PROJECTION_FILE)
        return cls(bb, spec, keep)

    def finish(
        self, tmp: Path, old: ImageIndex | None, new_feats: np.ndarray, threads: int
    ) -> tuple[np.ndarray, np.ndarray | None, str, dict[str, Any]]:
        """Write features.npy, projection.npz and query_model.pt into ``tmp``. Returns (vectors of the new
        images, all vectors when the index must be rebuilt (a fit or refit) else None, the query model's
        fingerprint, the ``adapt`` block of index.json)."""
        from uniembed.serve import adapt as ad

        new16 = new_feats.astype(np.float16)
        if not np.isfinite(new16).all():
            raise ad.AdaptError("backbone features overflow float16")
        feats = new16
        if old is not None:
            stored = np.load(old.root / ad.FEATURES_FILE, mmap_mode="r")
            if stored.shape[0] != len(old):
                raise ImageIndexError(
                    f"{old.root / ad.FEATURES_FILE} holds {stored.shape[0]} rows for {len(old)} indexed "
                    "images; rebuild the index"
                )
            feats = np.concatenate([np.asarray(stored), new16]) if len(new16) else np.asarray(stored)
        np.save(tmp / ad.FEATURES_FILE, feats)
        if self.keep is not None:  # --add: same projection, same query model file (same fingerprint)
            assert old is not None
            proj = self.keep
            shutil.copy2(old.root / ad.PROJECTION_FILE, tmp / ad.PROJECTION_FILE)
            shutil.copy2(old.root / ad.QUERY_MODEL, tmp / ad.QUERY_MODEL)
            vectors, rebuild = proj.apply(new_feats), None
            how = old.info["adapt"].get("backbone_compiled", "")
        else:
            # Fit on the stored (float16) features, so a refit of the same rows gives the same projection.
            proj = ad.fit_projection(feats.astype(np.float32), self.spec, ad.feature_meta(self.backbone))
            proj.save(tmp / ad.PROJECTION_FILE)
            with torch_threads(threads):
                how = ad.write_query_model(self.backbone, proj, tmp / ad.QUERY_MODEL)
            n_old = len(old) if old is not None else 0
            # Index vectors: new images from their float32 features (what the query model computes, up to
            # the feature engine's rounding); stored images from their float16 features.
            vectors = proj.apply(new_feats)
            rebuild = (
                np.concatenate([proj.apply(feats[:n_old].astype(np.float32)), vectors]) if n_old else None
            )
        info = {
            **proj.describe(),
            "backbone_compiled": how,
            "features": ad.FEATURES_FILE,
            "projection": ad.PROJECTION_FILE,
            "query_model": ad.QUERY_MODEL,
        }
        return vectors, rebuild, file_fingerprint(tmp / ad.QUERY_MODEL), info


def open_index_and_model(
    index_dir: str | Path,
    model_path: str | Path | None = None,
    engine: str = "auto",
    batch_size: int = 32,
    threads: int | None = None,
) -> tuple[ImageIndex, Embedder]:
    """Load an index and the model to embed queries with (default: the one recorded in the index; for an
    index built with ``--adapt``, its own ``query_model.pt``).

    The model file's fingerprint is checked against the index *before* the model is loaded, so a wrong
    model fails fast with ``ModelMismatchError``; a missing or broken one raises ``ModelError``."""
    ix = ImageIndex.load(index_dir)
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
    ix.check_model(file_fingerprint(model_file))
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
) -> list[list[dict[str, Any]]]:
    """Top-k for query image files, one list of result dicts (id, path, label, domain, distance) per query.

    The library form of ``uniembed search``; the model defaults to the one recorded in the index and must
    have the same fingerprint. An unreadable query raises ``BadImageError`` naming it.
    """
    from uniembed.data.images import BadImageError, load_image

    images = []
    for q in queries:
        try:
            images.append(load_image(q))
        except BadImageError as e:
            raise BadImageError(e.reason, f"query {q}: {e.detail}") from e
    with torch_threads(None) as n:
        ix, embedder = open_index_and_model(index_dir, model_path, engine, batch_size, threads=n)
        vecs = embedder.embed_images(images)
    return [[h.to_dict() for h in hits] for hits in ix.search_batch(vecs, k)]
