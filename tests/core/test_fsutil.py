"""uniembed.core.fsutil: file hashes, atomic file writes and atomic folder replacement."""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path

import pytest

from uniembed.core.fsutil import (
    atomic_path,
    atomic_write_text,
    building_dir,
    drop_dead_builds,
    sha256_file,
)


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    data = bytes(range(256)) * 9000  # > one 1 MiB read chunk
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p, chunk=7) == hashlib.sha256(data).hexdigest()


def test_atomic_write_replaces_and_failure_keeps_old(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "report.md"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        assert tmp.parent == p.parent and tmp.suffix == ".md" and tmp != p
        tmp.write_text("half")
        raise RuntimeError("writer crashed")
    assert p.read_text() == "two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["report.md"], "temp file left behind"


def test_building_dir_swaps_on_success_only(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    with building_dir(out) as tmp:
        (tmp / "a.txt").write_text("v1")
        assert not out.exists()  # nothing visible until the block succeeds
    assert (out / "a.txt").read_text() == "v1"

    with pytest.raises(KeyboardInterrupt), building_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "v1"

    with building_dir(out) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert sorted(x.name for x in out.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ds"], "temp or old folders left behind"


def test_building_dir_check_can_refuse(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def refuse(d: Path) -> None:
        raise ValueError(f"{d} is not ours")

    with pytest.raises(ValueError, match="not ours"), building_dir(out, check=refuse) as tmp:
        (tmp / "x").write_text("new")
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["precious"]


def test_atomic_outputs_honour_the_umask(tmp_path: Path) -> None:
    """Temp files/folders are created private (mkstemp/mkdtemp); what lands under the final name must get the
    permissions a plain write would, so a service account can read an exported model or index."""
    import os

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with building_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def test_a_swap_killed_between_its_renames_is_restored_by_the_next_build(tmp_path: Path) -> None:
    """A kill after ``out -> .out.old-*`` but before ``tmp -> out`` leaves nothing under the name; the next
    writer puts the old copy back first (so ``index --add`` finds its index) and then builds as usual."""
    out = tmp_path / "index"
    with building_dir(out) as tmp:
        (tmp / "v").write_text("1")
    out.rename(tmp_path / ".index.old-abc123")  # the state right after the first rename
    with building_dir(out) as tmp:
        assert (out / "v").read_text() == "1"  # restored before the new build starts
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2"
    assert not list(tmp_path.glob(".index.*"))


def test_build_folders_of_killed_runs_are_removed_live_ones_kept(tmp_path: Path) -> None:
    """A build folder nobody holds a flock on was left by a killed run: the next build (or prepare's sweep)
    removes it. One a live build holds is kept, and a live build's own folder is never swept."""
    out = tmp_path / "index"
    dead = tmp_path / ".index.tmp-1-dead"  # a build folder nobody locks: what a SIGKILLed build leaves
    dead.mkdir()
    (dead / "half.faiss").write_bytes(b"x" * 100)
    live = tmp_path / ".index.tmp-2-live"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another build, still running
        with building_dir(out) as tmp:
            assert not dead.exists() and live.exists()
            assert drop_dead_builds(out) == 0 and tmp.exists()  # this build's own folder is held too
            (tmp / "v").write_text("1")
    finally:
        os.close(fd)
    assert (out / "v").read_text() == "1" and live.exists()
    assert drop_dead_builds(out) == 1 and not live.exists()  # its process "died": the lock is gone
    # killed between making and locking a folder: an empty .new-* one, removed once it is a minute old
    stale = tmp_path / ".index.new-1-ab"
    stale.mkdir()
    assert drop_dead_builds(out) == 0 and stale.exists()
    old = time.time() - 120
    os.utime(stale, (old, old))
    assert drop_dead_builds(out) == 1 and not stale.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["index"]
