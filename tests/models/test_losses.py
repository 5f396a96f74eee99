"""Margin losses, dynamic margins, similarity distillation, their composition and the loss registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniembed.models.heads import build_head
from uniembed.models.losses import (
    MARGIN_LOSSES,
    DynamicMarginArcFace,
    MarginLoss,
    SimilarityDistillLoss,
    build_loss,
    dynamic_margins,
    loss_config,
    margin_degrees,
    register_margin_loss,
)
from uniembed.models.losses.margin import check_non_negative


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: thread synchronisation on a busy 2-core machine costs 10-100x the arithmetic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _separable(
    n_cls: int = 6, per: int = 20, d: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_cls, d, generator=g) * 3
    y = torch.arange(n_cls).repeat_interleave(per)
    x = centres[y] + 0.3 * torch.randn(len(y), d, generator=g)
    return x, y


@pytest.mark.parametrize("loss_type", ["arcface", "subcenter_arcface", "dynamic_arcface", "softmax"])
def test_margin_loss_decreases_and_separates_classes(loss_type: str) -> None:
    torch.manual_seed(0)
    x, y = _separable()
    head = build_head({"in_dim": 32, "out_dim": 16, "center": False})
    loss = build_loss(
        {"type": loss_type},
        num_classes=6,
        embedding_dim=16,
        class_counts=np.bincount(y.numpy()) + np.arange(6),
    )
    opt = torch.optim.Adam([*head.parameters(), *loss.parameters()], lr=1e-2)
    losses = []
    for _ in range(150):
        out = loss(head(x), y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    # The learnt embedding puts every sample nearest to a sample of its own class.
    e = head.eval()(x)
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    assert (y[sim.argmax(1)] == y).float().mean() > 0.95


def test_margin_units_and_pml_degrees() -> None:
    assert margin_degrees(loss_config({"margin": 0.5})) == pytest.approx(math.degrees(0.5))
    assert margin_degrees(loss_config({"margin": 28.6, "margin_unit": "deg"})) == pytest.approx(28.6)
    loss = build_loss({"type": "arcface", "margin": 0.5}, 5, 8)
    assert loss.margin.fn.margin == pytest.approx(0.5)  # PML converts its degrees back to radians
    with pytest.raises(ValueError, match="margin_unit"):
        loss_config({"margin_unit": "grad"})


def test_dynamic_margins_from_class_counts() -> None:
    counts = np.array([1, 16, 81, 10000])
    m = dynamic_margins(counts, m_min=0.05, m_max=0.5, power=0.25)
    assert m[0] == pytest.approx(0.5) and m[-1] == pytest.approx(0.05)
    assert torch.all(m[:-1] > m[1:])  # rarer class -> larger margin
    # Exactly affine in n^-1/4: m = a * n^-1/4 + b.
    r = torch.tensor(counts, dtype=torch.float64).pow(-0.25)
    a = (0.5 - 0.05) / (r.max() - r.min())
    b = 0.05 - a * r.min()
    torch.testing.assert_close(m.double(), a * r + b, rtol=1e-6, atol=1e-6)
    assert torch.all(dynamic_margins(np.array([7, 7, 7]), 0.05, 0.5) == 0.5)
    with pytest.raises(ValueError, match="positive"):
        dynamic_margins(np.array([3, 0]), 0.05, 0.5)
    # Built from a config with degrees: converted to radians.
    loss = build_loss(
        {"type": "dynamic_arcface", "margin_unit": "deg", "margin_min": 10, "margin_max": 30},
        4,
        8,
        class_counts=counts,
    )
    torch.testing.assert_close(
        loss.margin.fn.margins, dynamic_margins(counts, math.radians(10), math.radians(30))
    )


def test_dynamic_arcface_with_equal_margins_matches_pml_arcface() -> None:
    """Same centres, same margin for every class -> our per-class ArcFace equals PML's ArcFaceLoss."""
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(32, 16), dim=1)
    y = torch.randint(0, 5, (32,))
    pml = build_loss({"type": "arcface", "margin": 0.3, "scale": 20}, 5, 16).margin
    ours = DynamicMarginArcFace(5, 16, torch.full((5,), 0.3), scale=20)
    with torch.no_grad():
        ours.W.copy_(pml.fn.W.T)
    torch.testing.assert_close(ours(emb, y), pml(emb, y), atol=1e-5, rtol=1e-5)


