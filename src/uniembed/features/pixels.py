"""Pixels for the extraction engines: decoding, squash-resizing and the DataLoaders that feed them.

DataLoader *worker processes* decode images and squash-resize them to the backbone's S x S with the very
``ImagePreprocessor.resize`` the exported model uses; for shards each worker owns whole shards (tar files are
read sequentially; no shuffling needed). Pixels travel as float16 in [0,255]: rounding them to uint8 after
the resize costs up to 0.005 of cosine on dark images (measured on COIL-100), float16 keeps > 0.99999.
Big JPEGs are decoded in draft mode (libjpeg DCT scaling) because full-size decoding of a 12 Mpx photo
would dominate the cost. Normalisation is not done here but once per batch inside the model.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from uniembed.models.preprocess import ImagePreprocessor, PreprocessConfig

#: Bump when the part-file layout or the pixel pipeline changes, so old parts/caches are not reused.
PIPELINE_VERSION = 2
#: Draft-decode JPEGs only when both sides are at least this many times the model input (much larger).
DRAFT_FACTOR = 2


def decode_resized(src: Any, pre: ImagePreprocessor, draft: bool = True) -> torch.Tensor:
    """Decode one image (path, bytes or PIL image) to upright RGB and squash-resize it exactly like
    ``ImagePreprocessor`` -> float16 [3,S,S] with values in [0,255]. Raises ``BadImageError`` when the input
    cannot be decoded. ``draft`` allows reduced-scale JPEG decoding for images >= 2x the input size."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from uniembed.data.images import load_image

    size = pre.size

    if isinstance(src, Image.Image):
        im = src if src.mode == "RGB" else src.convert("RGB")
    else:
        data = src
        if not isinstance(src, bytes | bytearray | memoryview):
            try:
                data = Path(src).read_bytes()
            except OSError:
                data = src  # load_image turns it into the right BadImageError reason
        im = None
        if draft and isinstance(data, bytes | bytearray | memoryview):
            im = _draft_decode(data, size)
        if im is None:
            im = load_image(data)
    with torch.no_grad(), _one_torch_thread():
        return pre.resize(pil_to_tensor(im)[None])[0].half()


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run per-image tensor ops single-threaded: on a busy 2-core machine a multi-threaded resize of one small
    image was measured 40x slower (threads spin waiting for each other) than a single-threaded one."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


def _draft_decode(data: bytes | bytearray | memoryview, size: int):
    """Fast path for JPEGs much larger than the model input: let libjpeg decode at 1/2..1/8 scale (still at
    least S on each side). Returns None when not applicable (other formats, small images, any oddity), and
    the caller falls back to the safe general decoder."""
    from PIL import Image, ImageOps

    try:
        im = Image.open(io.BytesIO(bytes(data)))
        if im.format != "JPEG" or min(im.size) < DRAFT_FACTOR * size or im.mode not in ("RGB", "L"):
            return None
        im.draft("RGB", (size, size))
        im.load()
        im = ImageOps.exif_transpose(im)
        return im if im.mode == "RGB" else im.convert("RGB")
    except Exception:  # noqa: BLE001 - any problem: let load_image decide and give the reason
        return None


def default_workers(n_shards: int) -> int:
    """Decode workers: on small CPUs one worker beside the model's threads; more where cores allow."""
    from uniembed.core.runtime import cpu_threads_default

    cores = cpu_threads_default()
    want = 1 if cores <= 4 else min(8, cores - 2)
    return max(0, min(want, n_shards))


def _worker_init(_: int) -> None:
    # Each worker decodes one image at a time; intra-op threads would only fight the model's threads.
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------- shards


