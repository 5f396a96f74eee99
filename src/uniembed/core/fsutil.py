"""Small file-system helpers shared by the stages: content hashes and crash-safe writes.

Every stage writes outputs that another stage (or a running service) may read at any moment, so a file or a
whole output folder must appear complete or not at all: write under a temporary name in the same folder
(same file system, so the final ``os.replace`` is an atomic rename), then rename into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (model files are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: str | Path, missing: str = "?") -> str:
    """``size:mtime_ns`` of a file (``missing`` when it cannot be stat-ed): cheap change detection for the
    input hashes of prepare and extract, without reading the file."""
    try:
        st = os.stat(path)
    except OSError:
        return missing
    return f"{st.st_size}:{st.st_mtime_ns}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    For writers that want a file name (``torch.save``, ``np.save``, ``fig.savefig``, ``faiss.write_index``).
    The temporary name keeps the suffix, since some writers pick the format from it (``.png``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets what open() would give it
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def _umask() -> int:
    """The process umask: from /proc on Linux (reading it with os.umask means setting it, which races with
    other threads creating files), else set-and-restore."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def swap_dir_into_place(
    tmp: str | Path, out_dir: str | Path, check: Callable[[Path], None] | None = None
) -> None:
    """Replace ``out_dir`` by the finished folder ``tmp`` with two renames; the old copy is deleted after.

    ``check(out_dir)`` runs first when ``out_dir`` exists and may raise to refuse replacing it (e.g. a folder
    that is not one of ours). A reader sees the old folder or the new one; between the two renames it sees
    none (there is no atomic swap of non-empty directories on POSIX)."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if check is not None:
        check(out_dir)
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()  # only the unique name is wanted: os.replace onto an empty dir is not portable
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_swap(out_dir: str | Path) -> Path | None:
    """Put back the previous ``out_dir`` when a process died between the two renames of
    :func:`swap_dir_into_place` (the old copy then sits in ``.NAME.old-*`` and nothing is under the name).
    Only writers call this: a reader doing it could race a live swap. Returns the folder restored, if any."""
    out_dir = Path(out_dir)
    if out_dir.exists() or not out_dir.parent.is_dir():
        return None
    olds = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return None
    os.replace(olds[-1], out_dir)
    for stale in olds[:-1]:
        shutil.rmtree(stale, ignore_errors=True)
    return out_dir


def _try_flock(fd: int) -> bool:
    """Take the exclusive flock on ``fd`` if nobody holds it (always False where there is no fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: the folders killed runs leave stay
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _make_locked_build_dir(out_dir: Path) -> tuple[Path, int]:
    """A fresh ``.NAME.tmp-*`` build folder that is flock-ed from the moment it has that name: it is made as
    ``.NAME.new-*``, locked, then renamed (the lock stays with the folder), so a sweeper never mistakes a
    live build for a dead one. Returns the folder and the descriptor holding the lock."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    suffix = f"{os.getpid()}-{secrets.token_hex(4)}"
    new = out_dir.parent / f".{out_dir.name}.new-{suffix}"
    new.mkdir()  # mode 0o777 less the umask, like the final folder
    try:
        fd = os.open(new, os.O_RDONLY)
    except OSError:  # a system that cannot open folders (Windows): no lock, and no sweeping either
        fd = -1
    try:
        if fd >= 0:
            _try_flock(fd)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{suffix}"
        os.rename(new, tmp)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(new, ignore_errors=True)
        raise
    return tmp, fd


def _sweep_dead_builds(out_dir: Path) -> int:
    """Remove the ``.NAME.tmp-*`` build folders nobody holds, and empty ``.NAME.new-*`` ones over a minute
    old (a process killed in the microseconds between making and locking one)."""
    removed = 0
    for d in out_dir.parent.glob(f".{out_dir.name}.new-*"):
        with contextlib.suppress(OSError):
            if time.time() - d.stat().st_mtime > 60:
                d.rmdir()  # only if empty
                removed += 1
    for d in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _try_flock(fd):
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        finally:
            os.close(fd)
    return removed


def drop_dead_builds(out_dir: str | Path) -> int:
    """Remove the build folders that killed runs left beside ``out_dir`` (a staging copy of a dataset, a
    half-built index: they can be large). A live build holds a flock on its folder for its whole life and the
    kernel drops it when the process ends, however it ends, so an unlocked folder is a dead one. Returns how
    many were removed."""
    out_dir = Path(out_dir)
    return _sweep_dead_builds(out_dir) if out_dir.parent.is_dir() else 0


@contextlib.contextmanager
def building_dir(out_dir: str | Path, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Build a replacement for ``out_dir`` in a temp folder beside it; swap it in on success, delete it on
    error (also on Ctrl-C), so a failed run leaves the previous output untouched. The folder is locked while
    this process lives, so the next build removes it if the process was killed (:func:`drop_dead_builds`)."""
    out_dir = Path(out_dir)
    restore_interrupted_swap(out_dir)
    drop_dead_builds(out_dir)
    tmp, fd = _make_locked_build_dir(out_dir)
    try:
        yield tmp
        swap_dir_into_place(tmp, out_dir, check=check)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
