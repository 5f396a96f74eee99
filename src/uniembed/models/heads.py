"""Projection heads: cached backbone features [B, D] -> L2-normalised embeddings [B, 64].

The GUIE recipe is a single dense layer on top of a frozen backbone, so the head is deliberately small:

    x.float() -> [L2 normalise] -> (x - center) -> [dropout] -> linear D->64 -> [BatchNorm1d] -> L2 normalise

Everything needed at inference (including the PCA centre used by ``init: pca``) is a parameter or a buffer,
so ``build_head(head_config)`` + ``load_state_dict(state_dict)`` rebuilds it exactly, and ``torch.jit.script``
can compile it for export. Initialisation from training features (PCA / PCA-whitening) is a separate function,
:func:`init_head_from_features`, because it needs data and is not part of the inference graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Keys accepted in a head config, with their defaults. ``in_dim`` has no default: it is the feature width.
HEAD_DEFAULTS: dict[str, Any] = {
    "type": "linear",
    "out_dim": 64,
    "l2_input": True,  # L2-normalise the backbone features first (scale-free input; matches cosine search)
    "center": True,  # subtract a fixed centre (a buffer; zeros until init_head_from_features sets it)
    "dropout": 0.0,
    "batchnorm": False,  # BatchNorm1d on the 64-d output, before the final L2 normalisation
    "bias": True,
    "init": "random",  # random | pca | pca_whiten  (pca* need training features: init_head_from_features)
}

HEAD_INITS = ("random", "pca", "pca_whiten")


def head_config(cfg: dict) -> dict:
    """Validate ``cfg`` and fill in defaults (the stored, complete form of a head config)."""
    unknown = set(cfg) - set(HEAD_DEFAULTS) - {"in_dim"}
    if unknown:
        raise ValueError(
            f"unknown head config keys {sorted(unknown)}; known: in_dim, {', '.join(HEAD_DEFAULTS)}"
        )
    out = dict(HEAD_DEFAULTS, **cfg)
    if out["type"] != "linear":
        raise ValueError(f"unknown head type {out['type']!r} (known: linear)")
    if "in_dim" not in out or int(out["in_dim"]) <= 0:
        raise ValueError("head config needs in_dim (the feature width) > 0")
    if out["init"] not in HEAD_INITS:
        raise ValueError(f"unknown head init {out['init']!r}; known: {', '.join(HEAD_INITS)}")
    if not 0.0 <= float(out["dropout"]) < 1.0:
        raise ValueError(f"head dropout must be in [0, 1), got {out['dropout']}")
    out["in_dim"], out["out_dim"], out["dropout"] = (
        int(out["in_dim"]),
        int(out["out_dim"]),
        float(out["dropout"]),
    )
    if out["init"] != "random" and out["out_dim"] > out["in_dim"]:
        raise ValueError(f"PCA init needs out_dim ({out['out_dim']}) <= in_dim ({out['in_dim']})")
    return out


class LinearHead(nn.Module):
    """Dense projection with fixed input normalisation and an L2-normalised output (TorchScript-able)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 64,
        l2_input: bool = True,
        center: bool = True,
        dropout: float = 0.0,
        batchnorm: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.l2_input = l2_input
        self.use_center = center
        # A buffer, not a parameter: it is a fixed statistic of the training features, saved with the weights.
        self.register_buffer("center", torch.zeros(in_dim))
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)
        self.use_bn = batchnorm
        self.bn = nn.BatchNorm1d(out_dim) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.l2_input:
            x = F.normalize(x, p=2.0, dim=1, eps=1e-12)
        if self.use_center:
            x = x - self.center
        x = self.linear(self.dropout(x))
        x = self.bn(x)
        return F.normalize(x, p=2.0, dim=1, eps=1e-12)


def build_head(cfg: dict) -> nn.Module:
    """Build a head from its config (see ``HEAD_DEFAULTS``; ``in_dim`` required). Weights are random; load a
    ``state_dict`` or call :func:`init_head_from_features` to set them."""
    c = head_config(cfg)
    return LinearHead(
        in_dim=c["in_dim"],
        out_dim=c["out_dim"],
        l2_input=bool(c["l2_input"]),
        center=bool(c["center"]),
        dropout=c["dropout"],
        batchnorm=bool(c["batchnorm"]),
        bias=bool(c["bias"]),
    )


