"""Validation on held-out ("unseen") labels: GUIE mP@5 leave-one-out, overall and per query domain, next to
two baselines computed once on the same split: raw (L2-normalised) features and PCA-``out_dim``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniembed.models.heads import pca_fit
from uniembed.train.data import TrainData


def embed(head: nn.Module, feats: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """Head outputs for many rows, in eval mode, on CPU."""
    was = head.training
    head.eval()
    with torch.no_grad():
        out = torch.cat([head(feats[i : i + batch]).float().cpu() for i in range(0, feats.shape[0], batch)])
    head.train(was)
    return out


def score(emb: torch.Tensor | np.ndarray, names: np.ndarray, domains: np.ndarray) -> dict[str, Any]:
    """GUIE mP@5 (leave-one-out) over all held-out images, plus per query domain."""
    from uniembed.core.metrics import per_domain_mp5, retrieval_metrics

    _, lab = np.unique(np.asarray(names, dtype=str), return_inverse=True)
    res = retrieval_metrics(np.asarray(emb, dtype=np.float32), lab)
    d = res.as_dict()
    d["per_domain"] = per_domain_mp5(res, domains)
    return d


def score_val(head: nn.Module, val_feats: torch.Tensor, data: TrainData) -> dict[str, Any]:
    """:func:`score` of the head on the held-out rows (``val_feats`` = their features, on any device)."""
    return score(embed(head, val_feats), data.label_names[data.val_idx], data.domains[data.val_idx])


def baselines(data: TrainData, out_dim: int) -> dict[str, dict]:
    """Raw L2-normalised features and PCA-``out_dim`` (fitted on the training rows) on the val split."""
    raw = F.normalize(data.feats.cpu(), dim=1)
    val = raw[data.val_idx]
    out = {"raw": score(val, data.label_names[data.val_idx], data.domains[data.val_idx])}
    k = min(out_dim, data.dim, len(data.train_idx))
    mean, comps, _ = pca_fit(raw[data.train_idx], k)
    pca = F.normalize((val - mean) @ comps.T, dim=1)
    out[f"pca{k}"] = score(pca, data.label_names[data.val_idx], data.domains[data.val_idx])
    return out
