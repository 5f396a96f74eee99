"""Pooling modules: formulas, name parsing, scripting."""

from __future__ import annotations

import pytest
import torch

from uniembed.models.pooling import AvgPool, GeMPool, MultiStagePool, make_pool, parse_pooling


def test_avg_pool_is_spatial_mean() -> None:
    x = torch.rand(2, 5, 4, 3)
    assert torch.allclose(AvgPool()(x), x.mean(dim=(2, 3)))


def test_gem_formula_and_limits() -> None:
    x = torch.rand(3, 8, 7, 7) + 0.01
    expected = x.pow(3).mean(dim=(2, 3)).pow(1 / 3)
    assert torch.allclose(GeMPool(3.0)(x), expected, atol=1e-6)
    # p=1 is average pooling; a large p approaches max pooling.
    assert torch.allclose(GeMPool(1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)
    big = GeMPool(60.0)(x)
    assert torch.allclose(big, x.amax(dim=(2, 3)), rtol=0.1)
    # GeM lies between the mean and the max.
    g = GeMPool(3.0)(x)
    assert bool((g >= x.mean(dim=(2, 3)) - 1e-6).all()) and bool((g <= x.amax(dim=(2, 3)) + 1e-6).all())


def test_gem_clamps_negatives_and_keeps_dtype() -> None:
    x = -torch.rand(1, 2, 3, 3)  # all negative -> clamped to eps
    out = GeMPool(3.0, eps=1e-6)(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.full_like(out, 1e-6), rtol=1e-3)
    xb = torch.rand(2, 4, 3, 3).to(torch.bfloat16)
    assert GeMPool()(xb).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="p must be > 0"):
        GeMPool(0.0)


def test_parse_pooling_names() -> None:
    assert parse_pooling("avg") == ("avg", False, 1.0)
    assert parse_pooling("gem") == ("gem", False, 3.0)
    assert parse_pooling("GeM4.5") == ("gem", False, 4.5)
    assert parse_pooling("avg+stages") == ("avg", True, 1.0)
    assert parse_pooling("gem+stages") == ("gem", True, 3.0)
    for bad in ("max", "gemx", "gem0", "gem-1", ""):
        with pytest.raises(ValueError, match="unknown pooling"):
            parse_pooling(bad)
    assert isinstance(make_pool("avg"), AvgPool)
    assert float(make_pool("gem2").p) == 2.0


def test_multi_stage_pool_concatenates() -> None:
    maps = [torch.rand(2, 3, 8, 8), torch.rand(2, 5, 4, 4)]
    out = MultiStagePool("avg", 2)(maps)
    assert out.shape == (2, 8)
    assert torch.allclose(out[:, :3], maps[0].mean(dim=(2, 3)))
    assert torch.allclose(out[:, 3:], maps[1].mean(dim=(2, 3)))


def test_pools_are_scriptable() -> None:
    x = torch.rand(2, 4, 5, 5)
    for m in (AvgPool(), GeMPool(3.0)):
        assert torch.allclose(torch.jit.script(m)(x), m(x), atol=1e-6)
    msp = MultiStagePool("gem", 2)
    maps = [x, torch.rand(2, 6, 3, 3)]
    assert torch.allclose(torch.jit.script(msp)(maps), msp(maps), atol=1e-6)
