"""Embeddings scored beside the evaluated model: a head on cached features, and the training-free baselines
(``raw`` = L2-normalised backbone features, ``pca<k>``, and their ``_cnn`` variants without colour)."""

from __future__ import annotations

from typing import Any

import numpy as np

from uniembed.eval.inputs import EvalError

BASELINES = ("raw", "pca64")
#: ``raw_cnn`` / ``pca64_cnn``: the baseline on the CNN columns only (features of a ``+colour`` pooling).
CNN_SUFFIX = "_cnn"


def check_compare(compare: list[str] | tuple[str, ...]) -> list[str]:
    """The ``--compare`` names, stripped and checked (EvalError naming the known ones)."""
    names = [c.strip() for c in compare if c.strip()]
    for c in names:
        base_c = c.removesuffix(CNN_SUFFIX)
        if not (base_c == "raw" or (base_c.startswith("pca") and base_c[3:].isdigit())):
            raise EvalError(
                f"unknown --compare method {c!r}; known: raw, pca<k> (e.g. pca64), and raw_cnn / pca<k>_cnn "
                "(the same without the colour block of a '+colour' pooling)"
            )
    return names


def _colour_dim(info: dict) -> int:
    """Width of the colour-histogram block at the end of ``+colour`` features (0 without one)."""
    from uniembed.models.colour import COLOUR_BINS, split_colour

    return COLOUR_BINS**3 if split_colour(str(info.get("pooling") or ""))[1] else 0


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def baseline_embeddings(name: str, feats: np.ndarray, fit_feats: np.ndarray) -> tuple[np.ndarray, str]:
    """``raw``: L2-normalised features. ``pca<k>``: L2-normalise, PCA fitted on ``fit_feats``, project to k,
    L2-normalise (the same PCA the head's ``init: pca`` starts from)."""
    import torch

    from uniembed.models.heads import pca_fit

    x = _l2(np.asarray(feats, np.float32))
    if name == "raw":
        return x, "L2-normalised backbone features"
    if name.startswith("pca") and name[3:].isdigit():
        k_req = int(name[3:])
        fit = _l2(np.asarray(fit_feats, np.float32))
        k = min(k_req, fit.shape[1], max(1, fit.shape[0] - 1))
        if fit.shape[0] < 2:
            raise EvalError(f"{name}: need at least 2 rows to fit PCA, have {fit.shape[0]}")
        mean, comps, _ = pca_fit(torch.from_numpy(fit), k)
        proj = (torch.from_numpy(x) - mean) @ comps.T
        note = f"PCA to {k} dims fitted on {fit.shape[0]} rows"
        if k < k_req:
            note += f" (asked {k_req}; limited by the fit rows / feature width)"
        return _l2(proj.numpy()), note
    raise EvalError(f"unknown baseline {name!r}; known: raw, pca<k> (e.g. pca64)")


def compare_embeddings(
    compare: list[str], feats: np.ndarray, fit_feats: np.ndarray, info: dict
) -> dict[str, tuple[np.ndarray, str]]:
    """{name: (embeddings, note)} of every ``--compare`` baseline; ``_cnn`` names drop the colour block of
    ``+colour`` features (``info``: the feature set's info.json) first."""
    colour_dim = _colour_dim(info)
    out: dict[str, tuple[np.ndarray, str]] = {}
    for c in compare:
        if not c.endswith(CNN_SUFFIX):
            out[c] = baseline_embeddings(c, feats, fit_feats)
            continue
        if not colour_dim:
            raise EvalError(
                f"--compare {c}: the features have no colour block (pooling {info.get('pooling')!r}; "
                "'_cnn' baselines need a '+colour' pooling)"
            )
        emb, note = baseline_embeddings(
            c.removesuffix(CNN_SUFFIX), feats[:, :-colour_dim], fit_feats[:, :-colour_dim]
        )
        out[c] = emb, note + f" (CNN part only: the last {colour_dim} colour-histogram columns dropped)"
    return out


def head_embeddings(head: Any, feats: np.ndarray, batch: int = 4096) -> np.ndarray:
    """A head applied to cached backbone features, in blocks (no gradients)."""
    import torch

    with torch.no_grad():
        return (
            np.concatenate(
                [
                    head(torch.from_numpy(np.asarray(feats[i : i + batch], np.float32))).numpy()
                    for i in range(0, len(feats), batch)
                ]
            )
            if len(feats)
            else np.zeros((0, 1))
        )
