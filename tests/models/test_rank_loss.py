"""Neighbour-ranking distillation (loss ``rank_weight``) and the ``neighbours`` sampler it trains with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniembed.models.losses import NeighbourRankDistillLoss, build_loss, loss_config
from uniembed.train.data import NEIGHBOURS_PER_ANCHOR, epoch_order, nearest_rows


def test_rank_loss_is_zero_for_the_teacher_geometry_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 32, generator=g)
    loss = NeighbourRankDistillLoss(temperature=0.05)
    assert loss(feats * 3.0, feats).item() == pytest.approx(0.0, abs=1e-6)  # scale-free: cosines
    shuffled = feats[torch.randperm(40, generator=g)]
    assert loss(shuffled, feats).item() > 0.5
    assert loss(feats[:2], feats[:2]).item() == 0.0  # too few rows to rank: no signal, no NaN


def test_rank_loss_weighs_near_neighbours_more_than_far_ones() -> None:
    """Swapping a row's nearest neighbour with a far item costs more than swapping two far items: the
    loss is about the top of each ranking, which is what top-5 retrieval keeps."""
    sims = torch.tensor(
        [[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.1, 0.2], [0.2, 0.1, 1.0, 0.3], [0.1, 0.2, 0.3, 1.0]]
    )
    # features with exactly these cosines (Cholesky of the Gram matrix)
    teacher = torch.linalg.cholesky(sims)
    loss = NeighbourRankDistillLoss(temperature=0.05)
    swap_near = teacher[[0, 2, 1, 3]]  # row 0's neighbour 1 and far row 2 trade places
    swap_far = teacher[[0, 1, 3, 2]]
    assert loss(swap_near, teacher) > 3 * loss(swap_far, teacher)


def test_rank_term_trains_a_projection_towards_the_teacher_rankings() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(128, 48, generator=g)
    lin = torch.nn.Linear(48, 8)
    loss = build_loss({"type": "none", "rank_weight": 1.0}, num_classes=1, embedding_dim=8)
    assert loss.margin is None and loss.distill is None and loss.rank is not None
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        out = loss(F.normalize(lin(feats), dim=1), torch.zeros(128, dtype=torch.long), feats)
        first = first if first is not None else out["rank"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["rank"].item() < 0.8 * first


def test_rank_config_validation() -> None:
    assert loss_config({"rank_weight": 1, "type": "none"})["rank_temperature"] == 0.05
    with pytest.raises(ValueError, match="rank_temperature"):
        loss_config({"rank_weight": 1, "rank_temperature": 0})
    with pytest.raises(ValueError, match="rank_weight are all 0"):
        loss_config({"type": "none"})
    with pytest.raises(ValueError, match="needs the input features"):
        build_loss({"type": "none", "rank_weight": 1.0}, 1, 8)(torch.randn(4, 8), torch.zeros(4).long())


def test_nearest_rows_match_brute_force_and_skip_self() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 16, generator=g)
    nb = nearest_rows(x, k=5, block=64)
    f = F.normalize(x, dim=1).numpy()
    sims = f @ f.T
    np.fill_diagonal(sims, -np.inf)
    ref = np.argsort(-sims, axis=1)[:, :5]
    assert nb.shape == (300, 5)
    assert (nb.numpy() == ref).mean() > 0.99  # ties aside
    assert not (nb == torch.arange(300)[:, None]).any()


def test_neighbours_sampler_groups_anchors_with_their_neighbours() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(103, 8, generator=g)
    nb = nearest_rows(x, k=10)
    order = epoch_order(103, "neighbours", torch.Generator().manual_seed(0), neighbours=nb)
    assert len(order) == 103
    per = NEIGHBOURS_PER_ANCHOR + 1
    for start in range(0, 100, per):
        anchor, rest = int(order[start]), order[start + 1 : start + per].tolist()
        assert set(rest) <= set(nb[anchor].tolist())
    again = epoch_order(103, "neighbours", torch.Generator().manual_seed(0), neighbours=nb)
    assert torch.equal(order, again)
    with pytest.raises(ValueError, match="nearest-row table"):
        epoch_order(103, "neighbours", torch.Generator().manual_seed(0))