class ShardBatches(torch.utils.data.IterableDataset):
    """Float16 pixel batches of whole shards; DataLoader worker ``w`` of ``n`` takes shards w, w+n, ...

    Each item is a dict: ``shard`` (index), ``pixels`` [b,3,S,S], ``meta`` (one dict per decoded image),
    ``bad`` (the undecodable ones, with their reason), ``last`` (the shard's final batch) and ``n_seen``;
    a shard that cannot be read yields one ``{"shard", "error"}`` item instead."""

    def __init__(self, shards: list[tuple[int, str]], pre: PreprocessConfig, batch_size: int, draft: bool):
        super().__init__()
        self.shards = shards
        self.pre_cfg = pre
        self.size = pre.input_size
        self.batch_size = batch_size
        self.draft = draft

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard_idx, path in mine:
            yield from self._shard(shard_idx, path)

    def _shard(self, shard_idx: int, path: str) -> Iterator[dict]:
        from uniembed.data.images import BadImageError
        from uniembed.data.shards import iter_shard

        pre = ImagePreprocessor(self.pre_cfg)
        pix: list[torch.Tensor] = []
        meta: list[dict] = []
        bad: list[dict] = []
        n = 0

        def flush(last: bool) -> dict:
            x = torch.stack(pix) if pix else torch.zeros(0, 3, self.size, self.size, dtype=torch.float16)
            out = {
                "shard": shard_idx,
                "pixels": x,
                "meta": list(meta),
                "bad": list(bad),
                "last": last,
                "n_seen": n,
            }
            pix.clear()
            meta.clear()
            bad.clear()
            return out

        try:
            for s in iter_shard(path):
                n += 1
                m = dict(s.meta, key=s.key)
                try:
                    pix.append(decode_resized(s.image_bytes, pre, self.draft))
                    meta.append(m)
                except BadImageError as e:
                    bad.append({"key": s.key, "path": m.get("path", ""), "reason": e.reason})
                if len(pix) >= self.batch_size:
                    yield flush(False)
        except Exception as e:  # a truncated/corrupt tar: report it, as a whole, to the main process
            yield {"shard": shard_idx, "error": f"{path}: {type(e).__name__}: {e}"}
            return
        yield flush(True)


def shard_loader(
    shards: list[tuple[int, str]],
    pre: PreprocessConfig,
    batch_size: int,
    n_workers: int,
    draft: bool,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Batches of :class:`ShardBatches` over ``(index, path)`` shards, decoded by ``n_workers`` processes."""
    return torch.utils.data.DataLoader(
        ShardBatches(shards, pre, batch_size, draft),
        batch_size=None,
        num_workers=n_workers,
        worker_init_fn=_worker_init if n_workers else None,
        pin_memory=pin_memory,
        prefetch_factor=4 if n_workers else None,
        persistent_workers=False,
    )


# ------------------------------------------------------------------------------------ arbitrary inputs


class ItemPixels(torch.utils.data.Dataset):
    """Map-style dataset over arbitrary image inputs -> (position, float16 pixels or None, bad reason)."""

    def __init__(self, items: Sequence[Any], pre: PreprocessConfig, draft: bool):
        self.items = items
        self.pre_cfg = pre
        self.draft = draft
        self._pre: ImagePreprocessor | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        from uniembed.data.images import BadImageError

        if self._pre is None:
            self._pre = ImagePreprocessor(self.pre_cfg)
        item = self.items[i]
        try:
            if isinstance(item, str | os.PathLike) and not Path(item).is_file():
                raise BadImageError("missing file", str(item))
            return i, decode_resized(item, self._pre, self.draft), ""
        except BadImageError as e:
            return i, None, f"{e.reason}: {e.detail}" if e.detail else e.reason


def _collate_items(batch: list[tuple[int, torch.Tensor | None, str]]) -> dict:
    """Stack the decodable images of a batch (in the worker) and pass the bad ones through by position."""
    good = [(i, t) for i, t, _ in batch if t is not None]
    return {
        "idx": [i for i, _ in good],
        "pixels": torch.stack([t for _, t in good]) if good else None,
        "bad": [(i, r) for i, t, r in batch if t is None],
    }


def item_loader(
    items: Sequence[Any], pre: PreprocessConfig, batch_size: int, workers: int, draft: bool
) -> torch.utils.data.DataLoader:
    """Batches ``{"idx", "pixels", "bad"}`` of :class:`ItemPixels`, in input order."""
    return torch.utils.data.DataLoader(
        ItemPixels(items, pre, draft),
        batch_size=batch_size,
        shuffle=False,
        num_workers=max(0, int(workers)),
        collate_fn=_collate_items,
        worker_init_fn=_worker_init if workers else None,
    )
