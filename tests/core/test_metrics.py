"""GUIE metrics pinned on hand-computed cases (1-D embeddings so distances are obvious), plus a
brute-force reference on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uniembed.core.metrics import knn, per_domain_metrics, per_domain_mp5, retrieval_metrics


def col(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float32)[:, None]


# ---------------------------------------------------------------- leave-one-out, n_q < 5, ties, n_q = 0

# positions 0 1 2 10 11 30, labels a a b b a c
LOO_EMB = col(0, 1, 2, 10, 11, 30)
LOO_LAB = np.array(["a", "a", "b", "b", "a", "c"])


def test_leave_one_out_hand_computed() -> None:
    r = retrieval_metrics(LOO_EMB, LOO_LAB)
    # q0 (a, n_q=2): order 1a 2b 3b 4a 5c -> P@min(2,5)=1/2, r1=1, AP=(1/1 + 2/4)/2
    # q1 (a, n_q=2): 0 and 2 tie at distance 1 -> lower index (0, an "a") first: P=1/2, r1=1, AP=0.75
    # q2 (b, n_q=1): order 1a 0a 3b ... -> P@1=0, r1=0, r5=1, AP=1/3
    # q3 (b, n_q=1): order 4a 2b ... -> P@1=0, r5=1, AP=1/2
    # q4 (a, n_q=2): order 3b 2b 1a 0a -> P@2=0, r5=1, AP=(1/3 + 2/4)/2
    # q5 (c, n_q=0): skipped, counted
    np.testing.assert_allclose(r.per_query_mp5, [0.5, 0.5, 0, 0, 0, 0])
    np.testing.assert_array_equal(r.scored, [True] * 5 + [False])
    np.testing.assert_array_equal(r.n_relevant, [2, 2, 1, 1, 2, 0])
    assert r.n_queries == 5 and r.n_skipped == 1
    assert r.mp5 == pytest.approx(1.0 / 5)
    assert r.recall1 == pytest.approx(2 / 5)
    assert r.recall5 == pytest.approx(1.0)
    assert r.map100 == pytest.approx((0.75 + 0.75 + 1 / 3 + 1 / 2 + (1 / 3 + 1 / 2) / 2) / 5)
    np.testing.assert_array_equal(r.neighbors[1], [0, 2, 3, 4, 5])  # tie 0/2 broken by index
    np.testing.assert_allclose(r.distances[0], [1, 2, 10, 11, 30])
    d = r.as_dict()
    assert d["queries"] == 5 and d["skipped_no_match"] == 1 and d["mP@5"] == pytest.approx(0.2)


def test_ties_are_broken_by_index_at_the_k_boundary() -> None:
    # Four index points all at distance 1 from the query: k=2 must pick 0 then 1, every time.
    q = col(0)
    x = col(1, -1, 1, -1)
    for _ in range(5):
        d, i = knn(q, x, k=2)
        np.testing.assert_array_equal(i, [[0, 1]])
        np.testing.assert_allclose(d, [[1, 1]])
    # Ties decide the score: the relevant point is at index 3, tied with three wrong ones -> ranked last.
    r = retrieval_metrics(q, np.array([7]), x, np.array([1, 2, 3, 7]), k=1)
    assert r.recall1 == 0.0 and r.mp5 == 0.0
    # Identical embeddings everywhere: neighbours in index order (self excluded).
    same = np.zeros((4, 3), np.float32)
    r = retrieval_metrics(same, np.array([0, 1, 0, 1]))
    np.testing.assert_array_equal(r.neighbors[:, :3], [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])


# ---------------------------------------------------------------- separate query / index, n_q = 1, 2, 3, >= 5


def test_separate_index_nq_1_2_3() -> None:
    q = col(0)
    # index positions 1..6 (nearest first); relevant ("a") ranks chosen per case
    x = col(1, 2, 3, 4, 5, 6)
    cases = {
        # n_q=1, relevant at rank 2: P@1 = 0, r1 = 0, r5 = 1, AP = 1/2
        1: (["b", "a", "b", "b", "b", "b"], 0.0, 0.0, 1.0, 1 / 2),
        # n_q=2, relevant at ranks 1, 3: P@2 = 1/2, AP = (1 + 2/3)/2
        2: (["a", "b", "a", "b", "b", "b"], 0.5, 1.0, 1.0, (1 + 2 / 3) / 2),
        # n_q=3, relevant at ranks 1, 2, 5: P@3 = 2/3 (rank 5 is in the top 5 but not in the top n_q)
        3: (["a", "a", "b", "b", "a", "b"], 2 / 3, 1.0, 1.0, (1 + 1 + 3 / 5) / 3),
    }
    for n_q, (labels, p, r1, r5, ap) in cases.items():
        r = retrieval_metrics(q, np.array(["a"]), x, np.array(labels))
        assert r.n_relevant[0] == n_q
        assert (r.mp5, r.recall1, r.recall5, r.map100) == pytest.approx((p, r1, r5, ap)), n_q


def test_separate_index_nq_at_least_5() -> None:
    q = col(0)
    x = col(1, 2, 3, 4, 5, 6, 7, 8)
    labels = np.array(["a", "b", "a", "a", "b", "a", "a", "a"])  # n_q = 6 -> precision over the top 5
    r = retrieval_metrics(q, np.array(["a"]), x, labels)
    assert r.n_relevant[0] == 6
    assert r.mp5 == pytest.approx(3 / 5)
    assert r.recall1 == 1.0 and r.recall5 == 1.0
    ranks = [1, 3, 4, 6, 7, 8]
    assert r.map100 == pytest.approx(sum((j + 1) / rk for j, rk in enumerate(ranks)) / 6)
    # map_k=3: only the top 3 count, normalised by min(n_q, 3) = 3
    r3 = retrieval_metrics(q, np.array(["a"]), x, labels, map_k=3)
    assert r3.map100 == pytest.approx((1 + 2 / 3) / 3)
    # relevant items beyond rank 5 do not help mP@5: all 6 right answers last
    r = retrieval_metrics(
        q, np.array(["a"]), col(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11), np.array(["b"] * 5 + ["a"] * 6)
    )
    assert r.mp5 == 0.0 and r.recall5 == 0.0 and r.n_relevant[0] == 6


def test_leave_one_out_differs_from_query_in_index() -> None:
    emb = col(0, 1, 5)
    lab = np.array(["a", "b", "a"])
    loo = retrieval_metrics(emb, lab)
    # q0: without itself, n_q=1 and its nearest is the "b" -> 0
    assert loo.per_query_mp5[0] == 0.0 and loo.n_relevant[0] == 1
    sep = retrieval_metrics(emb, lab, emb, lab)
    # q0 with itself in the index: n_q=2, top 2 = (self a, b) -> 1/2; q1 ("b") finds itself -> 1
    assert sep.per_query_mp5[0] == pytest.approx(0.5) and sep.n_relevant[0] == 2
    assert sep.per_query_mp5[1] == 1.0 and loo.n_relevant[1] == 0 and not loo.scored[1]
    assert loo.n_skipped == 1 and sep.n_skipped == 0


# ---------------------------------------------------------------- tiny / degenerate inputs


def test_index_smaller_than_k() -> None:
    r = retrieval_metrics(col(0, 1), np.array([3, 3]))
    assert (r.mp5, r.recall1, r.recall5, r.map100) == (1.0, 1.0, 1.0, 1.0)
    assert r.neighbors.shape == (2, 5) and (r.neighbors[:, 1:] == -1).all()
    r = retrieval_metrics(col(0, 1, 10), np.array([0, 0, 1]))
    assert r.n_queries == 2 and r.n_skipped == 1 and r.mp5 == 1.0


def test_nothing_scorable_gives_nan_and_counts() -> None:
    r = retrieval_metrics(col(0), np.array(["x"]))  # a single image: nothing else to find
    assert r.n_queries == 0 and r.n_skipped == 1 and math.isnan(r.mp5)
    r = retrieval_metrics(col(0, 1), np.array(["x", "y"]), col(5, 6), np.array(["z", "z"]))
    assert r.n_queries == 0 and r.n_skipped == 2 and math.isnan(r.map100)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[0.0], [np.nan]], np.float32), np.array([0, 0]))
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(col(0, 1), np.array([0]))
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(col(0), np.array([0]), np.zeros((2, 3), np.float32), np.array([0, 0]))
    with pytest.raises(ValueError, match="index_labels"):
        retrieval_metrics(col(0), np.array([0]), col(1))


# ---------------------------------------------------------------- per domain, and a brute-force reference


def test_per_domain() -> None:
    r = retrieval_metrics(LOO_EMB, LOO_LAB)
    doms = np.array(["x", "x", "y", "y", "x", "z"])
    pd = per_domain_metrics(r, doms)
    assert pd["x"]["mP@5"] == pytest.approx(1 / 3) and pd["x"]["queries"] == 3
    assert pd["y"]["recall@5"] == 1.0 and pd["y"]["recall@1"] == 0.0
    assert pd["z"]["queries"] == 0 and pd["z"]["skipped_no_match"] == 1 and math.isnan(pd["z"]["mP@5"])
    assert per_domain_mp5(r, doms)["x"] == pytest.approx(1 / 3)


def _reference(emb: np.ndarray, lab: np.ndarray, k: int = 5, map_k: int = 100) -> tuple[float, ...]:
    """Plain loops straight from the definitions (stable argsort = ties by index)."""
    p5s, r1s, r5s, aps = [], [], [], []
    for i in range(len(emb)):
        others = [j for j in range(len(emb)) if j != i]
        d = np.array([np.sum((emb[i].astype(np.float64) - emb[j]) ** 2) for j in others])
        order = [others[j] for j in np.argsort(d, kind="stable")]
        rel = [lab[j] == lab[i] for j in order]
        n_q = sum(lab[j] == lab[i] for j in others)
        if n_q == 0:
            continue
        top = min(n_q, k)
        p5s.append(sum(rel[:top]) / top)
        r1s.append(float(rel[0]))
        r5s.append(float(any(rel[:k])))
        hits, s = 0, 0.0
        for rank, ok in enumerate(rel[:map_k], 1):
            if ok:
                hits += 1
                s += hits / rank
        aps.append(s / min(n_q, map_k))
    return tuple(float(np.mean(v)) for v in (p5s, r1s, r5s, aps))


def test_matches_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    # integer grid coordinates: exact float32 distances, with many genuine ties
    emb = rng.integers(-3, 4, size=(150, 4)).astype(np.float32)
    lab = rng.integers(0, 25, size=150)
    r = retrieval_metrics(emb, lab, map_k=20)
    assert (r.mp5, r.recall1, r.recall5, r.map100) == pytest.approx(_reference(emb, lab, map_k=20))
    # blocked search gives the same neighbours as one block
    _, i1 = knn(emb, k=7, exclude_self=True, block=16)
    _, i2 = knn(emb, k=7, exclude_self=True)
    np.testing.assert_array_equal(i1, i2)
