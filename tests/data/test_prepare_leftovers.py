"""A killed ``prepare`` leaves its hidden build folder (a staging copy of every decoded image) beside the
output; the next run removes such folders, but never one a live ``prepare`` is building in."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from uniembed.data.prepare import prepare
from uniembed_lab.scaffold.tiny_model import make_synthetic_images


def test_next_run_removes_what_killed_runs_left(tmp_path: Path) -> None:
    make_synthetic_images(tmp_path / "photos", labels=2, per_label=3)
    out = tmp_path / "ds"
    dead, live = tmp_path / ".ds.tmp-dead", tmp_path / ".ds.tmp-live"
    for d in (dead, live):
        d.mkdir()
        (d / "staging.bin").write_bytes(b"\0" * 1000)
    fd = os.open(live, os.O_RDONLY)  # a prepare at work holds its build folder locked
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        prepare([f"imagefolder:{tmp_path / 'photos'}"], out, workers=1, progress=False)
        assert not dead.exists() and (live / "staging.bin").exists()
        assert (out / "manifest.json").is_file()
        dead.mkdir()  # also when the output is already up to date
        prepare([f"imagefolder:{tmp_path / 'photos'}"], out, workers=1, progress=False)
        assert not dead.exists() and live.exists()
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.tmp-live", "ds", "photos"]
