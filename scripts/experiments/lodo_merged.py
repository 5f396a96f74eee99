"""Leave-one-domain-out over every domain of ../shared/data, merged index (issue #11, research only).

Protocol: for each domain d, fit (PCA) or train (head) on the other domains only, embed *every* image of
every domain, and score d's images as queries against the merged index of all images (leave-one-out: the
query is removed; the other domains are distractors, as in the UnED benchmark). The metric that picks a
recipe is the mean over the left-out domains. ``adapt*`` methods are the collection-adapted index: the
projection is fitted without labels on all images, the left-out domain's included (its labels never used).

Inputs are library feature directories (``uniembed extract /tmp/rf/all.csv ...``):

    uniembed extract /tmp/rf/all.csv -b mobilenetv2 -p avg+stages_l2+colour --out /tmp/rf
    uniembed extract /tmp/rf/all.csv -b efficientnet_lite2 -p avg+stages_l2 --out /tmp/rf
    python scripts/experiments/lodo_merged.py --mnv2 /tmp/rf/mobilenetv2-... \
        --lite2 /tmp/rf/efficientnet_lite2-...
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load(fdir: str) -> tuple[np.ndarray, list[dict]]:
    x = np.load(Path(fdir) / "features.npy").astype(np.float32)
    with open(Path(fdir) / "meta.csv", newline="") as f:
        meta = list(csv.DictReader(f))
    return x, meta


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mp5_domain(emb: np.ndarray, labels: np.ndarray, qmask: np.ndarray, k: int = 5) -> float:
    """GUIE mP@5 of the queries in ``qmask`` against all rows (leave-one-out), Euclidean on ``emb``."""
    x = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    qi = np.flatnonzero(qmask)
    sq = (x * x).sum(1)
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    lab_id = torch.from_numpy(inv)
    scores = []
    for s in range(0, len(qi), 1024):
        idx = torch.from_numpy(qi[s : s + 1024])
        q = x[idx]
        d2 = sq[idx, None] + sq[None, :] - 2 * q @ x.T
        d2[torch.arange(len(idx)), idx] = float("inf")
        nb = torch.topk(d2, k, largest=False).indices
        rel = (lab_id[nb] == lab_id[idx, None]).numpy()
        nq = counts[inv[idx.numpy()]] - 1
        top = np.minimum(nq, k)
        hit = (rel & (np.arange(k)[None, :] < top[:, None])).sum(1)
        ok = nq > 0
        scores.append(np.where(ok, hit / np.maximum(top, 1), np.nan))
    v = np.concatenate(scores)
    return float(np.nanmean(v))


def pca(
    x: np.ndarray, k: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xt = torch.from_numpy(x).float()
    if weights is None:
        w = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float32)
    else:
        w = torch.from_numpy(weights / weights.sum()).float()
    mean = (w[:, None] * xt).sum(0)
    xc = xt - mean
    cov = ((xc * w[:, None]).T @ xc).double()  # float32 product, float64 eigh
    ev, evec = torch.linalg.eigh(cov)
    order = torch.argsort(ev, descending=True)[:k]
    return mean.float().numpy(), evec[:, order].T.float().numpy(), ev[order].clamp_min(1e-12).float().numpy()


def project(x: np.ndarray, fit: tuple, power: float = 0.0) -> np.ndarray:
    mean, comps, ev = fit
    y = (x - mean) @ comps.T
    if power:
        y = y / (ev ** (power / 2))[None, :]
    return l2(y)


def train_head(
    x: np.ndarray,
    labels: np.ndarray,
    k: int = 64,
    epochs: int = 30,
    arc_w: float = 1.0,
    kd_w: float = 30.0,
    s: float = 30.0,
    m: float = 0.3,
    lr: float = 1e-3,
    seed: int = 0,
    power: float = 0.0,
    rank_w: float = 0.0,
    tau: float = 0.05,
    nbr_batches: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The make-model head recipe (PCA init, ArcFace + similarity distillation), small and self-contained;
    returns (centre, weight [k, D], bias)."""
    torch.manual_seed(seed)
    mean, comps, ev = pca(x, k)
    w0 = comps / (ev ** (power / 2))[:, None] if power else comps
    xt = torch.from_numpy(x - mean)
    xr = torch.from_numpy(x)  # uncentred: raw search ranks by these cosines
    uniq, y = np.unique(labels, return_inverse=True)
    yt = torch.from_numpy(y)
    lin = torch.nn.Linear(x.shape[1], k)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w0))
        lin.bias.zero_()
    centers = torch.nn.Parameter(torch.randn(len(uniq), k) * 0.01)
    opt = torch.optim.Adam(
        [
            {"params": lin.parameters(), "lr": lr, "weight_decay": 1e-4},
            {"params": [centers], "lr": lr * 10, "weight_decay": 0.0},
        ]
    )
    n = x.shape[0]
    bs = 256
    steps = epochs * ((n + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[lr, lr * 10], total_steps=steps, pct_start=1 / epochs, anneal_strategy="cos"
    )
    g = torch.Generator().manual_seed(seed)
    nbrs = None
    if rank_w and nbr_batches:
        # each batch: bs/4 random anchors + 3 of each anchor's 10 nearest full-width neighbours, so the
        # listwise ranking loss sees real near neighbours (random batches of 256 out of 10k rarely hold any)
        xn_all = F.normalize(xr, dim=1)
        nb = []
        for s0 in range(0, n, 2048):
            sims = xn_all[s0 : s0 + 2048] @ xn_all.T
            sims[torch.arange(sims.shape[0]), torch.arange(s0, s0 + sims.shape[0])] = -2
            nb.append(torch.topk(sims, 10).indices)
        nbrs = torch.cat(nb)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(0, n, bs):
            idx = perm[b : b + bs]
            if nbrs is not None:
                a = idx[: bs // 4]
                pick = torch.randint(0, 10, (len(a), 3), generator=g)
                idx = torch.unique(torch.cat([a, nbrs[a[:, None], pick].reshape(-1)]))
            xb = xt[idx]
            z = F.normalize(lin(xb), dim=1)
            loss = torch.zeros(())
            if rank_w:
                xn = F.normalize(xr[idx], dim=1)
                eye = torch.eye(len(idx), dtype=torch.bool)
                t_log = (xn @ xn.T / tau).masked_fill(eye, -1e9)
                s_log = (z @ z.T / tau).masked_fill(eye, -1e9)
                loss = loss + rank_w * F.kl_div(
                    F.log_softmax(s_log, 1), F.log_softmax(t_log, 1), log_target=True, reduction="batchmean"
                )
            if arc_w:
                cos = z @ F.normalize(centers, dim=1).T
                th = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
                tgt = torch.cos(th + m)
                oh = F.one_hot(yt[idx], len(uniq)).bool()
                logits = s * torch.where(oh, tgt, cos)
                loss = loss + arc_w * F.cross_entropy(logits, yt[idx])
            if kd_w:
                xn = F.normalize(xb, dim=1)
                loss = loss + kd_w * F.mse_loss(z @ z.T, xn @ xn.T)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return mean, lin.weight.detach().numpy(), lin.bias.detach().numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnv2", required=True)
    ap.add_argument("--lite2", required=True)
    ap.add_argument("--feats", default="m_avg,l_avg,join_avg,m_stg,join_stg,m_col")
    ap.add_argument("--methods", default="raw,pca64,pcaw64@0.5,adapt_pcaw64@0.5")
    ap.add_argument("--results", default="/tmp/rf/lodo_results.jsonl")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    xm, meta = load(args.mnv2)
    xl, meta_l = load(args.lite2)
    assert [r["path"] for r in meta] == [r["path"] for r in meta_l], "feature sets not aligned"
    labels = np.array([r["label"] for r in meta])
    domains = np.array([r["domain"] for r in meta])
    doms = sorted(set(domains))
    # mobilenetv2 avg+stages_l2+colour: 96 | 160 | 320 | 1280 | colour 512 (each block L2, colour x sqrt2)
    mb = np.split(xm, np.cumsum([96, 160, 320, 1280]), axis=1)
    lite_last = xl[:, -1280:]
    blocks_l = xl
    feats = {
        "m_avg": l2(mb[3]),
        "l_avg": l2(lite_last),
        "join_avg": l2(np.concatenate([l2(mb[3]), l2(lite_last)], 1)),
        "m_stg": l2(np.concatenate(mb[:4], 1)),
        "l_stg": l2(blocks_l),
        "join_stg": l2(np.concatenate([l2(np.concatenate(mb[:4], 1)), l2(blocks_l)], 1)),
        "m_col": l2(np.concatenate(mb, 1)),
        "join_avg_col": l2(np.concatenate([l2(mb[3]), l2(lite_last), l2(mb[4]) * 0.5], 1)),
        "join_avgstg": l2(np.concatenate([l2(mb[3]), l2(lite_last), l2(np.concatenate(mb[:3], 1)) * 0.7], 1)),
    }
    for fname in args.feats.split(","):
        x = feats[fname]
        for method in args.methods.split(","):
            t0 = time.time()
            per = {}
            for d in doms:
                tr = domains != d
                q = domains == d
                name, _, pw = method.partition("@")
                power = float(pw) if pw else 0.0
                if name == "raw":
                    e = x
                elif name.startswith("pcaw") or name.startswith("pca"):
                    kk = int(name.lstrip("pcaw"))
                    e = project(x, pca(x[tr], kk), power)
                elif name.startswith("bpcaw") or name.startswith("bpca"):
                    kk = int(name.lstrip("bpcaw"))
                    dw = np.array([1.0 / (domains[tr] == dd).sum() for dd in domains[tr]])
                    e = project(x, pca(x[tr], kk, dw), power)
                elif name.startswith("adapt_pca"):
                    kk = int(name[len("adapt_pca") :].lstrip("w"))
                    e = project(x, pca(x, kk), power)
                elif name.startswith("head"):
                    # head[-arcW-kdW-epochs-rankW-tau]; headall*: unlabelled fit on every image (rank/kd
                    # only, labels of the left-out domain never used)
                    parts = name.split("-")
                    arc_w = float(parts[1]) if len(parts) > 1 else 1.0
                    kd_w = float(parts[2]) if len(parts) > 2 else 30.0
                    ep = int(parts[3]) if len(parts) > 3 else 30
                    rank_w = float(parts[4]) if len(parts) > 4 else 0.0
                    tau = float(parts[5]) if len(parts) > 5 else 0.05
                    nbr_batches = not (len(parts) > 6 and parts[6] == "rand")
                    rows = slice(None) if name.startswith("headall") else tr
                    c, w, b = train_head(
                        x[rows],
                        labels[rows],
                        arc_w=arc_w,
                        kd_w=kd_w,
                        epochs=ep,
                        power=power,
                        rank_w=rank_w,
                        tau=tau,
                        nbr_batches=nbr_batches,
                    )
                    e = l2((x - c) @ w.T + b)
                else:
                    raise SystemExit(f"unknown method {method}")
                per[d] = mp5_domain(e, labels, q)
                print(f"    {fname} {method} {d}: {per[d]:.3f} ({time.time() - t0:.0f}s)", flush=True)
            mean = float(np.mean(list(per.values())))
            row = {"feats": fname, "method": method, "mean": mean, "per": per, "s": time.time() - t0}
            row["tag"] = args.tag
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{fname:12s} {method:18s} mean {mean:.3f}  "
                + " ".join(f"{d[:6]}={v:.3f}" for d, v in per.items())
                + f"  ({row['s']:.0f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
