"""`uniembed bench`: the benchmark code runs on tiny inputs and reports well-formed results.

These tests do not judge speed (benchmarks are not tests); they check that every measure runs end to end,
that the RATIO lines parse, and that the helpers the figures rest on (brute-force k-NN, top-k comparison,
recall, the image subset) are right.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uniembed_lab.bench.common import BenchConfig, ProgressFile
from uniembed_lab.bench.measures import MEASURES, BenchError, resolve_names
from uniembed_lab.bench.report import fmt
from uniembed_lab.bench.search import clustered_sphere, compare_topk, numpy_knn, recall_at_k, uniform_sphere

RATIO_RE = re.compile(r"^RATIO (\S+) (\S+) (\S+) (\S+)$")
NUM_RE = re.compile(r"^-?\d+(\.\d+)?$")


def _run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run(
        [sys.executable, "-m", "uniembed.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _ratio_lines(stdout: str) -> dict[str, tuple[float, float, float]]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("RATIO"):
            m = RATIO_RE.match(line)
            assert m, f"malformed RATIO line: {line!r}"
            name, *nums = m.groups()
            for x in nums:
                assert NUM_RE.match(x), f"not a plain decimal number in {line!r}"
            p, b, r = (float(x) for x in nums)
            assert p > 0 and b > 0 and r > 0, line
            out[name] = (p, b, r)
    return out


# ------------------------------------------------------------------------------------------------ helpers
def test_fmt_plain_decimals() -> None:
    assert fmt(1234567.891) == "1234567.89"
    assert fmt(0.000123456) == "0.0001235"
    assert fmt(None) == "nan"
    assert all(NUM_RE.match(fmt(x)) for x in (5.0, 0.5, 123.456, 99999.0))


def test_resolve_names_order_commas_and_errors() -> None:
    assert resolve_names(None) == list(MEASURES)
    assert resolve_names(["search_ann,extract", "search_exact"]) == ["extract", "search_exact", "search_ann"]
    with pytest.raises(BenchError, match="unknown measure"):
        resolve_names(["extrakt"])


def test_numpy_knn_is_exact() -> None:
    base = uniform_sphere(3000, 16, seed=1)
    q = uniform_sphere(50, 16, seed=2)
    dist, ids = numpy_knn(base, q, k=5, chunk=7)
    full = ((q[:, None, :] - base[None, :, :]) ** 2).sum(-1)
    want = np.argsort(full, axis=1)[:, :5]
    assert np.array_equal(ids, want)
    assert np.allclose(dist, np.take_along_axis(full, want, axis=1), atol=1e-5)


def test_compare_topk_accepts_ties_and_flags_real_differences(tmp_path: Path) -> None:
    ids = np.array([[0, 1, 2], [3, 4, 5]])
    dist = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]], dtype=np.float32)
    np.savez(tmp_path / "search_exact_numpy.npz", dist=dist, ids=ids)
    # Row 0: third id differs but at the same distance (a tie) -> accepted.
    np.savez(tmp_path / "search_exact_faiss.npz", dist=dist, ids=np.array([[0, 1, 9], [3, 4, 5]]))
    r = compare_topk(tmp_path)
    assert r["same_top_k"] and r["identical_top_k_sets"] == 0.5 and r["differ_beyond_ties"] == 0
    # Row 1: a different id at a different distance -> a real disagreement.
    d2 = dist.copy()
    d2[1, 2] = 0.9
    np.savez(tmp_path / "search_exact_faiss.npz", dist=d2, ids=np.array([[0, 1, 2], [3, 4, 8]]))
    r = compare_topk(tmp_path)
    assert not r["same_top_k"] and r["differ_beyond_ties"] == 1


def test_recall_at_k() -> None:
    truth = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    found = np.array([[5, 4, 3, 2, 1], [6, 7, 0, 0, 0]])
    assert recall_at_k(found, truth) == pytest.approx(0.7)


def test_clustered_sphere_is_normalised_deterministic_and_clustered() -> None:
    a = clustered_sphere(4000, 32, n_clusters=40, seed=3, chunk=1000)
    b = clustered_sphere(4000, 32, n_clusters=40, seed=3, chunk=1000)
    assert a.dtype == np.float32 and a.shape == (4000, 32)
    assert np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # Clustered: nearest neighbours are far closer than in uniform data of the same size.
    u = uniform_sphere(4000, 32, seed=3)
    nn_c = numpy_knn(a, a[:100], 2)[0][:, 1].mean()
    nn_u = numpy_knn(u, u[:100], 2)[0][:, 1].mean()
    assert nn_c < 0.7 * nn_u


def test_config_roundtrip_and_quick_sizes(tmp_path: Path) -> None:
    cfg = BenchConfig.make(True, out=tmp_path, threads=1)
    assert cfg.n_images <= 32 and cfg.exact_n < 200_000 and cfg.ann_n < 2_000_000
    back = BenchConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.work_dir == tmp_path / "work" / "quick"


def test_select_images_without_photos_is_a_clear_error(tmp_path: Path) -> None:
    from uniembed_lab.bench.extract import BenchDataError, select_images

    with pytest.raises(BenchDataError, match="neither"):
        select_images(BenchConfig.make(True, out=tmp_path, data_dir=tmp_path, threads=1))


def test_progress_file(tmp_path: Path) -> None:
    p = ProgressFile(tmp_path / "p.json", min_interval=0)
    p.update(3, 10, "x")
    assert json.loads((tmp_path / "p.json").read_text()) == {"done": 3, "total": 10, "desc": "x"}


@pytest.mark.shared_data
def test_select_images_mix_is_fixed(shared_data: Path, tmp_path: Path) -> None:
    from uniembed_lab.bench.extract import select_images

    cfg = BenchConfig.make(False, out=tmp_path, data_dir=shared_data, n_images=50, threads=1)
    rows = select_images(cfg)
    assert rows == select_images(cfg) and len(rows) == 50
    pngs = [r for r in rows if r["path"].endswith(".png")]
    assert len(pngs) == 10 and all(Path(r["path"]).is_file() for r in rows)


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_bench_quick_search_cli(tmp_path: Path) -> None:
    """The search measures end to end through the CLI: RATIO lines, JSON with machine and memory."""
    r = _run_cli(["--quick", "--only", "search_exact,search_ann", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    ratios = _ratio_lines(r.stdout)
    assert set(ratios) == {"search_exact", "search_ann"}
    for name in ratios:
        res = json.loads((tmp_path / f"{name}.json").read_text())
        p, b = res["project"], res["baseline"]
        assert res["ratio"] == pytest.approx(p["figure"] / b["figure"])
        assert p["peak_rss_mb"] > 10 and b["peak_rss_mb"] > 10
        assert res["machine"]["cores_usable"] >= 1 and res["machine"]["versions"]["faiss-cpu"]
        assert "faiss_omp" in p["threads"]
    exact = json.loads((tmp_path / "search_exact.json").read_text())
    assert exact["checks"]["top_k_agreement"]["same_top_k"] is True
    ann = json.loads((tmp_path / "search_ann.json").read_text())
    assert 0.0 < ann["checks"]["recall_at_5"] <= 1.0 and ann["project"]["details"]["nprobe_sweep"]


def test_bench_rejects_unknown_measure(tmp_path: Path) -> None:
    r = _run_cli(["--quick", "--only", "nope", "--out", str(tmp_path)], timeout=120)
    assert r.returncode == 2 and "unknown measure" in (r.stdout + r.stderr)


def test_bench_failed_side_is_reported_not_crashed(tmp_path: Path) -> None:
    """A side that fails (here: no photos under --data) gives a FAILED line, exit code 1, and its log."""
    r = _run_cli(["--quick", "--only", "extract", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.returncode == 1
    assert "FAILED extract: baseline: BenchDataError" in r.stdout and "RATIO" not in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    res = json.loads((tmp_path / "o" / "extract.json").read_text())
    assert "neither" in res["error"] and Path(res["baseline"]["log"]).exists()


@pytest.mark.slow
@pytest.mark.shared_data
def test_bench_quick_extract_and_head_cli(shared_data: Path, tmp_path: Path) -> None:
    """Extraction (project vs baseline) and the head epoch on 16 real images, through the CLI."""
    r = _run_cli(
        ["--quick", "--only", "extract,head_epoch", "--images", "16", "--out", str(tmp_path)]
        + ["--data", str(shared_data)]
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    ratios = _ratio_lines(r.stdout)
    assert set(ratios) == {"extract", "head_epoch"}
    ex = json.loads((tmp_path / "extract.json").read_text())
    assert ex["project"]["details"]["images"] == 16 and ex["baseline"]["details"]["images"] == 16
    assert ex["project"]["peak_tree_rss_mb"] >= ex["project"]["peak_rss_mb"] * 0.5
    head = json.loads((tmp_path / "head_epoch.json").read_text())
    assert head["baseline"]["details"]["extrapolated"] is True
    assert head["ratio"] == pytest.approx(head["baseline"]["figure"] / head["project"]["figure"])


@pytest.mark.shared_data
def test_extract_profile_in_process(shared_data: Path, tmp_path: Path) -> None:
    """Every stage of the profile is timed and positive (8 images, in this process)."""
    from uniembed_lab.bench.profile import extract_profile

    cfg = BenchConfig.make(True, out=tmp_path, data_dir=shared_data, n_images=8, threads=1)
    cfg.profile_images = 8
    res = extract_profile(cfg, ProgressFile(None))
    stages = res["details"]["stages"]
    assert {"prepare", "extract_worker", "extract_main", "baseline"} <= set(stages)
    assert all(
        v["ms_per_image"] > 0 for g in stages.values() for k, v in g.items() if "float16 array" not in k
    )
    assert res["details"]["summary"]["images"] == 8
