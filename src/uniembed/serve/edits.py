"""Edits of a built index: remove items (by stable id or by path) and add images, each atomic and crash-safe.

Every edit builds the edited index folder beside the old one and swaps it in (``core.fsutil.building_dir``,
the machinery ``build_index`` uses), with index.json and its checksums written last. A SIGKILL at any moment
leaves the old folder or the new one under the final name; one that lands between the two renames of the
swap leaves the old folder under ``.NAME.old-*``, which the next writer (edit or build) puts back first.
Rebuild-and-swap rather than a write-ahead log: every reader (search, serve, dedup, ``faiss.read_index``)
then sees a complete, checksummed folder and never has to replay anything, and the copy is cheap (thumbnails
and uploaded originals are hard links; index.faiss and items.csv are small next to the images).

Ids are stable: a removed item's id and thumbnail name are never reused (index.json ``next_id``); every other
item keeps its id and ``thumbs/<id>.jpg``. FAISS row i stays items.csv row i: flat and IVF indexes drop the
rows with ``remove_ids`` (IVF lists are then renumbered in place, codes untouched), HNSW (no removal in
FAISS) is rebuilt from its own stored vectors with the same parameters (edit_rows.py). Edits of one index are
serialised by a lock file beside it (``.NAME.edit.lock``), so a CLI ``--remove`` and a live service cannot
lose each other's edits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.fsutil import building_dir, restore_interrupted_swap
from uniembed.serve.edit_rows import (
    ADAPT_FILES,
    FEATURES_FILE,
    UPLOADS_DIR,
    carry_others,
    carry_thumbs_and_uploads,
    drop_rows,
    removed_info,
    write_edited,
)
from uniembed.serve.errors import ImageIndexError
from uniembed.serve.items import ImageRecord, absolute_path
from uniembed.serve.store import ImageIndex

#: Seconds to sleep between the steps of an edit (tests use it to SIGKILL an edit at every stage).
STEP_SLEEP_ENV = "UNIEMBED_EDIT_STEP_SLEEP"
_EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif", "image/webp": ".webp",
               "image/bmp": ".bmp", "image/tiff": ".tif"}  # fmt: skip


class UnknownItemsError(ImageIndexError):
    """Some ids or paths asked for are not in the index; nothing was changed."""

    def __init__(self, root: Path, missing: list[str]):
        shown = ", ".join(missing[:20]) + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else "")
        super().__init__(f"not in the index at {root}: {shown}; nothing was removed")
        self.missing = missing


class AlreadyIndexedError(ImageIndexError):
    """Every image of an add was already indexed (same path, or the same uploaded bytes)."""

    def __init__(self, message: str, ids: list[int]):
        super().__init__(message)
        self.ids = ids


@dataclass
class NewImage:
    """An image to add: its bytes (an upload) or a file, with its label, domain and other metadata."""

    source: bytes | str | Path
    label: str = ""
    domain: str = ""
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class EditResult:
    """What an edit did, for the CLI summary, the API answer and tests."""

    out_dir: Path
    removed: list[dict[str, str]]
    added: list[dict[str, str]]
    skipped: list[dict[str, str]]
    count: int
    next_id: int
    seconds: float


def _step() -> None:
    """Pause between steps when ``UNIEMBED_EDIT_STEP_SLEEP`` is set (only the kill tests set it)."""
    delay = os.environ.get(STEP_SLEEP_ENV)
    if delay:
        time.sleep(float(delay))


@contextlib.contextmanager
def edit_lock(index_dir: Path) -> Iterator[None]:
    """Hold the edit lock of an index (a flock on ``.NAME.edit.lock`` beside it) for the body; the kernel
    drops it when the process dies, so a killed edit never blocks the next one."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: one process at a time is the user's job
        yield
        return
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(index_dir.parent / f".{index_dir.name}.edit.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def split_targets(values: Iterable[str]) -> tuple[list[int], list[str]]:
    """CLI ``--remove`` values: all digits is an id, anything else a path (made absolute)."""
    ids, paths = [], []
    for v in (s.strip() for s in values):
        if not v:
            continue
        if v.isdigit():
            ids.append(int(v))
        else:
            paths.append(absolute_path(v))
    return ids, paths


def _positions(ix: ImageIndex, ids: Iterable[int | str], paths: Iterable[str | Path]) -> list[int]:
    """Sorted FAISS rows of the ids and paths asked for; ``UnknownItemsError`` naming every one not found."""
    by_path = {it["path"]: pos for pos, it in enumerate(ix.items)}
    rows, missing = set(), []
    for i in ids:
        pos = ix.position(int(i))
        rows.add(pos) if pos is not None else missing.append(f"id {i}")
    for p in paths:
        pos = by_path.get(absolute_path(str(p)))
        rows.add(pos) if pos is not None else missing.append(str(p))
    if missing:
        raise UnknownItemsError(ix.root, missing)
    return sorted(rows)


def _remove_locked(
    out_dir: Path, ids: Sequence[int | str], paths: Sequence[str | Path], verify: bool
) -> EditResult:
    """The removal itself, under the edit lock: restore a swap a killed writer left, load, rebuild, swap."""
    t0 = time.perf_counter()
    restore_interrupted_swap(out_dir)
    old = ImageIndex.load(out_dir, verify=verify)
    rows = _positions(old, ids, paths)
    if not rows:
        raise ImageIndexError("nothing to remove: give at least one id or path")
    gone = set(rows)
    keep = [it for pos, it in enumerate(old.items) if pos not in gone]
    _step()
    with building_dir(out_dir) as tmp:
        carry_thumbs_and_uploads(old, tmp, keep)
        carry_others(old, tmp)
        _step()
        if old.adapted:
            feats = np.load(old.root / FEATURES_FILE, mmap_mode="r")
            if feats.shape[0] != len(old):
                raise ImageIndexError(
                    f"{old.root / FEATURES_FILE} has {feats.shape[0]} rows for {len(old)} items; rebuild it"
                )
            np.save(tmp / FEATURES_FILE, np.delete(np.asarray(feats), rows, axis=0))
        kind, params = old.info["index"]["type"], dict(old.info["index"].get("params", {}))
        index = drop_rows(old.index, kind, params, rows)
        _step()
        info = removed_info(old, len(keep))
        write_edited(tmp, index, keep, info)
        _step()
    removed = [old.items[pos] for pos in rows]
    return EditResult(out_dir, removed, [], [], len(keep), old.next_id, time.perf_counter() - t0)


def remove_items(
    index_dir: str | Path,
    ids: Sequence[int | str] = (),
    paths: Sequence[str | Path] = (),
    verify: bool = True,
) -> EditResult:
    """Remove items by stable id and/or indexed path, atomically (see the module docstring). Unknown ids or
    paths raise ``UnknownItemsError`` listing all of them, and nothing changes."""
    out_dir = Path(index_dir)
    with edit_lock(out_dir):
        return _remove_locked(out_dir, ids, paths, verify)


def _upload_record(img: NewImage, out_dir: Path, with_meta: bool) -> tuple[ImageRecord, str | None]:
    """The record of one image to add, and the uploads/ name its bytes are kept under (None for a file)."""
    from uniembed.serve.uploads import sniff_image_type

    extra = {"meta": dict(img.meta)} if with_meta and img.meta else {}  # items.py without metadata: none
    if isinstance(img.source, bytes):
        name = hashlib.sha256(img.source).hexdigest()[:20] + _EXTENSIONS.get(
            sniff_image_type(img.source) or "", ".img"
        )
        path = absolute_path(str(out_dir / UPLOADS_DIR / name))
        rec = ImageRecord(path, img.label, img.domain, "upload", data=img.source, **extra)
        return rec, name
    path = absolute_path(str(img.source))
    return ImageRecord(path, img.label, img.domain, path, file=Path(path), **extra), None


def _save_uploads(tmp: Path, records: list[tuple[ImageRecord, str | None]], added: set[str]) -> None:
    """Keep the bytes of the uploads that were added under ``uploads/`` (old ones are already linked)."""
    for rec, name in records:
        if name is not None and rec.data is not None and rec.path in added:
            (tmp / UPLOADS_DIR).mkdir(exist_ok=True)
            (tmp / UPLOADS_DIR / name).write_bytes(rec.data)


class IndexEditor:
    """Edits of one index directory with the models loaded once: the service keeps one for its lifetime.

    ``embedder`` is the query model (fixed-model index); an adapted index embeds added images with its stored
    backbone (``backbone``: a name or ``Backbone``, default the stored one; loaded on the first add) and
    projects them with the stored projection, as ``index --add`` does."""

    def __init__(self, index_dir: str | Path, embedder: Any = None, backbone: Any = None, threads: int = 1):
        self.out_dir = Path(index_dir)
        self.embedder = embedder
        self.backbone = backbone
        self.threads = threads
        self._features: Any = None  # the feature embedder of an adapted index
        self._lock = threading.Lock()

    def remove(
        self, ids: Sequence[int | str] = (), paths: Sequence[str | Path] = (), verify: bool = True
    ) -> EditResult:
        """See ``remove_items``."""
        with self._lock, edit_lock(self.out_dir):
            return _remove_locked(self.out_dir, ids, paths, verify)

    def add(self, images: Sequence[NewImage], verify: bool = True) -> EditResult:
        """See ``add_images``."""
        with self._lock, edit_lock(self.out_dir):
            return self._add_locked(images, verify)

    def _how(self, old: ImageIndex) -> tuple[Any, Any]:
        """(build.Embedding, embedder) for images added to ``old``."""
        from uniembed.export.embedder import load_embedder
        from uniembed.serve.adapt_plan import AdaptPlan
        from uniembed.serve.build import Embedding

        if not old.adapted:
            if self.embedder is None:
                self.embedder = load_embedder(old.query_model_path(), batch_size=8, threads=self.threads)
            old.check_embedder(self.embedder)
            return Embedding(None, old.query_model_path(), old.fingerprint), self.embedder
        plan = AdaptPlan.make(old, None, None, self.backbone, None, False)
        self.backbone = plan.backbone
        if self._features is None or self._features.fingerprint != str(plan.backbone.fingerprint()):
            from uniembed.serve import adapt as ad

            self._features = ad.feature_embedder(plan.backbone, 8, threads=self.threads)
        return Embedding(plan, None, ""), self._features

    def _add_locked(self, images: Sequence[NewImage], verify: bool) -> EditResult:
        from uniembed.serve import build
        from uniembed.serve.assemble import assemble

        t0 = time.perf_counter()
        restore_interrupted_swap(self.out_dir)
        old = ImageIndex.load(self.out_dir, verify=verify)
        how, embedder = self._how(old)
        with_meta = "meta" in {f.name for f in fields(ImageRecord)}
        records = [_upload_record(img, self.out_dir, with_meta) for img in images]
        _step()
        with building_dir(self.out_dir) as tmp:
            carry_others(old, tmp, skip=ADAPT_FILES if old.adapted else ())
            _step()
            thumb = int(old.info.get("thumb_size", 160))
            new_items, new, skipped = build.embed_new_images(
                embedder, iter(r for r, _ in records), len(records), old, tmp, None, 8, thumb, 1, False
            )
            if not new_items:
                raise _nothing_added(old, skipped)
            _save_uploads(tmp, records, {it["path"] for it in new_items})
            rows = build.finish_rows(how, new_items, new, tmp, self.out_dir, old, self.threads)
            built = assemble(old, rows, "auto", None, tmp, None, False)
            _step()
            described = old.info.get("embedder", {})
            info = build.index_info(built, rows, skipped, old, "auto", described, thumb, [])
            info.update(removed_total=int(old.info.get("removed_total", 0)))
            build.write_index_folder(tmp, built, info)
            _step()
        return EditResult(self.out_dir, [], new_items, skipped, len(built.items), int(info["next_id"]),
                          time.perf_counter() - t0)  # fmt: skip


def _nothing_added(old: ImageIndex, skipped: list[dict[str, str]]) -> ImageIndexError:
    """Why an add added nothing: every image already indexed (with their ids), or unreadable."""
    by_path = {it["path"]: int(it["id"]) for it in old.items}
    dup = [by_path[s["path"]] for s in skipped if s["path"] in by_path]
    if dup and len(dup) == len(skipped):
        return AlreadyIndexedError(f"already indexed as id {', '.join(map(str, dup))}", dup)
    reasons = "; ".join(f"{s['path']}: {s['reason']} {s.get('detail', '')}".strip() for s in skipped[:5])
    return ImageIndexError(f"no image could be added ({reasons or 'none given'})")


def add_images(
    index_dir: str | Path,
    images: Sequence[NewImage | tuple[Any, ...]],
    embedder: Any = None,
    backbone: Any = None,
    verify: bool = True,
) -> EditResult:
    """Add images (``NewImage``, or tuples ``(bytes | path, label, domain, meta)``) to an index, atomically.
    Bytes are kept under ``uploads/`` in the index (their stored path); files are indexed where they are."""
    items = [img if isinstance(img, NewImage) else NewImage(*img) for img in images]
    return IndexEditor(index_dir, embedder, backbone).add(items, verify=verify)
