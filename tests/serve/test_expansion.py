"""alpha-QE and DBA (uniembed.serve.expansion) on small synthetic clusters."""

from __future__ import annotations

import numpy as np
import pytest

from uniembed.serve.expansion import (
    DEFAULTS,
    ExpansionSettings,
    alpha_qe,
    dba,
    dba_from_knn,
    expand_queries,
    expander,
    knn_ip,
    l2n,
    neighbour_weights,
    settings_for_index,
)

DIM = 16


@pytest.fixture(scope="module")
def clusters() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three tight-ish clusters of 20 unit vectors: (vectors, cluster of each row, cluster centres)."""
    rng = np.random.default_rng(0)
    centres = l2n(rng.normal(size=(3, DIM)))
    which = np.repeat(np.arange(3), 20)
    x = l2n(centres[which] + 0.35 * rng.normal(size=(60, DIM)) / np.sqrt(DIM))
    return x, which, centres


def _faiss_flat(x: np.ndarray):
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x, np.float32))
    return index


def test_dba_with_no_neighbours_is_identity(clusters):
    x, _, _ = clusters
    np.testing.assert_array_equal(dba(x, 0, 3.0), x)


def test_dba_keeps_shape_and_unit_norm_and_tightens_clusters(clusters):
    x, which, centres = clusters
    y = dba(x, 5, 1.0)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    before = np.mean(np.sum(x * centres[which], 1))
    after = np.mean(np.sum(y * centres[which], 1))
    assert after > before + 0.01


def test_dba_is_the_weighted_average_of_self_and_neighbours(clusters):
    x, _, _ = clusters
    sims, ids = knn_ip(x, x, 3, exclude_self=True)
    assert not (ids == np.arange(len(x))[:, None]).any()
    w = np.maximum(sims, 0) ** 3
    expected = l2n(x + np.einsum("jm,jmd->jd", w, x[ids]))
    np.testing.assert_allclose(dba(x, 3, 3.0), expected, atol=1e-6)
    np.testing.assert_allclose(dba_from_knn(x, sims, ids, 3, 3.0), expected, atol=1e-6)


def test_qe_pulls_a_query_towards_its_cluster(clusters):
    x, which, centres = clusters
    rng = np.random.default_rng(1)
    q = l2n(centres[[0, 1, 2]] + 0.5 * rng.normal(size=(3, DIM)) / np.sqrt(DIM))
    expanded = alpha_qe(x, q, 5, 1.0)
    assert expanded.shape == q.shape
    np.testing.assert_allclose(np.linalg.norm(expanded, axis=1), 1.0, atol=1e-5)
    gain = np.sum(expanded * centres, 1) - np.sum(q * centres, 1)
    assert (gain > 0).all(), gain


def test_alpha_weights_neighbours_by_similarity():
    sims = np.array([[0.9, 0.1, -0.4]], np.float32)
    np.testing.assert_allclose(neighbour_weights(sims, 0.0), [[1, 1, 1]])
    np.testing.assert_allclose(neighbour_weights(sims, 1.0), [[0.9, 0.1, 0.0]], atol=1e-7)
    np.testing.assert_allclose(neighbour_weights(sims, 3.0), [[0.729, 0.001, 0.0]], atol=1e-6)
    # a far neighbour moves the query less as alpha grows: alpha 0 is the plain average
    base = np.array([[1.0, 0.0]], np.float32)
    far = l2n(np.array([[0.2, 1.0]], np.float32))
    moved = [alpha_qe(np.vstack([far]), base, 1, a)[0, 1] for a in (0.0, 1.0, 3.0)]
    assert moved[0] > moved[1] > moved[2] > 0


def test_qe_with_n_zero_only_normalises(clusters):
    x, _, _ = clusters
    q = 3.0 * x[:4]
    np.testing.assert_allclose(alpha_qe(x, q, 0, 3.0), x[:4], atol=1e-6)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_qe_from_a_faiss_index_matches_the_vectors(clusters, kind):
    import faiss

    x, _, _ = clusters
    if kind == "flat":
        index = _faiss_flat(x)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(DIM, 16)
        index.hnsw.efSearch = 64
        index.add(x)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(DIM), DIM, 2)
        index.train(x)
        index.nprobe = 2
        index.add(x)
    q = x[:5] + 0.01
    np.testing.assert_allclose(alpha_qe(index, q, 3, 3.0), alpha_qe(x, q, 3, 3.0), atol=1e-5)


def test_exclude_skips_the_item_itself(clusters):
    x, _, _ = clusters
    rows = np.array([0, 25, 50])
    got = alpha_qe(_faiss_flat(x), x[rows], 3, 1.0, exclude=rows)
    for r, g in zip(rows, got, strict=True):
        others = np.delete(x, r, axis=0)
        np.testing.assert_allclose(g, alpha_qe(others, x[r : r + 1], 3, 1.0)[0], atol=1e-5)


def test_expand_queries_follows_the_settings(clusters):
    x, _, _ = clusters
    index = _faiss_flat(x)
    q = x[:3]
    assert ExpansionSettings().off and DEFAULTS["adapted"].qe_n >= 0
    np.testing.assert_array_equal(expand_queries(index, q, ExpansionSettings(dba_n=3)), q)
    on = ExpansionSettings(qe_n=2, qe_alpha=1.0)
    np.testing.assert_allclose(expand_queries(index, q, on), alpha_qe(x, q, 2, 1.0), atol=1e-5)
    assert on.describe() == "alpha-QE n=2 alpha=1"
    assert ExpansionSettings.from_dict(on.to_dict()) == on
    with pytest.raises(ValueError):
        ExpansionSettings(qe_n=-1)


def test_eval_new_image_scoring_matches_a_rebuild_without_the_query():
    """The measurement's 'new image' figures: DBA rebuilt per query without it, computed exactly."""
    from uniembed_lab import expansion_eval as ev

    rng = np.random.default_rng(2)
    x = l2n(rng.normal(size=(60, 6)))
    codes = rng.integers(0, 8, size=60)
    counts = np.bincount(codes)
    rows = np.arange(0, 60, 5)
    scores = ev.score_rows(x, rows, codes, counts)
    assert 0 < np.nanmean(scores["off"]["new"]) < 1
    for qi, q in enumerate(rows):
        keep = np.delete(np.arange(len(x)), q)
        db = dba(x[keep], 2, 3.0)
        for name, query in (("dba", x[q : q + 1]), ("both", alpha_qe(db, x[q : q + 1], 2, 3.0))):
            top = keep[np.argsort(-(db @ query[0]), kind="stable")[:5]]
            want = ev.p_at_5(top[None], np.array([q]), codes, counts)[0]
            assert scores[ev.key(name, 2, 3.0)]["new"][qi] == pytest.approx(want)


