"""GUIE retrieval metrics.

mP@5 exactly as the Google Universal Image Embedding challenge defined it: Euclidean k-NN with k=5; for a
query q with n_q index images of its object, precision over the top min(n_q, 5) results; averaged over
queries. In leave-one-out mode the query is removed from its own index (it is not counted in n_q either).
Queries whose object has no other index image (n_q = 0) cannot be scored and are counted as skipped.

Ties in distance are broken by index position (lower first), so scores are reproducible run to run.
recall@k: at least one right answer in the top k. mAP@100: average precision over the top 100, normalised
by min(n_q, 100) (the Google Landmarks convention).
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
    neighbors: np.ndarray = field(repr=False)  # [Q, k] index positions, nearest first (-1: index too small)
    distances: np.ndarray = field(repr=False)  # [Q, k] Euclidean distances (inf where neighbors is -1)
    scored: np.ndarray = field(repr=False)  # [Q] bool, query had n_q > 0
    per_query_recall1: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    per_query_recall5: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    per_query_ap: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    n_relevant: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))  # n_q

    def as_dict(self) -> dict:
        return {
            "mP@5": self.mp5,
            "recall@1": self.recall1,
            "recall@5": self.recall5,
            "mAP@100": self.map100,
            "queries": self.n_queries,
            "skipped_no_match": self.n_skipped,
        }


def _check_embeddings(name: str, emb: np.ndarray) -> None:
    """A NaN/inf embedding would silently rank as nearest or farthest; refuse it with a clear message."""
    if emb.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(emb.shape)}")
    if not torch.isfinite(emb).all():
        bad = int((~torch.isfinite(emb).all(1)).sum())
        raise ValueError(f"{name} has {bad} row(s) with NaN/inf values")


def _topk_stable(d2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest values per row, ties broken by lower column index.

    ``torch.topk`` picks arbitrarily among equal values at the k-th boundary; a full stable sort would be
    O(N log N) per row. Instead: topk(k+1) finds the rows whose k-th value is tied with a left-out column
    (rare with real embeddings); only for those, keep everything strictly below the k-th value plus the
    first needed equal columns (cumsum in column order). The k picks are then ordered by (value, column)."""
    n_rows, n_cols = d2.shape
    if k == 0:
        return d2.new_zeros((n_rows, 0)), torch.zeros((n_rows, 0), dtype=torch.long)
    kk = min(k + 1, n_cols)
    vals, cols = torch.topk(d2, kk, dim=1, largest=False, sorted=True)
    if kk > k:
        ambiguous = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1)
        vals, cols = vals[:, :k].contiguous(), cols[:, :k].contiguous()
        if ambiguous.numel():
            sub, sub_kth = d2[ambiguous], vals[ambiguous, k - 1 :]
            equal = sub == sub_kth
            need = k - (sub < sub_kth).sum(1, keepdim=True)
            chosen = (sub < sub_kth) | (equal & (torch.cumsum(equal, 1) <= need))
            sub_cols = chosen.nonzero()[:, 1].view(-1, k)  # row-major: ascending column within each row
            cols[ambiguous] = sub_cols
            vals[ambiguous] = sub.gather(1, sub_cols)
    cols, perm = torch.sort(cols, dim=1)
    vals = vals.gather(1, perm)
    order = torch.sort(vals, dim=1, stable=True).indices
    return vals.gather(1, order), cols.gather(1, order)


