"""Training data from cached features: one in-memory float32 tensor, a deterministic label split, samplers.

Batches are index permutations over that tensor (no per-sample DataLoader): an epoch over 100k cached features
is a few hundred slicing ops, i.e. seconds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from uniembed.features.store import FeatureSet, load_feature_set


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


@dataclass
class TrainData:
    feats: torch.Tensor  # [N, D] float32, every row (train + val + unused)
    label_names: np.ndarray  # [N] str (names are the join key across feature dirs)
    domains: np.ndarray  # [N] str
    keys: list[str]
    paths: list[str]
    train_idx: np.ndarray  # rows used for training
    val_idx: np.ndarray  # rows of held-out labels
    classes: list[str]  # training class names; class index = position
    y_train: torch.Tensor  # [len(train_idx)] long class indices
    split: LabelSplit
    info: dict  # info.json of the first feature dir
    feature_dirs: list[str]
    # rows of training labels held out of training (split.photo_fraction): new photos of known labels
    photo_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def dim(self) -> int:
        return int(self.feats.shape[1])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y_train.numpy(), minlength=len(self.classes))


def load_features(dirs: list[str]) -> tuple[FeatureSet, np.ndarray, list[str]]:
    """Load and concatenate feature dirs (same backbone fingerprint and width). Returns the concatenated set,
    label *names* per row (label ids are per-manifest, names are global) and the dirs resolved."""
    if not dirs:
        raise ValueError("no feature directories given")
    sets = [load_feature_set(d) for d in dirs]
    first = sets[0]
    for d, s in zip(dirs[1:], sets[1:], strict=True):
        if s.dim != first.dim or s.info.get("fingerprint") != first.info.get("fingerprint"):
            raise ValueError(
                f"feature dir {d} was made by a different feature function "
                f"({s.info.get('backbone')}/{s.info.get('fingerprint')}, dim {s.dim}) than {dirs[0]} "
                f"({first.info.get('backbone')}/{first.info.get('fingerprint')}, dim {first.dim})"
            )
    names: list[np.ndarray] = []
    for s in sets:
        if s.label_names:
            if int(s.labels.max(initial=-1)) >= len(s.label_names):
                raise ValueError("feature set label ids exceed its label_names")
            names.append(np.asarray(s.label_names, dtype=object)[s.labels])
        else:
            names.append(s.labels.astype(str).astype(object))
    if len(sets) == 1:
        fs = first
    else:
        fs = FeatureSet(
            features=np.concatenate([np.asarray(s.features) for s in sets]),
            labels=np.concatenate([s.labels for s in sets]),
            label_names=[],
            domains=np.concatenate([s.domains for s in sets]),
            paths=sum((s.paths for s in sets), []),
            keys=sum((s.keys for s in sets), []),
            sources=sum((s.sources for s in sets), []),
            info=first.info,
        )
    return fs, np.concatenate(names), [str(Path(d)) for d in dirs]


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


def prepare_data(
    feature_dirs: list[str],
    val_fraction: float = 0.5,
    seed: int = 0,
    train_domains: list[str] | None = None,
    unseen_domains_all_labels: bool = False,
    photo_fraction: float = 0.0,
) -> TrainData:
    """Load features into memory and split labels into train / val (and, with ``photo_fraction``, hold out
    that fraction of each training label's photos: :func:`heldout_photos`)."""
    fs, names, dirs = load_features(feature_dirs)
    known = sorted(set(fs.domains.tolist()))
    if train_domains:
        missing = sorted(set(train_domains) - set(known))
        if missing:
            raise ValueError(f"train_domains {missing} not in the features (domains: {', '.join(known)})")
    split = split_labels(names, fs.domains, val_fraction, seed, train_domains, unseen_domains_all_labels)
    train_labels = set(split.train_labels)
    in_train_dom = np.ones(len(fs), dtype=bool) if not train_domains else np.isin(fs.domains, train_domains)
    is_train = np.array([n in train_labels for n in names.tolist()]) & in_train_dom
    photos = heldout_photos(names, fs.domains, train_labels, photo_fraction, seed, train_domains)
    is_train &= ~photos
    val_labels = set(split.val_labels)
    is_val = np.array([n in val_labels for n in names.tolist()])
    train_idx = np.flatnonzero(is_train)
    if train_idx.size == 0:
        raise ValueError("no training rows after the label split / train_domains filter")
    classes = sorted(set(names[train_idx].tolist()))
    cls_of = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([cls_of[n] for n in names[train_idx].tolist()], dtype=torch.long)
    feats = torch.from_numpy(np.asarray(fs.features, dtype=np.float32))
    if not torch.isfinite(feats).all():
        bad = int((~torch.isfinite(feats)).any(1).sum())
        raise ValueError(f"{bad} feature rows contain NaN/inf; re-run `uniembed extract`")
    return TrainData(
        feats=feats,
        label_names=names,
        domains=fs.domains,
        keys=fs.keys,
        paths=list(fs.paths),
        train_idx=train_idx,
        val_idx=np.flatnonzero(is_val),
        classes=classes,
        y_train=y,
        split=split,
        info=fs.info,
        feature_dirs=dirs,
        photo_idx=np.flatnonzero(photos),
    )


#: ``neighbours`` sampler: each anchor is followed by this many of its nearest rows, drawn from its
#: ``NEIGHBOUR_POOL`` nearest (full-width cosine).
NEIGHBOURS_PER_ANCHOR = 3
NEIGHBOUR_POOL = 10


def nearest_rows(feats: torch.Tensor, k: int = NEIGHBOUR_POOL, block: int = 2048) -> torch.Tensor:
    """[N, k] positions of each row's k nearest other rows by cosine of the full-width features: the
    project's exact blocked k-NN (``eval.metrics.knn``) on L2-normalised rows, where Euclidean order is
    cosine order."""
    from uniembed.eval.metrics import knn

    f = torch.nn.functional.normalize(feats.float(), dim=1)
    _, idx = knn(f, k=k, exclude_self=True, block=block)
    return torch.from_numpy(idx)


def epoch_order(
    n: int,
    sampler: str,
    generator: torch.Generator,
    y: torch.Tensor | None = None,
    domains: np.ndarray | None = None,
    neighbours: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions (into the training rows) for one epoch of ``n`` samples.

    ``random``: a permutation. ``class_balanced`` / ``domain_balanced``: ``n`` draws with replacement, each
    row weighted 1 / (size of its class / domain), so every class / domain is drawn equally often on average.
    ``neighbours``: shuffled anchors, each followed by ``NEIGHBOURS_PER_ANCHOR`` rows drawn from its nearest
    (``neighbours`` [n, k] from :func:`nearest_rows`): a random batch of 256 out of 10k rows holds almost no
    true near neighbours, so a ranking loss would only ever see far ones.
    """
    if sampler == "random":
        return torch.randperm(n, generator=generator)
    if sampler == "neighbours":
        if neighbours is None or neighbours.shape[0] != n:
            raise ValueError("neighbours sampler needs the [n, k] nearest-row table")
        per = NEIGHBOURS_PER_ANCHOR + 1
        anchors = torch.randperm(n, generator=generator)[: (n + per - 1) // per]
        pick = torch.randint(0, neighbours.shape[1], (len(anchors), per - 1), generator=generator)
        groups = torch.cat([anchors[:, None], neighbours[anchors[:, None], pick]], dim=1)
        return groups.reshape(-1)[:n]
    if sampler == "class_balanced":
        if y is None:
            raise ValueError("class_balanced sampler needs labels")
        groups = y.numpy()
    elif sampler == "domain_balanced":
        if domains is None:
            raise ValueError("domain_balanced sampler needs domains")
        _, groups = np.unique(domains, return_inverse=True)
    else:
        raise ValueError(f"unknown sampler {sampler!r}")
    counts = np.bincount(groups)
    w = torch.from_numpy(1.0 / counts[groups]).double()
    return torch.multinomial(w, n, replacement=True, generator=generator)
