"""Bounded work in the HTTP service: a few decodes + embeds at once, a short bounded queue, a 503 beyond it,
and memory handed back to the OS after each one.

Why: each decode of a large upload holds its full-size pixels for a moment; with no bound, N concurrent
uploads hold N of them (six 9000 x 9000 PNGs took a server to 7-9 GB). An asyncio semaphore admits a fixed
number; the rest wait a little in the event loop (no thread each) and then get 503 with ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
from collections.abc import AsyncIterator
from functools import cache
from typing import Any

import anyio

from uniembed.serve.limits import FALLBACK_DECODE_SIDE


class ServerBusy(Exception):
    """No decode/embed slot within the wait: the client should retry after ``retry_after`` seconds."""

    def __init__(self, detail: str, retry_after: int):
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class Admission:
    """At most ``slots`` holders at once; at most ``queue`` waiting, each for at most ``wait_s`` seconds."""

    def __init__(self, slots: int, queue: int, wait_s: float):
        self.slots = max(1, int(slots))
        self.queue = max(0, int(queue))
        self.wait_s = max(0.0, float(wait_s))
        self.waiting = 0
        self._sem = anyio.Semaphore(self.slots)

    @property
    def busy(self) -> int:
        """Slots in use now."""
        return self.slots - self._sem.value

    def _refuse(self, why: str) -> ServerBusy:
        return ServerBusy(
            f"server busy: {why} ({self.slots} image(s) at a time, {self.queue} may wait); retry shortly",
            retry_after=max(1, math.ceil(min(self.wait_s, 5.0))),
        )

    async def _acquire(self) -> None:
        try:
            self._sem.acquire_nowait()
            return
        except anyio.WouldBlock:
            pass
        if self.waiting >= self.queue:
            raise self._refuse(f"{self.waiting} request(s) already waiting")
        self.waiting += 1
        try:
            with anyio.move_on_after(self.wait_s) as scope:
                await self._sem.acquire()
        finally:
            self.waiting -= 1
        if scope.cancelled_caught:
            raise self._refuse(f"no free slot within {self.wait_s:g} s")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body of the ``async with``, or raise ``ServerBusy``."""
        await self._acquire()
        try:
            yield
        finally:
            self._sem.release()


@cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        fn = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None
    if fn is not None:
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
    return fn


def release_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them for reuse otherwise, so RSS stays at its peak after
    a burst of large decodes). A fraction of a millisecond; a no-op without glibc."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def decode_side(embedder: Any) -> int:
    """Side uploads are reduced to while decoding: twice the model's input side when the embedder pre-resizes
    with the model's own resize (so it is known), else ``FALLBACK_DECODE_SIDE``."""
    if getattr(embedder, "resize", None) is None:
        return FALLBACK_DECODE_SIDE
    import torch

    side = int(embedder.prepare(torch.zeros(3, 8, 8, dtype=torch.uint8)).shape[-1])
    return max(64, 2 * side)