def knn(
    queries: np.ndarray | torch.Tensor,
    index: np.ndarray | torch.Tensor | None = None,
    k: int = 5,
    exclude_self: bool = False,
    block: int = 2048,
    query_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k-NN in blocks (memory stays O(block x N)). ``exclude_self`` needs index=None.

    ``query_rows``: search only these rows of ``queries`` (still against all of them, each query excluding
    itself) -- the merged-index protocol, where one domain's images query the index of every domain.
    Returns ``min(k, available)`` columns; ties are broken by lower index position."""
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    x = q if index is None else torch.as_tensor(np.asarray(index, dtype=np.float32))
    if exclude_self and index is not None:
        raise ValueError("exclude_self applies to leave-one-out search (index=None)")
    if query_rows is not None:
        if index is not None:
            raise ValueError("query_rows applies to leave-one-out search (index=None)")
        rows_all = torch.as_tensor(np.asarray(query_rows, dtype=np.int64))
        q = x[rows_all]
    else:
        rows_all = torch.arange(q.shape[0])
    if index is not None and x.shape[1] != q.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != index dim {x.shape[1]}")
    k_eff = max(0, min(k, x.shape[0] - (1 if exclude_self else 0)))
    x_sq = (x * x).sum(1)
    all_d, all_i = [], []
    for s in range(0, q.shape[0], block):
        qb = q[s : s + block]
        d2 = ((qb * qb).sum(1, keepdim=True) + x_sq[None, :] - 2.0 * qb @ x.T).clamp_min(0)
        if exclude_self:
            rows = torch.arange(qb.shape[0])
            d2[rows, rows_all[s : s + block]] = float("inf")
        d, i = _topk_stable(d2, k_eff)
        all_d.append(d.sqrt())
        all_i.append(i)
    if not all_d:
        return np.zeros((0, k_eff), np.float32), np.zeros((0, k_eff), np.int64)
    return torch.cat(all_d).numpy(), torch.cat(all_i).numpy()


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    index_emb: np.ndarray | None = None,
    index_labels: np.ndarray | None = None,
    k: int = 5,
    map_k: int = 100,
    query_rows: np.ndarray | None = None,
) -> RetrievalResult:
    """Score queries against an index. With ``index_emb=None`` every query searches all the others
    (leave-one-out), which is the protocol used throughout this project; ``query_rows`` then scores only
    those rows as queries, each still searching every other row (one domain against the merged index)."""
    loo = index_emb is None
    q = torch.as_tensor(np.asarray(query_emb, dtype=np.float32))
    _check_embeddings("query embeddings", q)
    q_labels = np.asarray(query_labels)
    if len(q_labels) != q.shape[0]:
        raise ValueError(f"{len(q_labels)} query labels for {q.shape[0]} query embeddings")
    if query_rows is not None and not loo:
        raise ValueError("query_rows applies to leave-one-out scoring (index_emb=None)")
    if loo:
        idx_labels = q_labels
    else:
        if index_labels is None:
            raise ValueError("index_labels is required with index_emb")
        x = torch.as_tensor(np.asarray(index_emb, dtype=np.float32))
        _check_embeddings("index embeddings", x)
        idx_labels = np.asarray(index_labels)
        if len(idx_labels) != x.shape[0]:
            raise ValueError(f"{len(idx_labels)} index labels for {x.shape[0]} index embeddings")
    depth = max(k, map_k)
    dist, nbr = knn(q, None if loo else x, k=depth, exclude_self=loo, query_rows=query_rows)
    if query_rows is not None:
        q_labels = q_labels[np.asarray(query_rows, dtype=np.int64)]
    n_queries = nbr.shape[0]
    # An index smaller than `depth` gives fewer columns: pad with -1 (never relevant) so shapes stay fixed.
    if nbr.shape[1] < depth:
        pad = depth - nbr.shape[1]
        nbr = np.concatenate([nbr, np.full((n_queries, pad), -1, np.int64)], 1)
        dist = np.concatenate([dist, np.full((n_queries, pad), np.inf, np.float32)], 1)
    # n_q: index images sharing the query's label (minus the query itself in leave-one-out).
    uniq, counts = np.unique(idx_labels, return_counts=True)
    count_of = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
    n_q = np.array([count_of.get(lab, 0) for lab in q_labels.tolist()], dtype=np.int64) - (1 if loo else 0)
    n_q = np.maximum(n_q, 0)
    valid = nbr >= 0
    rel = valid & (idx_labels[np.where(valid, nbr, 0)] == q_labels[:, None]) if len(idx_labels) else valid
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

    def mean(v: np.ndarray) -> float:
        return float(v[s].mean()) if n else float("nan")

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
        per_query_recall1=r1,
        per_query_recall5=r5,
        per_query_ap=ap,
        n_relevant=n_q,
    )


def per_domain_mp5(result: RetrievalResult, domains: np.ndarray) -> dict[str, float]:
    """mP@5 averaged over the scored queries of each domain."""
    out: dict[str, float] = {}
    domains = np.asarray(domains)
    for d in sorted(set(domains.tolist())):
        m = (domains == d) & result.scored
        out[d] = float(result.per_query_mp5[m].mean()) if m.any() else float("nan")
    return out


def per_domain_metrics(result: RetrievalResult, domains: np.ndarray) -> dict[str, dict]:
    """All four metrics per query domain (over that domain's scored queries), plus query/skip counts."""
    domains = np.asarray(domains)
    if len(domains) != len(result.scored):
        raise ValueError(f"{len(domains)} domains for {len(result.scored)} queries")
    out: dict[str, dict] = {}
    for d in sorted(set(domains.tolist())):
        in_d = domains == d
        m = in_d & result.scored
        n = int(m.sum())

        def mean(v: np.ndarray, m: np.ndarray = m, n: int = n) -> float:
            return float(v[m].mean()) if n else float("nan")

        out[d] = {
            "mP@5": mean(result.per_query_mp5),
            "recall@1": mean(result.per_query_recall1),
            "recall@5": mean(result.per_query_recall5),
            "mAP@100": mean(result.per_query_ap),
            "queries": n,
            "skipped_no_match": int((in_d & ~result.scored).sum()),
        }
    return out
