"""Step 3 of ``prepare``: decode, resize and re-encode every kept image into one staging file.

Decoding runs in a process pool; its results (JPEG bytes) are appended to a staging file so that nothing
large is held in memory, and only (offset, length) per image is kept. Bad files are recorded with their
reason instead of stopping the run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniembed.data.images import BadImageError, encode_jpeg, load_image, resize_image
from uniembed.data.sources import Record

JPEG_QUALITY = 95

#: A decode job: (index into the selection, path, resize mode, size, max pixels).
DecodeJob = tuple[int, str, str, int, int]
#: A decode result: (index, JPEG bytes or None, reason, detail, width, height).
DecodeResult = tuple[int, bytes | None, str, str, int, int]


@dataclass
class Decoded:
    """One decoded image: its record and where its JPEG bytes sit in the staging file."""

    record: Record
    offset: int
    length: int
    width: int
    height: int


def _decode_job(job: DecodeJob) -> DecodeResult:
    """Worker: decode, resize and re-encode one file. Returns (index, jpeg or None, reason, detail, w, h)."""
    idx, path, resize, size, max_pixels = job
    try:
        draft = size if resize != "none" else None
        im = resize_image(load_image(path, max_pixels=max_pixels, draft_size=draft), resize, size)
        data = encode_jpeg(im, JPEG_QUALITY)
        return idx, data, "", "", im.width, im.height
    except BadImageError as e:
        return idx, None, e.reason, e.detail[:200], 0, 0
    except Exception as e:  # noqa: BLE001 - one pathological file must not kill a multi-hour job
        return idx, None, "corrupt image", f"{type(e).__name__}: {e}"[:200], 0, 0


def _iter_decoded(jobs: list[DecodeJob], workers: int) -> Iterator[DecodeResult]:
    """Decode in a spawn-context process pool (safe even when the caller has imported torch and its threads);
    small jobs run in-process where pool start-up would cost more than it saves."""
    if workers <= 1 or len(jobs) < 64:
        for j in jobs:
            yield _decode_job(j)
        return
    ctx = mp.get_context("spawn")
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with ctx.Pool(workers, initializer=_ignore_sigint) as pool:
        yield from pool.imap(_decode_job, jobs, chunksize=chunk)


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent (it prints one line and exits 130); otherwise each worker
    prints its own KeyboardInterrupt traceback first."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def progress_bar(enabled: bool) -> Any:
    """The rich progress bar of prepare's long steps (a no-op display when ``enabled`` is False)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def decode_to_staging(
    selected: list[Record], options: dict, staging: Path, workers: int, progress: bool, skipped: list[dict]
) -> list[Decoded]:
    """Decode ``selected`` into ``staging``; returns the decoded images in selection order and appends the
    undecodable ones (path, reason, source[, detail]) to ``skipped``."""
    jobs = [
        (i, r.path, options["resize"], options["size"], options["max_pixels"]) for i, r in enumerate(selected)
    ]
    decoded: list[Decoded] = []
    offset = 0
    with open(staging, "wb") as blob, progress_bar(progress) as bar:
        task = bar.add_task(f"Decoding ({workers} workers)", total=len(jobs))
        for idx, data, reason, detail, w, h in _iter_decoded(jobs, workers):
            r = selected[idx]
            if data is None:
                entry = {"path": r.path, "reason": reason, "source": r.source}
                if detail:
                    entry["detail"] = detail
                skipped.append(entry)
            else:
                blob.write(data)
                decoded.append(Decoded(r, offset, len(data), w, h))
                offset += len(data)
            bar.advance(task)
    decoded.sort(key=lambda d: d.offset)  # imap preserves order already; this makes it explicit
    return decoded