def test_eval_report_on_tiny_data(tmp_path):
    """The measurement end to end (grid, choice, report.md/json, plot) on 2 domains of random vectors."""
    import json

    from rich.console import Console

    from uniembed_lab import expansion_eval as ev

    rng = np.random.default_rng(3)
    labels = np.array([f"l{i % 12}" for i in range(48)])
    domains = np.array(["a_x" if i % 12 < 6 else "b_y" for i in range(48)])
    emb = {"labels": labels, "domains": domains, "adapted": l2n(rng.normal(size=(48, 8)))}
    emb.update({f"head:{d}": l2n(rng.normal(size=(48, 4))) for d in ("a_x", "b_y")})
    results = ev.measure(emb, Console(quiet=True))
    assert set(results) == {"adapted", "model"} and len(results["model"]) == len(ev.grid())
    picks = {e: ev.choose(r) for e, r in results.items()}
    for p in picks.values():
        assert p.chosen in (p.best, "off") and set(p.held_out) == {"a_x", "b_y"}
        assert (p.chosen == "off") == (p.gain <= 0 or p.held_out_gain < ev.MIN_GAIN)
    ev.write_outputs(results, picks, tmp_path, 1.0)
    report = (tmp_path / "report.md").read_text()
    assert "| off |" in report and "delta (new image)" in report
    assert json.loads((tmp_path / "report.json").read_text())["chosen"] == {
        e: p.chosen for e, p in picks.items()
    }
    assert (tmp_path / "per_domain.png").stat().st_size > 1000


def test_choose_needs_a_gain_that_holds_on_held_out_domains():
    from uniembed_lab import expansion_eval as ev

    def res(**per_setting):
        return {s: {"new": dict(zip("abc", v, strict=True))} for s, v in per_setting.items()}

    steady = ev.choose(res(off=[0.5, 0.5, 0.5], good=[0.52, 0.53, 0.52], bad=[0.4, 0.4, 0.4]))
    assert (steady.chosen, steady.best) == ("good", "good") and steady.held_out_gain > ev.MIN_GAIN
    # one domain carries the mean; held out, each pick loses elsewhere: stays off
    lucky = ev.choose(res(off=[0.5, 0.5, 0.5], x=[0.6, 0.49, 0.49], y=[0.49, 0.6, 0.49], z=[0.49, 0.49, 0.6]))
    assert lucky.gain > 0 and lucky.chosen == "off" and lucky.held_out_gain < 0


def test_settings_for_index_reads_what_the_build_recorded():
    recorded = {"qe_n": 3, "qe_alpha": 1, "dba_n": 2, "dba_alpha": 3}
    assert settings_for_index({"expansion": recorded}) == ExpansionSettings(3, 1.0, 2, 3.0)
    # older indexes hold plain vectors: the default's QE part only
    old_model = settings_for_index({"model": {}})
    assert old_model.dba_n == 0 and old_model.qe_n == DEFAULTS["model"].qe_n
    assert settings_for_index({"adapt": {"spec": "pcaw256"}}).qe_n == DEFAULTS["adapted"].qe_n


class _FakeImageIndex:
    """What the hook uses of ImageIndex: stable ids -> FAISS rows, and the FAISS index."""

    def __init__(self, x: np.ndarray) -> None:
        self.index = _faiss_flat(x)

    def position(self, item_id: int) -> int | None:
        return item_id - 100 if 100 <= item_id < 100 + self.index.ntotal else None

    def reconstructable_index(self):
        return self.index


def test_expander_is_the_search_hook_and_skips_excluded_items(clusters):
    x, _, _ = clusters
    ix = _FakeImageIndex(x)
    assert expander(ExpansionSettings()) is None
    hook = expander(ExpansionSettings(qe_n=3, qe_alpha=1.0), exclude_ids=[105, 7])  # 7: not indexed
    got = hook(ix, x[5:6])
    np.testing.assert_allclose(got[0], alpha_qe(np.delete(x, 5, axis=0), x[5:6], 3, 1.0)[0], atol=1e-5)
    # several rows excluded per query
    two = alpha_qe(x, x[5:6], 3, 1.0, exclude=np.array([[5, 6]]))
    np.testing.assert_allclose(two[0], alpha_qe(np.delete(x, [5, 6], axis=0), x[5:6], 3, 1.0)[0], atol=1e-5)