@torch.no_grad()
def pca_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every principal direction of the rows of ``x``: (mean [D] float32, components [D, D] as rows, float64,
    variances [D] float64 with the n - 1 denominator, unclipped), largest variance first.

    Uses the D x D covariance + eigh (float64) rather than an SVD of the data: memory is O(D^2) whatever N is.
    Component signs are fixed (largest-magnitude entry positive) so results are deterministic.
    """
    x = x.float()
    mean = x.mean(0)
    xc = x - mean
    # float32 product (the N x D x D part, 10x faster than float64 on CPU), float64 eigendecomposition
    cov = (xc.T @ xc / max(x.shape[0] - 1, 1)).double()
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True)
    return mean, _fixed_signs(evecs[:, order].T.contiguous()), evals[order]


def _fixed_signs(comps: torch.Tensor) -> torch.Tensor:
    """Components (rows) with their largest-magnitude entry made positive, so results are deterministic."""
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    return comps * torch.where(sign == 0, torch.ones_like(sign), sign)


@torch.no_grad()
def pca_fit(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of rows of ``x`` (float): (mean [D], components [k, D] as rows, variances [k]), largest first,
    all float32 (the top ``k`` of :func:`pca_spectrum`)."""
    x = x.float()
    if k < x.shape[0] - 1 < x.shape[1]:
        top = _pca_top_from_gram(x, k)
        if top is not None:
            return top
    mean, comps, evals = pca_spectrum(x)
    return mean.float(), comps[:k].float(), evals[:k].clamp_min(0).float()


@torch.no_grad()
def _pca_top_from_gram(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The top ``k`` of :func:`pca_spectrum` through the N x N Gram matrix when there are fewer rows than
    dimensions (a small collection, a quick run): the same directions and variances, O(N^2 D) instead of an
    O(D^3) eigendecomposition (2560-d: milliseconds instead of ~5 s). None when a top direction has (almost)
    no variance, so the caller takes the full route."""
    mean = x.mean(0)
    xc = (x - mean).double()
    evals, u = torch.linalg.eigh(xc @ xc.T)  # ascending; evals = (n - 1) * variances
    evals, u = evals.flip(0)[:k], u.flip(1)[:, :k]
    if evals.min() <= 1e-9 * evals.max().clamp_min(1e-300):
        return None
    comps = _fixed_signs((xc.T @ u / evals.sqrt()).T.contiguous())  # unit rows: right singular vectors
    return mean, comps.float(), (evals / max(x.shape[0] - 1, 1)).float()


@torch.no_grad()
def init_head_from_features(head: nn.Module, features: torch.Tensor, init: str, eps: float = 1e-3) -> None:
    """Initialise a :class:`LinearHead` from training features: ``pca`` sets the linear layer to the top
    principal directions (so the untrained head already equals the PCA-64 baseline), ``pca_whiten`` also
    divides by the component standard deviations. ``random`` leaves the default init (centre still set)."""
    if not isinstance(head, LinearHead):
        raise TypeError(f"init_head_from_features needs a LinearHead, got {type(head).__name__}")
    if init not in HEAD_INITS:
        raise ValueError(f"unknown head init {init!r}; known: {', '.join(HEAD_INITS)}")
    x = features.float()
    if head.l2_input:
        x = F.normalize(x, dim=1)
    if head.use_center:
        head.center.copy_(x.mean(0))
    if init == "random":
        return
    if x.shape[0] < 2:
        raise ValueError("PCA init needs at least 2 training features")
    _, comps, var = pca_fit(x, head.out_dim)
    w = comps
    if init == "pca_whiten":
        # Regularise relative to the top variance: near-null directions (N < D) must not blow up.
        w = comps / (var + eps * var.max().clamp_min(1e-12)).sqrt()[:, None]
    head.linear.weight.copy_(w)
    if head.linear.bias is not None:
        # Without an explicit centre, fold the mean into the bias so the projection is still centred.
        bias = torch.zeros(head.out_dim) if head.use_center else -(w @ x.mean(0))
        head.linear.bias.copy_(bias)
