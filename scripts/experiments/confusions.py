"""Which held-out labels miss, and what they are confused with (research only; issue #6, finding 14).

Scores the raw features of a cache (``universality.py`` syntax for ``--feats``/``--keys``) on the unseen-label
split, per label: mean precision over each query's top min(n_q, 5) neighbours (GUIE mP@5 per query, averaged
over the label's images) and the label its wrong neighbours most often carry.

Example::

    python scripts/experiments/confusions.py --root /tmp/r2/feats --feats mobilenetv2-224-flip,colour@h8s+h8s
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from universality import l2n, label_split, load_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feats", required=True)
    ap.add_argument("--keys", default="avg+s1+s2+s3")
    ap.add_argument("--root", default="/tmp/research/feats")
    ap.add_argument("--domains", default="packaged_goods,produce")
    ap.add_argument("--worst", type=int, default=8, help="labels listed per domain")
    a = ap.parse_args()
    d = load_data(a.feats, a.keys, True, None, a.root)
    held = label_split(d.labels, d.domains, 0)
    for dom in a.domains.split(","):
        m = held & (d.domains == dom)
        x, labs = l2n(d.x[m]), d.labels[m]
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)  # leave-one-out: a query is not its own neighbour
        nn = np.argsort(-sims, axis=1)[:, :5]
        per: dict[str, list[float]] = {}
        for i in range(len(x)):
            k = min(int((labs == labs[i]).sum()) - 1, 5)
            per.setdefault(labs[i], []).append(float((labs[nn[i, :k]] == labs[i]).mean()) if k else 0.0)
        overall = np.mean([p for v in per.values() for p in v])
        print(f"{dom}: {len(per)} held-out labels, mP@5 {overall:.3f}")
        for lab, v in sorted(per.items(), key=lambda kv: np.mean(kv[1]))[: a.worst]:
            rows = np.flatnonzero(labs == lab)
            wrong = [labs[j] for i in rows for j in nn[i] if labs[j] != lab]
            u, c = np.unique(wrong, return_counts=True) if wrong else (np.array(["-"]), np.array([0]))
            print(f"  {np.mean(v):.3f}  {lab} ({len(v)} images) -> mostly {u[np.argmax(c)]}")


if __name__ == "__main__":
    main()
