"""Projection heads: shapes, normalisation, rebuild from config + state_dict, TorchScript, PCA init."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from uniembed.models.heads import build_head, head_config, init_head_from_features, pca_fit, pca_spectrum


def _feats(n: int = 200, d: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).abs() + torch.linspace(0, 2, d)


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"dropout": 0.3, "batchnorm": True},
        {"l2_input": False, "center": False, "bias": False},
        {"init": "pca"},
        {"init": "pca_whiten", "batchnorm": True},
    ],
)
def test_head_output_is_64d_unit_norm_and_rebuilds_from_state(cfg: dict) -> None:
    x = _feats()
    head = build_head(dict(cfg, in_dim=96))
    init_head_from_features(head, x, head_config(dict(cfg, in_dim=96))["init"])
    head.train()
    head(x)  # a training step's forward updates BatchNorm running stats
    head.eval()
    y = head(x.half())  # float16 cached features go straight in
    assert y.shape == (200, 64) and y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=1), torch.ones(200))
    # Everything needed at inference (centre buffer, BN stats) is in the state_dict.
    buf = io.BytesIO()
    torch.save({"cfg": dict(cfg, in_dim=96), "sd": head.state_dict()}, buf)
    buf.seek(0)
    rec = torch.load(buf, weights_only=True)
    again = build_head(rec["cfg"])
    again.load_state_dict(rec["sd"])
    torch.testing.assert_close(again.eval()(x), head(x))


def test_head_is_torchscript_scriptable_with_identical_output() -> None:
    x = _feats()
    head = build_head({"in_dim": 96, "dropout": 0.2, "batchnorm": True})
    init_head_from_features(head, x, "pca")
    head.eval()
    scripted = torch.jit.script(head)
    torch.testing.assert_close(scripted(x), head(x))
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    torch.testing.assert_close(loaded(x.half()), head(x.half()))


def test_pca_init_equals_pca_projection() -> None:
    x = _feats()
    head = build_head({"in_dim": 96, "init": "pca"})
    init_head_from_features(head, x, "pca")
    xn = F.normalize(x, dim=1)
    mean, comps, var = pca_fit(xn, 64)
    expected = F.normalize((xn - mean) @ comps.T, dim=1)
    torch.testing.assert_close(head.eval()(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(var[:-1] >= var[1:])  # sorted, largest first
    # Components are orthonormal.
    torch.testing.assert_close(comps @ comps.T, torch.eye(64), atol=1e-5, rtol=0)


def test_pca_spectrum_is_the_whole_covariance_and_pca_fit_its_top() -> None:
    mix = torch.randn(12, 12, generator=torch.Generator().manual_seed(1))
    x = _feats(n=300)[:, :12] @ mix  # correlated columns
    mean, comps, var = pca_spectrum(x)
    assert comps.shape == (12, 12) and torch.all(var[:-1] >= var[1:])
    xc = x.float() - mean
    cov = (xc.T @ xc / (len(x) - 1)).double()
    torch.testing.assert_close(comps.T @ torch.diag(var) @ comps, cov, atol=1e-4, rtol=1e-4)
    top_mean, top_comps, top_var = pca_fit(x, 5)
    assert torch.equal(top_mean, mean) and torch.equal(top_comps, comps[:5].float())
    assert torch.equal(top_var, var[:5].clamp_min(0).float())


def test_pca_fit_with_fewer_rows_than_dimensions_matches_the_full_spectrum() -> None:
    """Fewer rows than dimensions takes the Gram-matrix route: the same top directions and variances."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 300, generator=g) * torch.linspace(3.0, 0.1, 300)
    mean, comps, var = pca_spectrum(x)
    top_mean, top_comps, top_var = pca_fit(x, 16)
    torch.testing.assert_close(top_mean, mean.float())
    torch.testing.assert_close(top_comps, comps[:16].float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(top_var, var[:16].float(), atol=1e-6, rtol=1e-5)
    # rank 4 (repeated rows): the null directions come from the full route, variances ~0, no division by 0
    dup = torch.randn(5, 300, generator=g).repeat(8, 1)
    _, c, v = pca_fit(dup, 10)
    assert torch.isfinite(c).all() and torch.allclose(c.norm(dim=1), torch.ones(10), atol=1e-4)
    assert v[4:].max() < 1e-4 * v[0]


def test_pca_init_without_centre_folds_mean_into_bias() -> None:
    x = _feats()
    a = build_head({"in_dim": 96, "init": "pca"})
    b = build_head({"in_dim": 96, "init": "pca", "center": False})
    init_head_from_features(a, x, "pca")
    init_head_from_features(b, x, "pca")
    assert torch.count_nonzero(b.center) == 0
    torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-5)


def test_pca_whiten_gives_unit_variance_projections() -> None:
    x = _feats(n=2000)
    head = build_head({"in_dim": 96, "init": "pca_whiten"})
    init_head_from_features(head, x, "pca_whiten")
    with torch.no_grad():
        z = head.linear(F.normalize(x, dim=1) - head.center)
    std = z.std(0)
    assert torch.allclose(std, torch.ones_like(std), atol=0.05), std


def test_head_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="in_dim"):
        build_head({})
    with pytest.raises(ValueError, match="unknown head config keys"):
        build_head({"in_dim": 8, "drop_out": 0.1})
    with pytest.raises(ValueError, match="init"):
        build_head({"in_dim": 8, "init": "xavier"})
    with pytest.raises(ValueError, match="out_dim"):
        build_head({"in_dim": 32, "init": "pca"})  # out_dim 64 > in_dim 32
    with pytest.raises(ValueError, match="dropout"):
        build_head({"in_dim": 8, "dropout": 1.5})
