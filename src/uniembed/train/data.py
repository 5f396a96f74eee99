"""Training data from cached features: one in-memory float32 tensor, a deterministic label split, samplers.

Batches are index permutations over that tensor (no per-sample DataLoader): an epoch over 100k cached features
is a few hundred slicing ops, i.e. seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from uniembed.core.splits import LabelSplit, heldout_photos, split_labels
from uniembed.features.store import load_features


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
    from uniembed.core.metrics import knn

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
