"""Blocks of a cluster extraction (``ray_extract.py``), with no Ray in sight: what a block is, how its inputs
become the very batches the single-process path embeds, and how finished blocks are kept on disk.

A block is the unit a cluster run finishes, saves and, after a crash, does not redo:

- a prepared dataset: one shard per block, batched exactly like ``pixels.ShardBatches`` (it *is* that code);
- image files (labels.csv, folders): ``block_batches`` consecutive batches of ``batch_size`` inputs, starting
  at a multiple of the batch size, so batch k holds the decodable inputs among positions [k*b, (k+1)*b) as in
  ``files._embed_batches``.

The same batches through the same engine give the same float16 features in the same order. A finished
block is one ``parts/block-NNNNNN.npz`` (the part-file format of ``extract.py``, stamped with the feature
function and the blocking); a rerun reads back every part with the right stamp and computes only the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.features.engines import ExtractError
from uniembed.features.extract import _META_KEYS, _read_part, _write_part

#: Batches per block of a files extraction: small enough that a lost block costs little, large enough that
#: the per-task overhead of the cluster stays small.
BLOCK_BATCHES = 4

#: A finished block: float16 features, meta rows (``store.META_FIELDS``) and skip entries.
Done = dict[int, tuple[np.ndarray, list[dict], list[dict]]]


@dataclass(frozen=True)
class Block:
    """One row of the cluster's input dataset: which inputs, and where they sit in the whole."""

    index: int
    kind: str  # "files" or "shard"
    start: int  # files: position of the first input; shard: 0
    inputs: tuple[str, ...]  # files: image paths; shard: (shard path,)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Block:
        d = json.loads(text)
        return cls(int(d["index"]), str(d["kind"]), int(d["start"]), tuple(d["inputs"]))


def file_blocks(paths: list[str], batch_size: int, block_batches: int = BLOCK_BATCHES) -> list[Block]:
    """Blocks of ``block_batches`` whole batches of files (the last one may be short)."""
    size = max(1, int(batch_size)) * max(1, int(block_batches))
    return [
        Block(k, "files", s, tuple(paths[s : s + size])) for k, s in enumerate(range(0, len(paths), size))
    ]


def shard_blocks(shards: list[Path]) -> list[Block]:
    """One block per shard, in manifest order."""
    return [Block(i, "shard", 0, (str(p),)) for i, p in enumerate(shards)]


def block_stamp(stamp: dict, batch_size: int, block_batches: int) -> dict:
    """A part's stamp: the feature function plus the blocking, which fixes what each block holds."""
    return dict(stamp, batch_size=int(batch_size), block_batches=int(block_batches), blocks="ray-1")


def part_path(parts: Path, index: int) -> Path:
    return parts / f"block-{index:06d}.npz"


def reusable_blocks(blocks: list[Block], parts: Path, stamp: dict) -> tuple[Done, list[Block]]:
    """Blocks an earlier run finished (read back), and the blocks still to compute."""
    done: Done = {}
    todo: list[Block] = []
    for b in blocks:
        got = _read_part(part_path(parts, b.index), stamp)
        if got is None:
            todo.append(b)
        else:
            done[b.index] = got
    return done, todo


def assemble(done: Done, n_blocks: int, dim: int) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Every block's features, meta rows and skip entries, in block order (== input order)."""
    missing = [i for i in range(n_blocks) if i not in done]
    if missing:
        raise ExtractError(f"{len(missing)} block(s) never finished (first: {missing[0]}); rerun to resume")
    feats = [np.asarray(done[i][0], np.float16).reshape(-1, dim) for i in range(n_blocks)]
    meta = [m for i in range(n_blocks) for m in done[i][1]]
    bad = [x for i in range(n_blocks) for x in done[i][2]]
    return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float16)), meta, bad


# ------------------------------------------------------------------------------------ decoding a block