def test_subcenter_shapes() -> None:
    loss = build_loss({"type": "subcenter_arcface"}, num_classes=7, embedding_dim=64)
    assert loss.cfg["sub_centers"] == 3  # default k for sub-center ArcFace
    assert tuple(loss.margin.fn.W.shape) == (64, 21)  # PML: [E, C*k]
    assert tuple(loss.margin.centers().shape) == (21, 64)
    ours = build_loss({"type": "dynamic_arcface", "sub_centers": 2}, 7, 64, class_counts=np.arange(1, 8))
    assert tuple(ours.margin.centers().shape) == (14, 64)
    assert tuple(ours.margin.fn.cosine(torch.randn(5, 64)).shape) == (5, 7)  # max over sub-centres
    out = loss(F.normalize(torch.randn(4, 64), dim=1), torch.tensor([0, 3, 6, 6]))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_similarity_distillation_and_composition() -> None:
    torch.manual_seed(0)
    feats = torch.randn(16, 64)
    d = SimilarityDistillLoss()
    assert float(d(F.normalize(feats, dim=1), feats)) == pytest.approx(0.0, abs=1e-10)
    assert float(d(torch.randn(16, 64), feats)) > 0.01
    emb = F.normalize(torch.randn(16, 64), dim=1)
    y = torch.arange(16) % 4
    only_margin = build_loss({"type": "arcface"}, 4, 64)
    both = build_loss({"type": "arcface", "margin_weight": 0.5, "distill_weight": 3.0}, 4, 64)
    both.load_state_dict(only_margin.state_dict())
    a, b = only_margin(emb, y), both(emb, y, feats)
    torch.testing.assert_close(b["margin"], a["margin"])
    torch.testing.assert_close(b["loss"], 0.5 * a["margin"] + 3.0 * b["distill"])
    pure = build_loss({"type": "none", "distill_weight": 1.0}, 4, 64)
    assert pure.margin is None and len(list(pure.parameters())) == 0
    with pytest.raises(ValueError, match="input features"):
        both(emb, y)
    with pytest.raises(ValueError, match="nothing to optimise"):
        loss_config({"type": "none"})
    with pytest.raises(ValueError, match="unknown loss type"):
        loss_config({"type": "cosface"})


@pytest.fixture
def cosface_registered():
    """A margin loss registered for one test only (the registry is global)."""
    saved = dict(MARGIN_LOSSES)

    @register_margin_loss("cosface")
    class CosFace(MarginLoss):
        defaults = {**MarginLoss.defaults, "cos_margin": 0.35}
        centers_transposed = True

        @classmethod
        def check_config(cls, c: dict) -> None:
            check_non_negative(c, "cos_margin")

        def build(self, cfg, num_classes, embedding_dim, class_counts):
            from pytorch_metric_learning import losses as pml

            return pml.CosFaceLoss(
                num_classes=num_classes,
                embedding_size=embedding_dim,
                margin=cfg["cos_margin"],
                scale=cfg["scale"],
            )

    yield CosFace
    MARGIN_LOSSES.clear()
    MARGIN_LOSSES.update(saved)


def test_one_registered_class_is_a_new_loss_type(cosface_registered) -> None:
    """Adding a loss is one class: its type, its own config keys (checked), the combination with the
    in-batch terms and the centres all follow from the registration."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delitem(MARGIN_LOSSES, "cosface")  # not registered: its key is unknown
        with pytest.raises(ValueError, match="unknown loss config keys"):
            loss_config({"type": "arcface", "cos_margin": 0.2})
    with pytest.raises(ValueError, match="cos_margin must be >= 0"):
        loss_config({"type": "arcface", "cos_margin": -1})
    loss = build_loss({"type": "cosface", "cos_margin": 0.2, "rank_weight": 1.0}, 4, 8)
    assert isinstance(loss.margin, cosface_registered) and loss.terms == ("margin", "rank")
    assert loss.margin.fn.margin == pytest.approx(0.2) and tuple(loss.margin.centers().shape) == (4, 8)
    g = torch.Generator().manual_seed(0)
    emb, feats = F.normalize(torch.randn(12, 8, generator=g), dim=1), torch.randn(12, 16, generator=g)
    out = loss(emb, torch.arange(12) % 4, feats)
    torch.testing.assert_close(out["loss"], out["margin"] + out["rank"])
    assert loss.weighted_total({"margin": 2.0, "rank": 0.5}) == pytest.approx(2.5)
