"""``dedup_source``: a folder, labels.csv or index in, duplicate groups and their report files out.

A folder or labels.csv is embedded by ``build_index`` (the very path ``uniembed index`` takes, into a
temporary folder or ``index_out``); an existing index gives its stored vectors back (``index_vectors``).
Exact groups (same bytes) are found first and each keeps one file by the policy; the near-duplicate search
then runs over the files not already dropped as exact copies, so every file is dropped at most once and
the would-delete count is the sum of (group size - 1).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.serve.dedup import DEFAULT_THRESHOLD, exact_groups, index_vectors, near_groups
from uniembed.serve.dedup_files import (
    KEEP_POLICIES,
    FileFacts,
    choose_keeper,
    contact_sheet,
    file_facts,
    group_rows,
    write_groups_csv,
    write_summary,
    write_to_delete,
)
from uniembed.serve.errors import ImageIndexError
from uniembed.serve.store import INFO_FILE, THUMBS_DIR, ImageIndex

#: Adapted default on a collection too small for a 256-d fit: half its size (a PCA needs more images than
#: dimensions, and some may be skipped as unreadable).
SMALL_COLLECTION = 512


@dataclass
class DedupReport:
    """What ``dedup_source`` found and wrote."""

    images: int
    threshold: float
    keep: str | None
    groups: list[dict[str, Any]]  # group, kind, members (positions), keep (position), max/mean distance
    to_delete: list[str]
    skipped: list[dict[str, str]]  # images the index could not read + files unreadable when hashed
    out_dir: Path | None = None
    index_dir: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        exact = [g for g in self.groups if g["kind"] == "exact"]
        near = [g for g in self.groups if g["kind"] == "near"]
        return {
            "images": self.images,
            "threshold": self.threshold,
            "keep": self.keep,
            "exact_groups": len(exact),
            "near_groups": len(near),
            "files_in_groups": len({m for g in self.groups for m in g["members"]}),
            "would_delete": len(self.to_delete),
            "skipped": len(self.skipped),
            "skipped_counts": dict(Counter(s["reason"] for s in self.skipped)),
            "index": self.index_dir,
            "groups": [
                {k: g[k] for k in ("group", "kind", "max_distance", "mean_distance")}
                | {"size": len(g["members"])}
                for g in self.groups
            ],
            "files": self.files,
        }


def find_groups(
    paths: list[str], vectors: np.ndarray, threshold: float, policy: str
) -> tuple[list[dict[str, Any]], dict[int, FileFacts], dict[int, str]]:
    """(exact then near groups, largest first within each kind; the facts of every grouped file; the
    positions whose files could not be read, with the reason)."""
    facts: dict[int, FileFacts] = {}

    def facts_of(members: list[int]) -> None:
        for m in members:
            if m not in facts:
                facts[m] = file_facts(paths[m])

    exact, unreadable = exact_groups(paths)
    groups: list[dict[str, Any]] = []
    dropped: set[int] = set()
    for members in exact:
        facts_of(members)
        keeper = choose_keeper(members, facts, policy)
        dropped.update(m for m in members if m != keeper)
        groups.append(
            {"kind": "exact", "members": members, "keep": keeper, "max_distance": 0.0, "mean_distance": 0.0}
        )
    reps = np.array([i for i in range(len(paths)) if i not in dropped], dtype=np.int64)
    for g in near_groups(vectors[reps], threshold) if len(reps) else []:
        members = [int(reps[m]) for m in g.members]
        facts_of(members)
        groups.append(
            {
                "kind": "near",
                "members": members,
                "keep": choose_keeper(members, facts, policy),
                "max_distance": round(g.max_distance, 6),
                "mean_distance": round(g.mean_distance, 6),
            }
        )
    for n, g in enumerate(groups, start=1):
        g["group"] = n
    return groups, facts, unreadable


def _default_embedding(
    source: list[str], model: str | Path | None, adapt: str | None, backbone: str | None
) -> tuple[str | None, str | None]:
    """What ``uniembed index`` uses without --model (the adapted default), shrunk for a small collection."""
    from uniembed.serve.commands import DEFAULT_ADAPT, DEFAULT_BACKBONE
    from uniembed.serve.items import open_sources

    if model is not None:
        return adapt, backbone
    if adapt is None:
        _, total = open_sources(source)
        adapt = DEFAULT_ADAPT if total >= SMALL_COLLECTION else f"pcaw{max(2, total // 2)}"
    return adapt, backbone or DEFAULT_BACKBONE


def _load_or_build(
    source: str | Path, index_dir: Path, model: str | Path | None, build_options: dict[str, Any]
) -> ImageIndex:
    """The index of ``source``: opened when it is one, else built into ``index_dir``."""
    from uniembed.serve.build import build_index

    if (Path(source) / INFO_FILE).is_file():
        return ImageIndex.load(source)
    options = dict(build_options)
    adapt, backbone = _default_embedding(
        [str(source)], model, options.pop("adapt", None), options.pop("backbone", None)
    )
    build_index(model, [source], index_dir, adapt=adapt, backbone=backbone, **options)
    return ImageIndex.load(index_dir, verify=False)


def dedup_index(
    index: ImageIndex,
    out_dir: str | Path | None,
    threshold: float = DEFAULT_THRESHOLD,
    keep: str | None = None,
    temporary: bool = False,
) -> DedupReport:
    """Groups of an opened index and, with ``out_dir``, groups.csv + summary.json + contact_sheet.png (+
    to_delete.txt when ``keep`` names a policy). Deletes nothing. ``temporary``: the index is about to be
    removed, so the report does not name it."""
    if keep is not None and keep not in KEEP_POLICIES:
        raise ImageIndexError(f"--keep must be one of {', '.join(KEEP_POLICIES)}, got {keep!r}")
    if not threshold >= 0:
        raise ImageIndexError(f"--threshold must be a distance >= 0, got {threshold}")
    paths = [it["path"] for it in index.items]
    vectors = index_vectors(index.reconstructable_index())
    groups, facts, unreadable = find_groups(paths, vectors, threshold, keep or "first")
    skipped = [dict(s) for s in index.info.get("skipped", []) if isinstance(s, dict)]
    skipped += [
        {"path": paths[i], "reason": f"unreadable file ({why})"} for i, why in sorted(unreadable.items())
    ]
    drop = sorted({paths[m] for g in groups for m in g["members"] if m != g["keep"]})
    report = DedupReport(len(paths), float(threshold), keep, groups, drop, skipped)
    report.index_dir = "" if temporary else str(index.root)
    if out_dir is None:
        return report
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.out_dir = out
    write_groups_csv(out / "groups.csv", group_rows(groups, index.items, facts))
    report.files["groups"] = str(out / "groups.csv")
    thumbs = [index.root / THUMBS_DIR / f"{it['id']}.jpg" for it in index.items]
    by_size = sorted(groups, key=lambda g: (-len(g["members"]), g["group"]))
    if contact_sheet(out / "contact_sheet.png", by_size, list(thumbs)):
        report.files["contact_sheet"] = str(out / "contact_sheet.png")
    if keep is not None:
        write_to_delete(out / "to_delete.txt", drop)
        report.files["to_delete"] = str(out / "to_delete.txt")
    report.files["summary"] = str(out / "summary.json")
    write_summary(out / "summary.json", report.summary())
    return report


def dedup_source(
    source: str | Path,
    out_dir: str | Path | None = None,
    model: str | Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    keep: str | None = None,
    index_out: str | Path | None = None,
    **build_options: Any,
) -> DedupReport:
    """Duplicate groups of a folder, labels.csv or index directory (``dedup_index`` for the outputs).

    A folder or labels.csv is embedded with ``build_index`` into ``index_out`` (kept) or a temporary folder
    (removed afterwards): with ``model`` that model, else the adapted default of ``uniembed index``.
    ``build_options`` go to ``build_index`` (progress, batch_size, engine, threads, adapt, backbone...)."""
    if keep is not None and keep not in KEEP_POLICIES:
        raise ImageIndexError(f"--keep must be one of {', '.join(KEEP_POLICIES)}, got {keep!r}")
    if index_out is not None:
        index = _load_or_build(source, Path(index_out), model, build_options)
        return dedup_index(index, out_dir, threshold, keep)
    with tempfile.TemporaryDirectory(prefix="uniembed-dedup-") as tmp:
        index = _load_or_build(source, Path(tmp) / "index", model, build_options)
        return dedup_index(
            index, out_dir, threshold, keep, temporary=not (Path(source) / INFO_FILE).is_file()
        )
