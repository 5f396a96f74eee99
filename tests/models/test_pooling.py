"""Pooling modules: formulas, name parsing, scripting."""

from __future__ import annotations

import pytest
import torch

from uniembed.models.pooling import (
    AvgPool,
    GeMPool,
    MultiStagePool,
    PoolingSpec,
    make_pool,
    parse_pooling,
)


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


def _fields(spec: PoolingSpec) -> tuple:
    return (spec.kind, spec.multi, spec.p, spec.block_l2)


def test_parse_pooling_names() -> None:
    assert _fields(parse_pooling("avg")) == ("avg", False, 1.0, False)
    assert _fields(parse_pooling("gem")) == ("gem", False, 3.0, False)
    assert _fields(parse_pooling("GeM4.5")) == ("gem", False, 4.5, False)
    assert _fields(parse_pooling("avg+stages")) == ("avg", True, 1.0, False)
    assert _fields(parse_pooling("gem+stages")) == ("gem", True, 3.0, False)
    assert _fields(parse_pooling("avg+stages_l2")) == ("avg", True, 1.0, True)
    assert _fields(parse_pooling(" GeM4+Stages_L2 ")) == ("gem", True, 4.0, True)
    # native and +colour are names a backbone accepts, but not pooling modules.
    bad_names = ("max", "gemx", "gem0", "gem-1", "", "avg+stages_l1", "avg_l2", "+stages_l2")
    for bad in (*bad_names, "native", "avg+colour"):
        with pytest.raises(ValueError, match="unknown pooling"):
            parse_pooling(bad)
    assert isinstance(make_pool("avg"), AvgPool)
    assert float(make_pool("gem2").p) == 2.0
    assert float(make_pool(PoolingSpec.parse("gem4+stages")).p) == 4.0


def test_pooling_spec_round_trips_and_types_the_suffixes() -> None:
    for name in ("avg", "gem", "gem4", "gem3.5", "avg+stages", "gem+stages_l2", "avg+stages_l2+colour",
                 "avg+colour", "native", "native+colour"):  # fmt: skip
        assert str(PoolingSpec.parse(name)) == name
    spec = PoolingSpec.parse("avg+stages_l2+colour")
    assert (spec.base, spec.kind, spec.multi, spec.block_l2, spec.colour) == ("avg", "avg", True, True, True)
    assert spec.stages_suffix == "+stages_l2" and str(spec.without_colour()) == "avg+stages_l2"
    gem = PoolingSpec.parse(" GeM4+Stages ")
    assert (gem.kind, gem.p, gem.multi, gem.block_l2, gem.colour) == ("gem", 4.0, True, False, False)
    assert str(gem) == "gem4+stages"  # normalised: lower case, stripped
    native = PoolingSpec.parse("native")
    assert native.kind == "native" and not native.multi and not native.colour
    for bad in ("max", "native+stages", "avg+colour+stages", "+colour", "gem0+colour"):
        with pytest.raises(ValueError, match="unknown pooling"):
            PoolingSpec.parse(bad)


def test_multi_stage_pool_concatenates() -> None:
    maps = [torch.rand(2, 3, 8, 8), torch.rand(2, 5, 4, 4)]
    out = MultiStagePool("avg", 2)(maps)
    assert out.shape == (2, 8)
    assert torch.allclose(out[:, :3], maps[0].mean(dim=(2, 3)))
    assert torch.allclose(out[:, 3:], maps[1].mean(dim=(2, 3)))


def test_block_l2_multi_stage_pool_normalises_each_block() -> None:
    """``+stages_l2``: every stage's pooled vector has unit norm, so a large-scale wide map cannot drown a
    small narrow one; the direction within each block is the plain pooled direction."""
    maps = [torch.rand(3, 4, 8, 8), torch.rand(3, 6, 4, 4) * 50.0, torch.rand(3, 10, 2, 2) * 0.01]
    out = MultiStagePool("avg+stages_l2", 3)(maps)
    assert out.shape == (3, 20)
    blocks = out.split([4, 6, 10], dim=1)
    for blk, m in zip(blocks, maps, strict=True):
        assert torch.allclose(blk.norm(dim=1), torch.ones(3), atol=1e-5)
        ref = m.mean(dim=(2, 3))
        assert torch.allclose(blk, ref / ref.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.full((3,), 3.0**0.5), atol=1e-5)
    # Without the suffix nothing is normalised (the old ``+stages`` behaviour is unchanged).
    plain = MultiStagePool("avg+stages", 3)(maps)
    assert torch.allclose(plain[:, 4:10], maps[1].mean(dim=(2, 3)))
    # GeM + block norm: same per-block unit norm.
    g = MultiStagePool("gem+stages_l2", 3)(maps)
    assert torch.allclose(g[:, :4].norm(dim=1), torch.ones(3), atol=1e-5)


def test_block_l2_is_safe_for_zero_maps_and_low_precision() -> None:
    """An all-zero stage (dead ReLU map) gives a zero block, not NaN; bf16 input keeps its dtype."""
    maps = [torch.zeros(2, 3, 4, 4), torch.rand(2, 5, 2, 2)]
    out = MultiStagePool("avg+stages_l2", 2)(maps)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :3], torch.zeros(2, 3))
    bf = MultiStagePool("avg+stages_l2", 2)([m.to(torch.bfloat16) for m in maps])
    assert bf.dtype == torch.bfloat16
    assert torch.allclose(bf[:, 3:].float().norm(dim=1), torch.ones(2), atol=1e-2)
    with pytest.raises(ValueError, match="does not match"):
        MultiStagePool("avg+stages_l2", 3)(maps)
    with pytest.raises(ValueError, match="at least one map"):
        MultiStagePool("avg+stages_l2", 0)


def test_pools_are_scriptable() -> None:
    x = torch.rand(2, 4, 5, 5)
    for m in (AvgPool(), GeMPool(3.0)):
        assert torch.allclose(torch.jit.script(m)(x), m(x), atol=1e-6)
    msp = MultiStagePool("gem", 2)
    maps = [x, torch.rand(2, 6, 3, 3)]
    assert torch.allclose(torch.jit.script(msp)(maps), msp(maps), atol=1e-6)
    l2 = MultiStagePool("avg+stages_l2", 2)
    scripted = torch.jit.script(l2)
    assert torch.allclose(scripted(maps), l2(maps), atol=1e-6)
    assert not torch.allclose(scripted(maps), msp(maps))
