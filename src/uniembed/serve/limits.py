"""What one search or upload may ask of the process: one place for the limits that ``search`` (CLI) and
``serve`` (HTTP) share, with the one message each limit gives.

Why a pixel budget on top of the byte limit: a compressible PNG of 9000 x 9000 pixels is 260 KB on the wire
but 243 MB once decoded (Pillow has no scaled decoding for PNG), so bytes say little about memory. The budget
is far below Pillow's decompression-bomb limit (~89.5 MP) and configurable (``serve --max-pixels``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Most results one query may ask for, in ``uniembed search -k`` and (by default) in ``POST /search``.
MAX_K = 100
DEFAULT_K = 5
DEFAULT_MAX_UPLOAD_MB = 10.0
#: Default pixel budget of one upload, in megapixels (a 48 MP phone photo is 8000 x 6000).
DEFAULT_MAX_MEGAPIXELS = 40.0
#: Largest budget ``--max-pixels`` accepts: Pillow's own decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``
#: (= ``data.images.DEFAULT_MAX_PIXELS``; spelled out so the CLI does not import Pillow to show its help).
BOMB_MEGAPIXELS = (1024 * 1024 * 1024 // 4 // 3) / 1e6
#: Requests that may wait for a decode/embed slot, and how long each waits before a 503.
DEFAULT_QUEUE = 16
DEFAULT_QUEUE_WAIT_S = 10.0
#: Side uploads are reduced to when the model does not say its input size (more than any model here needs).
FALLBACK_DECODE_SIDE = 1024


def default_max_concurrent() -> int:
    """Decodes + embeds at once: one per core this process may use (2 where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 2


def k_error(k: int, max_k: int = MAX_K) -> str | None:
    """The message for a k outside 1..max_k (None when k is fine): the same words from the CLI and the API."""
    if 1 <= k <= max_k:
        return None
    return f"k must be between 1 and {max_k}, got {k}"


def pixels_message(size: tuple[int, int] | None, max_pixels: int) -> str:
    """Why an image is refused for its pixel count (not its bytes), and which option sets the budget."""
    budget = f"this server accepts at most {max_pixels / 1e6:.1f} MP (--max-pixels)"
    if size is None:
        return f"image has more than {2 * BOMB_MEGAPIXELS:.1f} MP (a decompression bomb); {budget}"
    w, h = size
    return f"image is {w}x{h} = {w * h / 1e6:.1f} MP; {budget}"


@dataclass(frozen=True)
class ServiceLimits:
    """What a request may ask for (upload size, pixels, results) and how many the service works on at once."""

    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    default_k: int = DEFAULT_K
    max_k: int = MAX_K
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    #: Side uploads are reduced to while decoding; None: twice the model's input side (see ``decode_side``).
    decode_side: int | None = None
    max_concurrent: int | None = None
    queue: int = DEFAULT_QUEUE
    queue_wait_s: float = DEFAULT_QUEUE_WAIT_S

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)

    @property
    def slots(self) -> int:
        return self.max_concurrent or default_max_concurrent()
