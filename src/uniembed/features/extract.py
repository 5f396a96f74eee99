"""Frozen-feature extraction: prepared shards -> cached float16 features (``features/store.py`` format).

Pipeline, and why each part is shaped the way it is:

- DataLoader *worker processes* decode JPEGs and squash-resize them to the backbone's S x S with the very
  ``ImagePreprocessor.resize`` the exported model uses, each worker owning whole shards (tar files are read
  sequentially; no shuffling needed). Pixels travel as float16 in [0,255]: rounding them to uint8 after the
  resize costs up to 0.005 of cosine on dark images (measured on COIL-100), float16 keeps > 0.99999.
  Big JPEGs are decoded in draft mode (libjpeg DCT scaling) because full-size decoding of a 12 Mpx photo
  would dominate the cost.
- The hot loop sees only [B,3,S,S] batches; normalisation happens once per batch *inside* the model
  (``PixelEmbedder``), so torch and ONNX Runtime run exactly the same graph and no per-image Python work
  happens there.
- Engines: ONNX Runtime on CPU (the frozen backbone + pooling is exported once and cached under
  ``cache_dir()/onnx``; several times faster than eager torch on small CPUs), torch on GPU (bf16 autocast,
  channels_last, optional ``torch.compile``). ONNX Runtime's intra-op threads do not spin-wait by default
  (``onnxruntime``): spinning threads steal the core the decode worker needs, and on a shared 2-core machine
  extraction was 0.9-1.8x (median 1.3x over 12 alternating runs) faster without spinning.
  ``onnxruntime-spin`` keeps ORT's own spinning default for dedicated many-core machines. (bf16 autocast on
  CPU is not used: it was slower than ORT fp32 and its features fell to cosine 0.977 vs fp32 on real photos.)
- Resumable: each shard's features are written atomically to ``<out>/parts/`` as soon as the shard is done;
  a restarted run reuses finished parts and only assembles at the end. A finished directory with the same
  fingerprint is returned at once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniembed.core.fsutil import file_stamp
from uniembed.features.store import is_complete, write_feature_set
from uniembed.models.preprocess import ImagePreprocessor, PreprocessConfig
from uniembed.models.registry import Backbone, create_backbone

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime", "onnxruntime-spin")
#: Bump when the part-file layout or the pixel pipeline changes, so old parts/caches are not reused.
PIPELINE_VERSION = 2
#: Draft-decode JPEGs only when both sides are at least this many times the model input (much larger).
DRAFT_FACTOR = 2


class ExtractError(RuntimeError):
    """A user-facing extraction problem (bad dataset, bad engine); the CLI prints it without a traceback."""


# ---------------------------------------------------------------------------------------------- pixels


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


class PixelEmbedder(nn.Module):
    """Pixels [B,3,S,S] in [0,255] (any dtype, already S x S) -> features [B,D]: normalise once per batch,
    then backbone + pooling."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.pre = backbone.preprocessor()
        self.net = backbone.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pre.normalize(x))


# ---------------------------------------------------------------------------------------------- engines


def resolve_engine(engine: str, device: str | None = None) -> str:
    """``auto`` -> torch on GPU, ONNX Runtime on CPU."""
    if engine not in ENGINES:
        raise ExtractError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "torch" if dev.startswith("cuda") else "onnxruntime"


def default_threads() -> int:
    from uniembed.core.runtime import cpu_threads_default

    return cpu_threads_default()


class TorchRunner:
    """Eager (optionally compiled) torch; bf16 autocast + channels_last on GPU."""

    engine = "torch"

    def __init__(
        self, backbone: Backbone, device: str | None = None, threads: int | None = None, compile: bool = False
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        if not self.cuda and threads:
            torch.set_num_threads(int(threads))
        model = PixelEmbedder(backbone).eval().to(self.device)
        if self.cuda:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if compile else model

    def __call__(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        x = torch.as_tensor(pixels).to(self.device, non_blocking=True)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda),
        ):
            y = self.model(x)
        return y.float().cpu().numpy()


