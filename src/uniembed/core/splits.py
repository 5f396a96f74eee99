"""Which labels, photos and domains are held out: one deterministic definition for training and evaluation.

Training holds rows out and evaluation must score exactly those rows, so both call these functions (never a
copy): a split that drifted between the two would score trained-on rows as "unseen".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass
class LabelSplit:
    """Label names held out for validation / used for training, per domain."""

    train_labels: list[str]
    val_labels: list[str]
    label_domain: dict[str, str]  # majority domain of each label

    def summary(self) -> dict:
        doms = sorted(set(self.label_domain.values()))
        return {
            d: {
                "train_labels": sum(self.label_domain[x] == d for x in self.train_labels),
                "val_labels": sum(self.label_domain[x] == d for x in self.val_labels),
            }
            for d in doms
        }


def split_labels(
    label_names: np.ndarray,
    domains: np.ndarray,
    val_fraction: float,
    seed: int,
    train_domains: list[str] | None = None,
    unseen_domains_all_labels: bool = False,
) -> LabelSplit:
    """Hold out ``val_fraction`` of each domain's labels (at least 1, leaving at least 1 for training),
    deterministically: labels are sorted by name, each domain permuted with its own seeded generator, so the
    split of one domain does not change when another domain is added."""
    per_label: dict[str, Counter] = {}
    for lab, dom in zip(label_names.tolist(), domains.tolist(), strict=True):
        per_label.setdefault(lab, Counter())[dom] += 1
    label_domain = {lab: c.most_common(1)[0][0] for lab, c in per_label.items()}
    train_set = set(train_domains) if train_domains else None
    tr: list[str] = []
    va: list[str] = []
    for d_i, dom in enumerate(sorted(set(label_domain.values()))):
        labs = sorted(lab for lab, d in label_domain.items() if d == dom)
        if train_set is not None and dom not in train_set and unseen_domains_all_labels:
            va += labs
            continue
        rng = np.random.default_rng([seed, d_i, len(labs)])
        perm = [labs[i] for i in rng.permutation(len(labs))]
        n_val = int(round(val_fraction * len(labs)))
        # val_fraction 0: every label trains (the shipped model); otherwise at least one label each way
        n_val = min(max(n_val, 1), len(labs) - 1) if len(labs) >= 2 and val_fraction > 0 else 0
        va += perm[:n_val]
        tr += perm[n_val:]
    return LabelSplit(sorted(tr), sorted(va), label_domain)


def heldout_photos(
    label_names: np.ndarray,
    domains: np.ndarray,
    train_labels: list[str] | set[str],
    fraction: float,
    seed: int,
    train_domains: list[str] | None = None,
) -> np.ndarray:
    """Bool mask of the rows held out as *new photos of training labels*: ``round(fraction * n)`` (at least 2)
    of each training label's ``n`` rows, for labels with ``n >= 3`` (so at least one photo is still trained
    on and a held-out photo has a same-label neighbour), only in ``train_domains`` (default: every domain).
    Deterministic: one generator per domain seeded with ``[seed, domain index, number of labels, 1]``, labels
    in sorted order, so adding a domain does not move another domain's photos. Training
    (:func:`prepare_data`) and evaluation (``uniembed.eval.evaluate.run_split``) both call this."""
    held = np.zeros(len(label_names), dtype=bool)
    if fraction <= 0:
        return held
    if fraction >= 1:
        raise ValueError(f"photo_fraction must be in [0, 1), not {fraction}")
    wanted = set(train_labels)
    names = label_names.astype(str)
    for d_i, dom in enumerate(sorted(set(domains.tolist()))):
        in_dom = domains == dom
        labs = sorted(set(names[in_dom].tolist()) & wanted)
        rng = np.random.default_rng([seed, d_i, len(labs), 1])
        for lab in labs:
            rows = np.flatnonzero(in_dom & (names == lab))
            if len(rows) < 3:
                continue
            k = min(max(int(round(fraction * len(rows))), 2), len(rows) - 1)
            held[rng.choice(rows, size=k, replace=False)] = True
    if train_domains:
        held &= np.isin(domains, train_domains)
    return held


def spread_rows(domains: np.ndarray, n: int, allowed: np.ndarray | None = None) -> list[int]:
    """Up to ``n`` row indices, round-robin over domains, evenly spaced within each (deterministic).
    ``allowed``: optional bool mask of eligible rows (e.g. scored queries)."""
    domains = np.asarray(domains)
    ok = np.ones(len(domains), bool) if allowed is None else np.asarray(allowed, bool)
    doms = sorted(set(domains[ok].tolist()))
    if not doms or n <= 0:
        return []
    per = {d: np.flatnonzero((domains == d) & ok) for d in doms}
    want = {d: 0 for d in doms}
    for i in range(min(n, int(ok.sum()))):
        want[doms[i % len(doms)]] += 1
    # hand the quota of small domains to the others
    spare = sum(max(0, want[d] - len(per[d])) for d in doms)
    for d in doms:
        want[d] = min(want[d], len(per[d]))
    for d in doms:
        extra = min(spare, len(per[d]) - want[d])
        want[d] += extra
        spare -= extra
    picked: list[int] = []
    for d in doms:
        rows, k = per[d], want[d]
        if k:
            picked += rows[np.linspace(0, len(rows) - 1, k).round().astype(int)].tolist()
    return sorted(set(picked))
