"""Leave-one-domain-out on a merged index: the protocol that picks the ``make model`` recipe.

For each domain d, a model that never saw d (a head trained on the other domains, a PCA fitted on them)
embeds *every* image of *every* domain; d's images are then the queries and the merged collection is the
index (leave-one-out: a query is not its own neighbour), so the other domains act as distractors, as in the
UnED benchmark. The mean over the left-out domains is the figure that chooses between recipes; per-domain
scores show where a recipe that wins on product domains loses elsewhere.

Baselines scored beside a head, on the same rows:

- ``raw``: the backbone's full-width features (L2-normalised) -- no fitting, so the same in every rotation;
- ``pca64``: PCA-64 fitted on the training domains' features (what a training-free fixed model would ship);
- ``adapted_<spec>``: the collection-adapted index (``uniembed index --adapt <spec>``): the projection fitted
  without labels on every indexed image, the left-out domain's included -- labels are never used, so this is
  a fair unseen-domain figure for a search index, which (unlike the GUIE file) may adapt to its collection.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from uniembed.core.metrics import retrieval_metrics
from uniembed.models.projection import AdaptSpec, fit_projection, l2n, parse_adapt_spec

#: Method names in reports, with what each row is.
LODO_METHOD_LABELS = {
    "head": "trained 64-d head (the GUIE model's recipe)",
    "raw": "raw backbone features, full width (no fitting)",
    "pca64": "PCA-64 of the backbone features, fitted on the training domains",
}


def adapted_label(spec: str) -> str:
    return f"collection-adapted index ({spec}, fitted on the indexed images, no labels)"


def merged_mp5(emb: np.ndarray, labels: np.ndarray, domains: np.ndarray, domain: str) -> float:
    """mP@5 of ``domain``'s images as queries against every row (leave-one-out, merged index)."""
    rows = np.flatnonzero(np.asarray(domains) == domain)
    if len(rows) == 0:
        raise ValueError(f"no images of domain {domain!r} to score")
    return float(retrieval_metrics(emb, np.asarray(labels), query_rows=rows).mp5)


def leave_one_domain_out(
    feats: np.ndarray,
    labels: np.ndarray,
    domains: np.ndarray,
    embed_without: Callable[[str], np.ndarray] | None,
    adapt_specs: tuple[str, ...] = ("pcaw256",),
    pca_dim: int = 64,
    on_domain: Callable[[str, dict[str, float]], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Scores {left-out domain: {method: mP@5}} over every domain in ``domains``.

    ``embed_without(d)`` returns the head's embeddings of *all* rows for a model trained without domain d
    (None: baselines only). ``feats`` are the backbone features of the same rows."""
    labels = np.asarray(labels)
    domains = np.asarray(domains)
    feats = np.asarray(feats, dtype=np.float32)
    raw = l2n(feats)
    adapted = {}
    for spec in adapt_specs:
        sp = parse_adapt_spec(spec)
        # a small collection cannot hold as many components as asked: fit as many as it has
        sp = AdaptSpec(min(sp.dim, feats.shape[0] - 1, feats.shape[1]), sp.power)
        adapted[f"adapted_{sp.name}"] = fit_projection(feats, sp).apply(feats)
    out: dict[str, dict[str, float]] = {}
    for d in sorted(set(domains.tolist())):
        train_rows = domains != d
        methods: dict[str, np.ndarray] = {}
        if embed_without is not None:
            methods["head"] = embed_without(d)
        methods["raw"] = raw
        methods[f"pca{pca_dim}"] = fit_projection(feats[train_rows], f"pca{pca_dim}").apply(feats)
        methods.update(adapted)
        out[d] = {m: merged_mp5(e, labels, domains, d) for m, e in methods.items()}
        if on_domain is not None:
            on_domain(d, out[d])
    return out


def lodo_means(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over the left-out domains, per method (methods missing from a domain are not averaged)."""
    methods = sorted({m for v in scores.values() for m in v})
    return {m: float(np.mean([v[m] for v in scores.values() if m in v])) for m in methods}
