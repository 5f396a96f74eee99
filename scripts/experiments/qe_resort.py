"""Does ordering the QE-picked top-k by plain distance (what the search service reports) keep alpha-QE's gain?

Reads the embeddings `python -m uniembed_lab.expansion_eval` caches (artifacts/expansion/embeddings.npz) and
prints, per left-out domain, GUIE mP@5 of the plain search, of alpha-QE (n=2, alpha=3) in expanded order, and
of the same results re-sorted by plain distance. Run: `python scripts/experiments/qe_resort.py`.
"""

from __future__ import annotations

import faiss
import numpy as np

from uniembed.serve.expansion import alpha_qe

z = np.load("artifacts/expansion/embeddings.npz", allow_pickle=True)
labels, domains = z["labels"], z["domains"]


def mp5(ids: np.ndarray, rows: np.ndarray) -> float:
    """GUIE mP@5 with the query itself left out of its results."""
    out = []
    for r, row in zip(rows, ids, strict=True):
        got = [i for i in row if i != r][:5]
        n_q = int((labels == labels[r]).sum()) - 1
        if n_q:
            out.append(np.mean([labels[i] == labels[r] for i in got[: min(n_q, 5)]]))
    return float(np.mean(out))


for name in ["adapted"] + [k for k in z.files if k.startswith("head:")]:
    x = np.ascontiguousarray(z[name], dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    for d in sorted(set(domains)) if name == "adapted" else [name.split(":", 1)[1]]:
        rows = np.where(domains == d)[0]
        _, plain = index.search(x[rows], 6)
        _, expanded = index.search(alpha_qe(x, x[rows], 2, 3.0, exclude=rows[:, None]), 6)
        resorted = np.stack(
            [
                row[np.argsort(((x[row] - x[r]) ** 2).sum(1), kind="stable")]
                for r, row in zip(rows, expanded, strict=True)
            ]
        )
        print(
            f"{name:30s} {d:24s} plain {mp5(plain, rows):.3f}  qe {mp5(expanded, rows):.3f}  "
            f"qe re-sorted {mp5(resorted, rows):.3f}"
        )
