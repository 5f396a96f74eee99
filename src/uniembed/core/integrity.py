"""Checksums of the files one stage writes and another reads back, and the error a damaged file raises.

A manifest (an index's ``index.json``, a feature cache's ``info.json``) records ``{"size", "sha256"}`` for
the files it covers. Loaders check them *before* parsing, so a truncated or garbled file is reported as what
it is, in one line with what to do, instead of as whatever the parser trips over (FAISS, NumPy and torch give
tracebacks dozens of lines long, or worse, read garbage as data).

Cost: hashing streams the file (``hashlib.file_digest``); the size is compared first, so a truncated file
fails without being read. A digest is remembered for the life of the process, keyed by the file's device,
inode, size and modification time, so a service or a pipeline that opens the same files again pays one
``stat`` per file. A file rewritten in place within one mtime tick would be missed: the writers here always
replace files by rename (``uniembed.core.fsutil``), which gives a new inode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The manifest key that holds ``{file name: {"size": bytes, "sha256": hex}}``.
CHECKSUMS_KEY = "checksums"

_DIGESTS: dict[tuple[int, int, int, int], str] = {}
_LOCK = threading.Lock()


class DamagedFileError(ValueError):
    """A file written by an earlier stage is missing, truncated or garbled (user-facing, not a bug).

    Each stage raises its own subclass (also a subclass of that stage's error class where it has one), so
    a command can catch either; the message names the file, what is wrong and what to do."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, computed once per process for an unchanged file (see module docs)."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _LOCK:
        known = _DIGESTS.get(key)
    if known is not None:
        return known
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with _LOCK:
        _DIGESTS[key] = digest
    return digest


def checksums(root: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` of the files of ``root`` among ``names`` that exist (for a manifest)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        p = Path(root) / name
        if p.is_file():
            out[name] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return out


def _problem(path: Path, rec: Any, manifest: str) -> str | None:
    """What is wrong with one file against its recorded checksum, or None when it matches."""
    if not path.is_file():
        return "is missing"
    if not isinstance(rec, dict) or "size" not in rec or "sha256" not in rec:
        return f"has an unreadable checksum entry in {manifest}"
    size = path.stat().st_size
    if size != rec["size"]:
        what = "truncated" if size < int(rec["size"]) else "overwritten"
        return f"is damaged ({what}: {size:,} bytes, {manifest} recorded {int(rec['size']):,})"
    if file_sha256(path) != rec["sha256"]:
        return f"is damaged (its contents differ from the sha256 recorded in {manifest})"
    return None


def verify_checksums(
    root: str | Path,
    manifest: dict[str, Any],
    manifest_name: str,
    fix: str,
    error: type[Exception] = DamagedFileError,
) -> None:
    """Raise ``error`` naming the first covered file that is missing or differs from ``manifest``'s record.

    A manifest without checksums (written by an older version) has nothing to verify: it loads as before."""
    recorded = manifest.get(CHECKSUMS_KEY)
    if recorded is None:
        log.debug("%s records no checksums (an older version wrote it): nothing to verify", manifest_name)
        return
    if not isinstance(recorded, dict):
        raise error(f"{manifest_name} is damaged (its {CHECKSUMS_KEY!r} entry is not a table); {fix}")
    for name, rec in recorded.items():
        problem = _problem(Path(root) / str(name), rec, Path(manifest_name).name)
        if problem is not None:
            raise error(f"{Path(root) / str(name)} {problem}; {fix}")


def short_reason(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters: a parser's complaint in one line."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def reading(
    path: str | Path,
    fix: str,
    error: type[Exception] = DamagedFileError,
    what: str = "cannot be read",
    catch: tuple[type[BaseException], ...] = (Exception,),
) -> Iterator[None]:
    """Turn an exception raised while parsing ``path`` (one of ``catch``) into one ``error`` line:
    ``<path> <what> (<reason>); <fix>``.

    Errors that are already ``error`` (or any ``DamagedFileError``) pass through unchanged."""
    try:
        yield
    except (DamagedFileError, error):
        raise
    except catch as e:
        raise error(f"{path} {what} ({short_reason(e)}); {fix}") from e


def read_json_object(
    path: str | Path, fix: str, error: type[Exception] = DamagedFileError, what: str = "a JSON object"
) -> dict[str, Any]:
    """A JSON file that must hold an object; ``error`` (one line, naming the file) when it is unreadable."""
    if not Path(path).is_file():
        raise error(f"{path} is missing; {fix}")
    with reading(path, fix, error, what="is damaged: not valid JSON", catch=(OSError, ValueError)):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise error(f"{path} is damaged: it holds {type(data).__name__}, not {what}; {fix}")
    return data