def onnx_cache_path(backbone: Backbone) -> Path:
    """``cache_dir()/onnx/<fingerprint>.onnx``. Random weights get their content hash in the key, since one
    "random" fingerprint must never serve another run's differently initialised network."""
    from uniembed.core.paths import cache_dir

    key = backbone.fingerprint()
    if backbone.weights_hash == "random":
        from uniembed.core.runtime import state_dict_sha256

        key += "-r" + state_dict_sha256(backbone.module)[:12]
    d = cache_dir() / "onnx"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{key}-px{PIPELINE_VERSION}.onnx"


def export_onnx(backbone: Backbone, path: Path) -> Path:
    """Export ``PixelEmbedder(backbone)`` (float32 pixels [B,3,S,S] -> [B,D], dynamic batch) atomically."""
    s = backbone.preprocess.input_size
    model = PixelEmbedder(backbone).eval()
    dummy = torch.zeros(2, 3, s, s, dtype=torch.float32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Antialiased resizes inside the backbone (an ensemble's per-member resize) need opset 18, which the
    # TorchScript-based exporter lacks: it would fail after dumping its whole IR graph to stderr.
    legacy = not any(getattr(m, "antialias_resize", False) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if not legacy:
                raise RuntimeError("antialiased resize inside the backbone: torch.export-based exporter")
            # The TorchScript-based exporter: fast, and handles every single backbone registered here.
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                input_names=["pixels"],
                output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        except Exception as e:  # noqa: BLE001 - try the torch.export-based exporter before giving up
            log.info("legacy ONNX export failed (%s); trying dynamo exporter", e)
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                input_names=["pixels"],
                output_names=["features"],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                verbose=False,
            )
    os.replace(tmp, path)
    return path


class OrtRunner:
    """ONNX Runtime CPU session over the cached export of the backbone.

    ``spin=False`` (the default) turns off the intra-op threads' busy-waiting between operators: while the
    DataLoader decode worker and other processes share the cores, spinning threads burn the very core time
    the worker needs (measured: docs/bench.md and the module docstring)."""

    def __init__(self, backbone: Backbone, threads: int | None = None, spin: bool = False):
        from uniembed.core.runtime import onnx_session

        path = onnx_cache_path(backbone)
        if not path.exists():
            export_onnx(backbone, path)
        self.engine = "onnxruntime-spin" if spin else "onnxruntime"
        self.spin = spin
        self.path = path
        self.session = onnx_session(path, int(threads or default_threads()), spin=spin)

    def __call__(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        x = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
        return self.session.run(["features"], {"pixels": np.ascontiguousarray(x, dtype=np.float32)})[0]


_RUNNERS: dict[tuple, Any] = {}


def make_runner(
    backbone: Backbone,
    engine: str = "auto",
    threads: int | None = None,
    device: str | None = None,
    compile: bool = False,
):
    """A callable pixels [B,3,S,S] (0..255) -> float32 [B,D] for the chosen engine (cached per process)."""
    eng = resolve_engine(engine, device)
    key = (id(backbone.module), eng, threads, device, compile)
    if key in _RUNNERS:
        return _RUNNERS[key]
    if eng.startswith("onnxruntime"):
        try:
            runner = OrtRunner(backbone, threads=threads, spin=eng == "onnxruntime-spin")
        except Exception as e:
            if engine.startswith("onnxruntime"):
                raise ExtractError(f"ONNX Runtime engine failed for {backbone.name}: {e}") from e
            log.warning("ONNX export/session failed for %s (%s); using torch", backbone.name, e)
            runner = TorchRunner(backbone, device=device, threads=threads, compile=compile)
    else:
        runner = TorchRunner(backbone, device=device, threads=threads, compile=compile)
    # Keep the module alive with its runner: the cache key uses id(module), which must not be recycled.
    runner.module_ref = backbone.module
    _RUNNERS.clear()  # keep at most one live session (they hold the whole network)
    _RUNNERS[key] = runner
    return runner


# ----------------------------------------------------------------------------------------- shard loading


class _ShardBatches(torch.utils.data.IterableDataset):
    """Float16 pixel batches of whole shards; DataLoader worker ``w`` of ``n`` takes shards w, w+n, ..."""

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


def _worker_init(_: int) -> None:
    # Each worker decodes one image at a time; intra-op threads would only fight the model's threads.
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ extract


def backbone_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def feature_dir_for(out_root: str | Path, backbone: Backbone, manifest_hash: str) -> Path:
    """``<out_root>/<backbone-slug>-<fingerprint>-<manifest hash[:12]>`` (docs/design.md)."""
    return Path(out_root) / f"{backbone_slug(backbone.name)}-{backbone.fingerprint()}-{manifest_hash[:12]}"


def _part_path(parts: Path, shard_name: str) -> Path:
    return parts / (Path(shard_name).name.removesuffix(".tar") + ".npz")


def _write_part(path: Path, feats: np.ndarray, meta: list[dict], bad: list[dict], stamp: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            features=feats.astype(np.float16),
            meta=np.array(json.dumps(meta)),
            bad=np.array(json.dumps(bad)),
            stamp=np.array(json.dumps(stamp, sort_keys=True)),
        )
    os.replace(tmp, path)


def _read_part(path: Path, stamp: dict) -> tuple[np.ndarray, list[dict], list[dict]] | None:
    """A finished part, or None if missing, unreadable or written for another feature function."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            if json.loads(str(z["stamp"])) != json.loads(json.dumps(stamp, sort_keys=True)):
                return None
            feats = z["features"]
            meta = json.loads(str(z["meta"]))
            bad = json.loads(str(z["bad"]))
    except Exception:  # noqa: BLE001 - a half-written or foreign file is simply redone
        return None
    if feats.shape[0] != len(meta):
        return None
    return feats, meta, bad


def default_workers(n_shards: int) -> int:
    """Decode workers: on small CPUs one worker beside the model's threads; more where cores allow."""
    cores = default_threads()
    want = 1 if cores <= 4 else min(8, cores - 2)
    return max(0, min(want, n_shards))


@dataclass
class ExtractStats:
    """What the last ``extract`` call did (also stored in ``info.json``)."""

    images: int = 0
    seconds: float = 0.0
    reused_shards: int = 0
    skipped: list[dict] = field(default_factory=list)
    engine: str = ""
    cached: bool = False

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


#: Stats of the most recent ``extract()`` in this process (the CLI prints them).
LAST_STATS = ExtractStats()


def as_backbone(backbone: str | Backbone, *, pretrained: bool = True, pooling: str = "avg") -> Backbone:
    """A ready ``Backbone`` as given, or a registry name built with ``pretrained``/``pooling``."""
    if isinstance(backbone, Backbone):
        return backbone
    return create_backbone(backbone, pretrained=pretrained, pooling=pooling)


def extract(
    dataset_dir: str | Path,
    backbone: str | Backbone = "mobilenetv2",
    out_root: str | Path = "artifacts/features",
    pooling: str = "avg",
    engine: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
    workers: int | None = None,
    pretrained: bool = True,
    device: str | None = None,
    compile: bool = False,
    progress: bool = True,
    draft: bool = True,
) -> Path:
    """Extract pooled frozen features for every image of a prepared dataset; returns the feature directory.

    ``backbone`` is a registry name (built with ``pooling``/``pretrained``) or a ready ``Backbone``.
    ``draft=False`` disables reduced-scale decoding of JPEGs >= 2x the input size (slower, exact).
    Re-running with the same backbone, weights, preprocessing, pooling and dataset returns at once.
    """
    global LAST_STATS
    from uniembed.data.shards import load_manifest, shard_paths
    from uniembed.data.sources import DataError

    t_start = time.perf_counter()
    if batch_size < 1:
        raise ExtractError("batch_size must be at least 1")
    ds = Path(dataset_dir).expanduser().resolve()
    try:
        manifest = load_manifest(ds)
        shards = shard_paths(ds)
    except DataError as e:
        raise ExtractError(str(e)) from e
    mhash = str(manifest.get("hash", ""))
    if not mhash:
        raise ExtractError(f"{ds}/manifest.json has no 'hash'; re-run `uniembed prepare`")
    bb = as_backbone(backbone, pretrained=pretrained, pooling=pooling)
    fp = bb.fingerprint()
    out = feature_dir_for(out_root, bb, mhash)
    if _cache_hit(out, fp, mhash, draft, t_start):
        return out

    out.mkdir(parents=True, exist_ok=True)
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    stamp = {"fingerprint": fp, "manifest_hash": mhash, "dim": bb.dim, "pipeline": PIPELINE_VERSION}
    stamp["draft"] = draft
    done: dict[int, tuple[np.ndarray, list[dict], list[dict]]] = {}
    todo: list[tuple[int, str]] = []
    for i, sp in enumerate(shards):
        part = _read_part(_part_path(parts, sp.name), stamp)
        if part is not None:
            done[i] = part
        else:
            todo.append((i, str(sp)))
    reused = len(done)

    stats = ExtractStats(reused_shards=reused)
    n_workers = default_workers(len(todo)) if workers is None else max(0, min(int(workers), len(todo)))
    t0 = time.perf_counter()
    if todo:
        runner = make_runner(bb, engine, threads=threads, device=device, compile=compile)
        stats.engine = runner.engine
        stats.images = _run_shards(
            todo, shards, bb, runner, batch_size, n_workers, parts, stamp, done, manifest, progress, draft
        )
    else:
        stats.engine = resolve_engine(engine, device)
    stats.seconds = time.perf_counter() - t0

    # Assemble in shard order (== key order of the manifest).
    feats_l, meta_rows, skipped = [], [], []
    for i in range(len(shards)):
        f, m, b = done[i]
        feats_l.append(np.asarray(f, dtype=np.float16).reshape(-1, bb.dim))
        meta_rows += m
        skipped += b
    if not meta_rows:
        raise ExtractError(f"no decodable images in {ds} ({len(skipped)} skipped)")
    stats.skipped = skipped
    info = _feature_info(bb, mhash, str(ds), stats, draft, reused_shards=reused)
    write_feature_set(out, np.concatenate(feats_l), meta_rows, info, list(manifest.get("labels", [])))
    for p in parts.glob("*"):
        p.unlink()
    parts.rmdir()
    LAST_STATS = stats
    return out


def _cache_hit(out: Path, fp: str, mhash: str, draft: bool, t_start: float) -> bool:
    """True (and LAST_STATS says so) when ``out`` already holds this feature function on this data."""
    global LAST_STATS
    if not is_complete(out):
        return False
    info = json.loads((out / "info.json").read_text())
    if (info.get("fingerprint"), info.get("manifest_hash"), info.get("draft")) != (fp, mhash, draft):
        return False
    LAST_STATS = ExtractStats(
        images=int(info.get("count", 0)),
        seconds=time.perf_counter() - t_start,
        engine=str(info.get("engine", "")),
        cached=True,
        skipped=list(info.get("skipped", [])),
    )
    return True


def _feature_info(
    bb: Backbone, mhash: str, dataset_dir: str | None, stats: ExtractStats, draft: bool, **extra: Any
) -> dict:
    """info.json of a feature dir: what computed the features, on which data, how fast, what was skipped."""
    return {
        "backbone": bb.name,
        "fingerprint": bb.fingerprint(),
        "weights": bb.weights,
        "weights_hash": bb.weights_hash,
        "preprocess": bb.preprocess.to_dict(),
        "pooling": bb.pooling,
        "manifest_hash": mhash,
        "dataset_dir": dataset_dir,
        "engine": stats.engine,
        "pipeline_version": PIPELINE_VERSION,
        "draft": draft,
        "images_per_s": round(stats.images_per_s, 2),
        **extra,
        "skipped": stats.skipped,
        "skipped_counts": _count_reasons(stats.skipped),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _count_reasons(skipped: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return counts


def _run_shards(
    todo: list[tuple[int, str]],
    shards: list[Path],
    bb: Backbone,
    runner: Any,
    batch_size: int,
    n_workers: int,
    parts: Path,
    stamp: dict,
    done: dict[int, tuple[np.ndarray, list[dict], list[dict]]],
    manifest: dict,
    progress: bool,
    draft: bool,
) -> int:
    """Feed the remaining shards through the runner, writing each shard's part as soon as it is complete."""
    from tqdm.auto import tqdm

    finished = sum(len(m) + len(b) for _, m, b in done.values())
    total = max(0, int(manifest.get("count", 0)) - finished)
    dataset = _ShardBatches(todo, bb.preprocess, batch_size, draft)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=n_workers,
        worker_init_fn=_worker_init if n_workers else None,
        pin_memory=getattr(runner, "cuda", False),
        prefetch_factor=4 if n_workers else None,
        persistent_workers=False,
    )
    acc: dict[int, tuple[list[np.ndarray], list[dict], list[dict]]] = {}
    n_images = 0
    bar = tqdm(
        total=total or None, unit="img", desc=f"extract {bb.name}", disable=not progress, smoothing=0.1
    )
    try:
        for item in loader:
            i = int(item["shard"])
            if "error" in item:
                raise ExtractError(f"cannot read shard: {item['error']}")
            f_l, m_l, b_l = acc.setdefault(i, ([], [], []))
            x = item["pixels"]
            if x.shape[0]:
                f_l.append(np.asarray(runner(x), dtype=np.float32))
                m_l += item["meta"]
            b_l += item["bad"]
            bar.update(x.shape[0] + len(item["bad"]))
            n_images += int(x.shape[0])
            if item["last"]:
                feats = np.concatenate(f_l) if f_l else np.zeros((0, bb.dim), np.float32)
                if feats.shape[1] != bb.dim:
                    raise ExtractError(f"{bb.name} produced {feats.shape[1]}-d features, expected {bb.dim}")
                meta = [
                    {k: m.get(k, "") for k in ("key", "path", "label", "label_id", "domain", "source")}
                    for m in m_l
                ]
                _write_part(_part_path(parts, shards[i].name), feats, meta, b_l, stamp)
                done[i] = (feats.astype(np.float16), meta, b_l)
                del acc[i]
    finally:
        bar.close()
    return n_images


# ------------------------------------------------------------------------------------------ arbitrary files


@dataclass
class EmbedResult:
    """Features of the images that decoded (rows follow ``indices`` into the input) + the skipped ones."""

    features: np.ndarray  # float32 [n_ok, D]
    indices: np.ndarray  # int64 [n_ok], positions in the input sequence
    skipped: list[tuple[int, str]]  # (position, reason)

    def __len__(self) -> int:
        return int(self.features.shape[0])


class _ItemPixels(torch.utils.data.Dataset):
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


def embed_paths(
    items: Sequence[Any],
    backbone: str | Backbone = "mobilenetv2",
    pooling: str = "avg",
    engine: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
    workers: int | None = None,
    pretrained: bool = True,
    on_bad: str = "skip",
    device: str | None = None,
    progress: bool = False,
    draft: bool = True,
) -> EmbedResult:
    """Embed image files / bytes / PIL images with exactly the extraction pipeline (same decode, resize and
    engine), e.g. to evaluate raw features on files that were never prepared into shards.

    ``backbone`` is a registry name or a ready ``Backbone`` (reuse one across calls: the engine session is
    cached per backbone). ``workers`` decode processes (default: none for short lists).
    ``on_bad="skip"`` skips undecodable inputs and lists ``(position, reason)`` in ``skipped``; ``"raise"``
    raises ``BadImageError`` naming the input."""
    from tqdm.auto import tqdm

    from uniembed.data.images import BadImageError

    if on_bad not in ("skip", "raise"):
        raise ValueError("on_bad must be 'skip' or 'raise'")
    bb = as_backbone(backbone, pretrained=pretrained, pooling=pooling)
    runner = make_runner(bb, engine, threads=threads, device=device)
    n_batches = -(-len(items) // batch_size)
    if workers is None:
        workers = 0 if len(items) < 4 * batch_size else default_workers(n_batches)
    loader = torch.utils.data.DataLoader(
        _ItemPixels(items, bb.preprocess, draft),
        batch_size=batch_size,
        shuffle=False,
        num_workers=max(0, int(workers)),
        collate_fn=_collate_items,
        worker_init_fn=_worker_init if workers else None,
    )
    feats: list[np.ndarray] = []
    ok: list[int] = []
    skipped: list[tuple[int, str]] = []
    with tqdm(total=len(items), unit="img", disable=not progress, desc="embed") as bar:
        for batch in loader:
            for i, reason in batch["bad"]:
                if on_bad == "raise":
                    item = items[i]
                    name = item if isinstance(item, str | os.PathLike) else f"input #{i}"
                    raise BadImageError(reason.split(":", 1)[0], f"{name}: {reason}")
                skipped.append((i, reason.split(":", 1)[0]))
            if batch["pixels"] is not None:
                feats.append(np.asarray(runner(batch["pixels"]), dtype=np.float32))
                ok += batch["idx"]
            bar.update(len(batch["idx"]) + len(batch["bad"]))
    f = np.concatenate(feats) if feats else np.zeros((0, bb.dim), np.float32)
    return EmbedResult(features=f, indices=np.asarray(ok, dtype=np.int64), skipped=skipped)


def files_hash(records: Sequence[Any]) -> str:
    """Identity of a list of image files: path, label, domain, size and mtime of each (so an edited or
    replaced file invalidates the cache, like a new manifest hash does for shards)."""
    import hashlib

    h = hashlib.sha256()
    for r in records:
        stamp = file_stamp(r.path, missing="missing")
        h.update(f"{r.path}|{r.label}|{r.domain}|{r.source}|{stamp}\n".encode())
    return h.hexdigest()


def extract_files(
    sources: Sequence[Any],
    backbone: str | Backbone = "mobilenetv2",
    out_root: str | Path = "artifacts/features",
    pooling: str = "avg",
    engine: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
    workers: int | None = None,
    pretrained: bool = True,
    device: str | None = None,
    progress: bool = True,
    draft: bool = True,
) -> Path:
    """Files -> feature cache in one pass, without writing shards first (``uniembed extract labels.csv``).

    ``sources`` are the same specs ``uniembed prepare`` takes (labels.csv, imagefolder:DIR, gldv2:ROOT, ...).
    For a one-off extraction this skips the shard pass (decode + resize + JPEG re-encode); shards still pay
    off when several backbones, fine-tuning or the index read the same images. Same decode/resize/engine
    as :func:`embed_paths`; undecodable files are skipped and counted in ``info.json``."""
    global LAST_STATS
    from uniembed.data.sources import DataError, parse_sources

    t_start = time.perf_counter()
    try:
        records = [r for s in parse_sources(list(sources)) for r in s.records()]
    except DataError as e:
        raise ExtractError(str(e)) from e
    if not records:
        raise ExtractError(f"no images found in {', '.join(map(str, sources))}")
    bb = as_backbone(backbone, pretrained=pretrained, pooling=pooling)
    mhash = "files-" + files_hash(records)
    out = feature_dir_for(out_root, bb, mhash)
    if _cache_hit(out, bb.fingerprint(), mhash, draft, t_start):
        return out
    res = embed_paths(
        [r.path for r in records],
        bb,
        engine=engine,
        batch_size=batch_size,
        threads=threads,
        workers=workers,
        device=device,
        progress=progress,
        draft=draft,
    )
    labels = sorted({r.label for r in records})
    label_id = {lab: i for i, lab in enumerate(labels)}
    meta_rows = []
    for i in res.indices.tolist():
        r = records[i]
        meta_rows.append(
            {
                "key": f"{i:08d}",
                "path": r.path,
                "label": r.label,
                "label_id": label_id[r.label],
                "domain": r.domain,
                "source": r.source,
            }
        )
    skipped = [{"path": records[i].path, "reason": reason} for i, reason in res.skipped]
    stats = ExtractStats(
        images=len(records),
        seconds=time.perf_counter() - t_start,
        engine=resolve_engine(engine, device),
        skipped=skipped,
    )
    info = _feature_info(bb, mhash, None, stats, draft, sources=[str(s) for s in sources])
    write_feature_set(out, res.features, meta_rows, info, labels)
    LAST_STATS = stats
    return out
