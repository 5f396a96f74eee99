"""Acceptance checks on synthetic `uniembed model` reports (real run: test_model_universality)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from uniembed.core.paths import repo_root
from uniembed_lab.universality import check_model_dir, universality_checks


def _report(head_lodo, raw_cnn, pca_cnn, unseen_head) -> dict:
    doms = ("pg", "produce", "toys")
    lodo = {
        d: {"head": h, "raw": 0.99, "pca64": 0.98, "raw_cnn": r, "pca64_cnn": p}
        for d, h, r, p in zip(doms, head_lodo, raw_cnn, pca_cnn, strict=True)
    }
    unseen = {"head": {**dict(zip(doms, unseen_head, strict=True)), "all": 0.5}, "raw": {"pg": 1.0}}
    return {"leave_one_domain_out": lodo, "unseen_labels": unseen}


def test_checks_use_the_cnn_columns_and_their_thresholds() -> None:
    ok = universality_checks(_report([0.8, 0.8, 0.9], [0.7, 0.9, 0.9], [0.79, 0.7, 0.8], [0.95, 0.96, 1.0]))
    assert [c.passed for c in ok] == [True, True, True]
    assert "raw_cnn" in ok[1].name and "0.833 vs 0.833: ratio 1.000" in ok[1].detail
    # 0.95 x raw is enough for check 2: 0.792 / 0.833 = 0.95
    at_ratio = universality_checks(
        _report([0.75, 0.75, 0.875], [0.7, 0.9, 0.9], [0.74, 0.7, 0.8], [0.95, 0.96, 1.0])
    )
    assert at_ratio[1].passed and "ratio 0.950" in at_ratio[1].detail
    # one domain at PCA level fails check 1; a mean below 0.95 x raw fails check 2; 0.949 fails check 3
    bad = universality_checks(_report([0.79, 0.7, 0.8], [0.7, 0.95, 0.9], [0.79, 0.6, 0.7], [0.949, 1, 1]))
    assert [c.passed for c in bad] == [False, False, False]
    assert "ratio 0.898" in bad[1].detail
    # without colour columns the plain raw / pca64 are the backbone's features
    plain = _report([0.8, 0.8, 0.9], [0, 0, 0], [0, 0, 0], [1, 1, 1])
    for v in plain["leave_one_domain_out"].values():
        del v["raw_cnn"], v["pca64_cnn"]
    checks = universality_checks(plain)
    assert "pca64" in checks[0].name and not checks[0].passed and not checks[1].passed
    with pytest.raises(ValueError, match="--lodo"):
        universality_checks({"unseen_labels": {}})


def test_script_exit_status(tmp_path: Path) -> None:
    script = repo_root() / "scripts" / "check_universality.py"
    (tmp_path / "report.json").write_text(
        json.dumps(_report([0.8, 0.8, 0.9], [0.7, 0.9, 0.9], [0.79, 0.7, 0.8], [0.9, 0.96, 1.0]))
    )
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout.count("PASS") == 2 and "FAIL  unseen-label" in r.stdout
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode == 2 and "make model" in r.stderr
    assert len(check_model_dir(tmp_path)) == 3


def test_universality_plot_has_a_panel_per_protocol(tmp_path: Path) -> None:
    """The PNG `uniembed model` writes: two panels, or three with the new-photos figures (the left-out domains
    first); bars below 0.6 (new photos of raw features are ~0.6) lower the axis instead of vanishing."""
    import matplotlib.image as mpimg

    from uniembed.eval.report import bar_floor, plot_universality

    rep = _report([0.8, 0.8, 0.9], [0.7, 0.9, 0.9], [0.79, 0.7, 0.8], [0.95, 0.96, 1.0])
    two = plot_universality(tmp_path / "two.png", rep["unseen_labels"], rep["leave_one_domain_out"])
    photos = {"head": {"pg": 0.95, "produce": 0.91}, "raw": {"pg": 0.58, "produce": 0.75}}
    three = plot_universality(
        tmp_path / "three.png", rep["unseen_labels"], rep["leave_one_domain_out"], new_photos=photos
    )
    w2, w3 = mpimg.imread(two).shape[1], mpimg.imread(three).shape[1]
    assert w3 > 1.25 * w2  # one more panel (panels are as wide as their groups)
    assert bar_floor([0.8, 0.95]) == 0.6 and bar_floor([0.58, 0.95]) == pytest.approx(0.45)
    assert bar_floor([0.0, 0.7]) == 0.6  # missing values (0) are not bars
