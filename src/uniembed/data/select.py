"""Steps 1-2 of ``prepare``: which listed records go on to decoding.

Classes that cannot reach ``min_per_class`` are dropped before any decoding, and ``cap_per_source`` keeps
*whole classes* in a seeded random order: a retrieval set needs several images per class, and a random
image-level cap would leave mostly singletons.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from uniembed.data.sources import DataError, Record, Source

REASON_SMALL_CLASS = "class below min_per_class"


@dataclass
class Selection:
    """Steps 1-2: the records to decode, what was dropped so far, and per-source listing counts."""

    records: list[Record] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    src_stats: dict[str, dict] = field(default_factory=dict)


def select_records(
    srcs: list[Source], min_per_class: int, cap_per_source: int | None, rng: random.Random, console: Any
) -> Selection:
    """1-2. list every source, pre-filter classes that cannot reach ``min_per_class``, cap whole classes
    per source (drawing from ``rng`` source by source, in order)."""
    sel = Selection()
    label_owner: dict[str, str] = {}
    with console.status("Listing sources..."):
        for s in srcs:
            recs = s.records()
            _claim_labels(s, recs, label_owner)
            groups = _group_by_label(recs)
            small = {lab for lab, rs in groups.items() if len(rs) < min_per_class}
            for r in recs:
                if r.label in small:
                    sel.skipped.append({"path": r.path, "reason": REASON_SMALL_CLASS, "source": s.name})
            recs = [r for r in recs if r.label not in small]
            n_capped = 0
            if cap_per_source is not None and len(recs) > cap_per_source:
                recs, n_capped = _cap_whole_classes(recs, int(cap_per_source), rng)
            sel.src_stats[s.name] = {"listed": sum(len(v) for v in groups.values()), "n_capped": n_capped}
            sel.records.extend(recs)
            console.print(
                f"  source [bold]{s.name}[/] ({s.kind}, {s.root}): {sel.src_stats[s.name]['listed']} listed"
                + (f", {s.n_missing} listed but missing on disk" if s.n_missing else "")
                + (f", {n_capped} over the cap" if n_capped else "")
            )
    return sel


def _claim_labels(source: Source, records: list[Record], label_owner: dict[str, str]) -> None:
    """Record which source owns each label; a label in two sources is an error (ids are per source)."""
    for lab in {r.label for r in records}:
        other = label_owner.setdefault(lab, source.name)
        if other != source.name:
            raise DataError(
                f"label {lab!r} occurs in sources {other!r} and {source.name!r}; labels must be unique "
                "across sources (give one of them prefix=... or name=...)"
            )


def _group_by_label(records: Iterable[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.label].append(r)
    return groups


def _cap_whole_classes(records: list[Record], cap: int, rng: random.Random) -> tuple[list[Record], int]:
    """Keep whole classes, visited in seeded random order, while they fit under ``cap`` images."""
    groups = _group_by_label(records)
    labels = sorted(groups)
    rng.shuffle(labels)
    keep: set[str] = set()
    total = 0
    for lab in labels:
        n = len(groups[lab])
        if total + n <= cap:
            keep.add(lab)
            total += n
        if total >= cap:
            break
    kept = [r for r in records if r.label in keep]
    return kept, len(records) - len(kept)