def decode_block(block: Block, pre: Any, batch_size: int, draft: bool) -> Iterator[dict]:
    """The loader items of one block, in order: ``block``, ``seq``, ``last``, ``pixels`` (float16
    [n,3,S,S]), ``meta`` and ``bad`` (JSON-able lists); an unreadable shard gives one ``error`` item."""
    items = _shard_items(block, pre, batch_size, draft) if block.kind == "shard" else None
    if items is None:
        items = _file_items(block, pre, batch_size, draft)
    for seq, item in enumerate(items):
        yield dict(item, block=block.index, seq=seq)


def _shard_items(block: Block, pre: Any, batch_size: int, draft: bool) -> Iterator[dict]:
    from uniembed.features.pixels import ShardBatches

    for item in ShardBatches([(block.index, block.inputs[0])], pre, batch_size, draft):
        if "error" in item:
            yield {"error": str(item["error"]), "last": True, "pixels": None, "meta": [], "bad": []}
            return
        meta = [{k: m.get(k, "") for k in _META_KEYS} for m in item["meta"]]
        yield {"pixels": item["pixels"].numpy(), "meta": meta, "bad": list(item["bad"]), "last": item["last"]}


def _file_items(block: Block, pre: Any, batch_size: int, draft: bool) -> Iterator[dict]:
    """Batches of the block's files as ``files._embed_batches`` forms them (positions made global)."""
    from uniembed.features.pixels import item_loader

    n_batches = -(-len(block.inputs) // batch_size)
    for k, batch in enumerate(item_loader(list(block.inputs), pre, batch_size, 0, draft)):
        pixels = batch["pixels"]
        size = pre.input_size
        px = pixels.numpy() if pixels is not None else np.zeros((0, 3, size, size), np.float16)
        yield {
            "pixels": px,
            "meta": [int(i) + block.start for i in batch["idx"]],
            "bad": [[int(i) + block.start, r.split(":", 1)[0]] for i, r in batch["bad"]],
            "last": k == n_batches - 1,
        }


# ------------------------------------------------------------------------------- collecting the results


class BlockCollector:
    """Gathers embedded batches as they arrive (in any order), writes each block's part file the moment
    its last batch is in, and keeps the finished blocks for the final assembly.

    ``rows`` turns a batch's raw ``meta``/``bad`` lists into meta rows and skip entries (files: positions
    -> records; shards: as they are)."""

    def __init__(
        self, parts: Path, stamp: dict, dim: int, done: Done, rows: Callable[[list, list], tuple[list, list]]
    ):
        self.parts, self.stamp, self.dim, self.done, self.rows = parts, stamp, dim, done, rows
        self.open: dict[int, dict[int, tuple[np.ndarray, list, list]]] = {}
        self.last_seq: dict[int, int] = {}
        self.images = 0

    def take(self, block: int, seq: int, last: bool, feats: np.ndarray, meta: list, bad: list) -> int:
        """One embedded batch; returns how many inputs it covered (for the progress bar)."""
        if block in self.done:  # a retried task delivered it twice
            return 0
        if feats.shape[0] and feats.shape[1] != self.dim:
            raise ExtractError(f"the model produced {feats.shape[1]}-d features, expected {self.dim}")
        got = self.open.setdefault(block, {})
        if seq in got:
            return 0
        got[seq] = (np.asarray(feats, np.float32).reshape(-1, self.dim), meta, bad)
        if last:
            self.last_seq[block] = seq
        if block in self.last_seq and len(got) == self.last_seq[block] + 1:
            self._finish(block)
        self.images += feats.shape[0]
        return feats.shape[0] + len(bad)

    def _finish(self, block: int) -> None:
        got = self.open.pop(block)
        seqs = sorted(got)
        feats = np.concatenate([got[s][0] for s in seqs]).astype(np.float32)
        meta_raw = [m for s in seqs for m in got[s][1]]
        bad_raw = [b for s in seqs for b in got[s][2]]
        meta, bad = self.rows(meta_raw, bad_raw)
        _write_part(part_path(self.parts, block), feats, meta, bad, self.stamp)
        self.done[block] = (feats.astype(np.float16), meta, bad)
