"""GUIE retrieval metrics.

mP@5 exactly as the Google Universal Image Embedding challenge defined it: Euclidean k-NN with k=5; for a
query q with n_q index images of its object, precision over the top min(n_q, 5) results; averaged over
queries. In leave-one-out mode the query is removed from its own index (it is not counted in n_q either).
Queries whose object has no other index image (n_q = 0) cannot be scored and are counted as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RetrievalResult:
    mp5: float
    recall1: float
    recall5: float
    map100: float
    n_queries: int
    n_skipped: int
    per_query_mp5: np.ndarray = field(repr=False)
    neighbors: np.ndarray = field(repr=False)  # [Q, k] index positions, nearest first
    distances: np.ndarray = field(repr=False)  # [Q, k] Euclidean distances
    scored: np.ndarray = field(repr=False)  # [Q] bool, query had n_q > 0

    def as_dict(self) -> dict:
        return {
            "mP@5": self.mp5,
            "recall@1": self.recall1,
            "recall@5": self.recall5,
            "mAP@100": self.map100,
            "queries": self.n_queries,
            "skipped_no_match": self.n_skipped,
        }


def knn(
    queries: np.ndarray | torch.Tensor,
    index: np.ndarray | torch.Tensor | None = None,
    k: int = 5,
    exclude_self: bool = False,
    block: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k-NN in blocks (memory stays O(block x N)). ``exclude_self`` needs index=None."""
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    x = q if index is None else torch.as_tensor(np.asarray(index, dtype=np.float32))
    if exclude_self and index is not None:
        raise ValueError("exclude_self applies to leave-one-out search (index=None)")
    k_eff = min(k, x.shape[0] - (1 if exclude_self else 0))
    x_sq = (x * x).sum(1)
    all_d, all_i = [], []
    for s in range(0, q.shape[0], block):
        qb = q[s : s + block]
        d2 = (qb * qb).sum(1, keepdim=True) + x_sq[None, :] - 2.0 * qb @ x.T
        if exclude_self:
            rows = torch.arange(qb.shape[0])
            d2[rows, rows + s] = float("inf")
        d, i = torch.topk(d2, k_eff, dim=1, largest=False)
        all_d.append(d.clamp_min(0).sqrt())
        all_i.append(i)
    return torch.cat(all_d).numpy(), torch.cat(all_i).numpy()


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    index_emb: np.ndarray | None = None,
    index_labels: np.ndarray | None = None,
    k: int = 5,
    map_k: int = 100,
) -> RetrievalResult:
    """Score queries against an index. With ``index_emb=None`` every query searches all the others
    (leave-one-out), which is the protocol used throughout this project."""
    loo = index_emb is None
    idx_labels = np.asarray(query_labels if loo else index_labels)
    q_labels = np.asarray(query_labels)
    depth = max(k, map_k)
    dist, nbr = knn(query_emb, None if loo else index_emb, k=depth, exclude_self=loo)
    # n_q: index images sharing the query's label (minus the query itself in leave-one-out).
    uniq, counts = np.unique(idx_labels, return_counts=True)
    count_of = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
    n_q = np.array([count_of.get(lab, 0) for lab in q_labels.tolist()]) - (1 if loo else 0)
    rel = idx_labels[nbr] == q_labels[:, None]  # [Q, depth]
    scored = n_q > 0
    top = np.minimum(n_q, k)
    cols = np.arange(k)[None, :]
    hits_k = (rel[:, :k] & (cols < top[:, None])).sum(1)
    p5 = np.where(scored, hits_k / np.maximum(top, 1), 0.0)
    r1 = rel[:, 0].astype(float)
    r5 = rel[:, :k].any(1).astype(float)
    # AP@map_k: mean of precision at each relevant rank, normalised by min(n_q, map_k).
    rel_m = rel[:, :map_k]
    prec_at = np.cumsum(rel_m, 1) / np.arange(1, rel_m.shape[1] + 1)[None, :]
    ap = (prec_at * rel_m).sum(1) / np.maximum(np.minimum(n_q, map_k), 1)
    s = scored
    n = int(s.sum())
    mean = (lambda v: float(v[s].mean()) if n else float("nan"))
    return RetrievalResult(
        mp5=mean(p5),
        recall1=mean(r1),
        recall5=mean(r5),
        map100=mean(ap),
        n_queries=n,
        n_skipped=int((~s).sum()),
        per_query_mp5=p5,
        neighbors=nbr[:, :k],
        distances=dist[:, :k],
        scored=scored,
    )


def per_domain_mp5(result: RetrievalResult, domains: np.ndarray) -> dict[str, float]:
    """mP@5 averaged over the scored queries of each domain."""
    out: dict[str, float] = {}
    domains = np.asarray(domains)
    for d in sorted(set(domains.tolist())):
        m = (domains == d) & result.scored
        out[d] = float(result.per_query_mp5[m].mean()) if m.any() else float("nan")
    return out
