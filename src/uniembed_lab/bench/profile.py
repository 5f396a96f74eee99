"""The ``extract_profile`` measure: where extraction time goes, each stage timed alone (ms per image).

Stages of the project's pipeline (``prepare``, then ``extract``'s DataLoader worker and main process) and of
the baseline loop (bench/extract.py), on the same images. Single-threaded stage timings are per process; the
DataLoader runs decode in a worker while the model runs in the main process, so the wall time is roughly the
slowest of (decode work / workers) and (model + copy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from uniembed_lab.bench.common import BenchConfig, ProgressFile
from uniembed_lab.bench.extract import baseline_model, baseline_transform, select_images

#: Batch size of the project's extraction (the DataLoader's collate and the model's input).
PROJECT_BATCH = 64


class StageTimes:
    """{group: {stage: ms per image}} of ``n`` images, reporting each recorded stage as progress."""

    def __init__(self, n: int, steps: int, progress: ProgressFile):
        self.n, self.steps, self.progress = n, steps, progress
        self.stages: dict[str, dict] = {}
        self.step = 0

    def record(self, group: str, name: str, seconds: float, note: str = "") -> None:
        self.stages.setdefault(group, {})[name] = {"ms_per_image": 1000 * seconds / self.n, "note": note}
        self.tick(f"{group}: {name}")

    def tick(self, desc: str) -> None:
        self.step += 1
        self.progress.update(self.step, self.steps, desc, force=True)

    def total_ms(self, group: str) -> float:
        return sum(v["ms_per_image"] for v in self.stages[group].values())


def _time_each(items: list, fn: Callable, reps: int = 3) -> tuple[list, float]:
    """Apply ``fn`` to each item; returns the outputs and the best-of-``reps`` total seconds (the best run
    is the one least disturbed by other processes on a shared machine)."""
    best = float("inf")
    out: list = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = [fn(x) for x in items]
        best = min(best, time.perf_counter() - t0)
    return out, best


def _seconds(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def extract_profile(cfg: BenchConfig, progress: ProgressFile) -> dict:
    """Every stage of both sides timed alone on the same images; the summary says which side bounds."""
    import torch

    from uniembed.models.registry import create_backbone

    every = select_images(cfg)
    # Every k-th image of the (path-sorted) subset keeps the JPEG/PNG mix of the whole subset.
    rows = every[:: max(1, len(every) // cfg.profile_images)][: cfg.profile_images]
    paths = [r["path"] for r in rows]
    st = StageTimes(len(paths), 16 + (1 if cfg.threads > 1 else 0), progress)
    torch.set_num_threads(1)  # per-image stages run single-threaded, as in a DataLoader worker
    raw, t = _time_each(paths, lambda p: Path(p).read_bytes())
    st.record("io", "read file bytes", t, "page cache warm")
    enc = _profile_prepare(st, raw)
    bb = create_backbone(cfg.backbone)
    pre = bb.preprocessor()
    arrs = _profile_worker(st, pre, enc)
    runner, by_batch = _profile_model(st, cfg, bb, arrs)
    _profile_baseline(st, cfg, raw)
    summary = _summary(st, _model_flops(bb.module, pre.size), runner.engine, by_batch)
    return {"figure": None, "unit": "ms/image", "details": {"stages": st.stages, "summary": summary}}


def _profile_prepare(st: StageTimes, raw: list[bytes]) -> list:
    """``prepare``: decode the original file, resize (longest side 336), encode the shard JPEG."""
    from uniembed.data.images import encode_jpeg, load_image, resize_image

    dec, t = _time_each(raw, load_image)
    st.record("prepare", "decode original (load_image)", t)
    rs, t = _time_each(dec, lambda im: resize_image(im, "longest", 336))
    st.record("prepare", "resize longest 336 (bicubic)", t)
    enc, t = _time_each(rs, lambda im: encode_jpeg(im, 95))
    st.record("prepare", "encode JPEG q95", t)
    return enc


def _profile_worker(st: StageTimes, pre: Any, enc: list) -> list[np.ndarray]:
    """What a DataLoader worker does (shard JPEG -> model input batch), then the main process's copy."""
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from uniembed.data.images import load_image

    dec2, t = _time_each(enc, load_image)
    st.record("extract_worker", "decode shard JPEG (load_image)", t)
    with torch.no_grad():
        ten, t = _time_each(dec2, lambda im: pil_to_tensor(im)[None])
        st.record("extract_worker", "pil_to_tensor", t)
        rsz, t = _time_each(ten, lambda x: pre.resize(x)[0].half())
        st.record("extract_worker", "squash-resize to 224 (antialiased interpolate) + float16", t)
    B = PROJECT_BATCH
    # As in the pipeline: the worker stacks its batch (1 thread), the main process converts it for ONNX
    # Runtime (numpy, float16 -> contiguous float32).
    groups = [rsz[s : s + B] for s in range(0, st.n, B)]
    stacked, t = _time_each(groups, torch.stack)
    st.record("extract_worker", f"collate: torch.stack of {B} float16 images", t)
    arrs, t = _time_each(stacked, lambda b: np.ascontiguousarray(b.numpy(), dtype=np.float32))
    st.record("extract_main", "float16 -> float32 copy (numpy)", t)
    return arrs


def _profile_model(st: StageTimes, cfg: BenchConfig, bb: Any, arrs: list[np.ndarray]) -> tuple[Any, dict]:
    """The project's model on the batches, then alone by batch size; returns (runner, images/s by batch)."""
    import torch

    from uniembed.features import extract as ext

    torch.set_num_threads(cfg.threads)
    runner = ext.make_runner(bb, "auto", threads=cfg.threads)
    runner(arrs[0])  # warm-up: session arena and kernels for this batch shape
    t0 = time.perf_counter()
    outs = [runner(a) for a in arrs]
    st.record(
        "extract_main",
        f"model ({runner.engine}, {cfg.threads} threads, batch {PROJECT_BATCH})",
        time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    _ = np.concatenate(outs).astype(np.float16)
    st.record("extract_main", "features -> float16 array", time.perf_counter() - t0)
    # Batch size matters on small CPUs: activations of big batches spill out of the caches.
    allx = np.concatenate(arrs)
    by_batch: dict[str, float] = {}
    for bs in (8, 16, 32, 64):
        if bs > len(allx):
            break
        x = allx[:bs]
        runner(x)
        best = min(_seconds(lambda x=x: runner(x)) for _ in range(3))
        by_batch[str(bs)] = bs / best
    st.tick("model images/s by batch size")
    return runner, by_batch


def _profile_baseline(st: StageTimes, cfg: BenchConfig, raw: list[bytes]) -> None:
    """The baseline loop's stages: PIL decode, torchvision transforms, eager torch model."""
    import io

    import torch
    from PIL import Image

    tf = baseline_transform()
    model = baseline_model(cfg)
    opened, t = _time_each(raw, lambda b: Image.open(io.BytesIO(b)).convert("RGB"))
    st.record("baseline", "PIL decode + convert RGB", t)
    resized, t = _time_each(opened, lambda im: tf.transforms[1](tf.transforms[0](im)))
    st.record("baseline", "Resize(224) + CenterCrop (PIL)", t)
    tens, t = _time_each(resized, lambda im: tf.transforms[3](tf.transforms[2](im)))
    st.record("baseline", "ToTensor + Normalize", t)
    torch.set_num_threads(cfg.threads)
    bb_batches = [torch.stack(tens[s : s + cfg.batch_size]) for s in range(0, st.n, cfg.batch_size)]
    with torch.no_grad():
        model(bb_batches[0])  # warm-up: oneDNN primitives for this batch shape
        st.record(
            "baseline",
            f"model (torch eager, {cfg.threads} threads, batch {cfg.batch_size})",
            _seconds(lambda: _forward_all(model, bb_batches)),
        )
        if cfg.threads > 1:
            # Eager torch's OpenMP threads spin-wait for each other; when other processes hold a core this
            # collapses (several times slower than 1 thread). Shown so the baseline's figure can be judged.
            torch.set_num_threads(1)
            model(bb_batches[0])
            st.record(
                "baseline",
                f"model (torch eager, 1 thread, batch {cfg.batch_size}) (reference)",
                _seconds(lambda: _forward_all(model, bb_batches)),
            )
            torch.set_num_threads(cfg.threads)


def _forward_all(model: Any, batches: list) -> None:
    """Every batch through ``model``, outputs dropped (as the timed loop of the baseline does)."""
    for b in batches:
        model(b)


def _summary(st: StageTimes, flops: float | None, engine: str, by_batch: dict[str, float]) -> dict:
    """Which side bounds extraction, the ideal throughput, and the model's achieved GFLOP/s."""
    stages = st.stages
    model_ms = next(v["ms_per_image"] for k, v in stages["extract_main"].items() if k.startswith("model"))
    worker_ms = st.total_ms("extract_worker")
    main_ms = st.total_ms("extract_main")
    return {
        "images": st.n,
        "model_gflop_per_image": flops / 1e9 if flops else None,
        "model_gflop_per_s_achieved": (flops / 1e9) / (model_ms / 1000) if flops else None,
        "extract_worker_ms_per_image": worker_ms,
        "extract_main_ms_per_image": main_ms,
        "prepare_ms_per_image_one_core": st.total_ms("prepare"),
        "bound": "model (main process)" if main_ms >= worker_ms else "decode+resize (DataLoader worker)",
        "ideal_extract_images_per_s": 1000 / max(main_ms, worker_ms),
        f"model_{engine}_images_per_s_by_batch": by_batch,
        "note": "stage times are measured alone; in the real pipeline worker and model share the cores",
    }


def _model_flops(module: Any, size: int) -> float | None:
    """Floating-point operations of one forward pass at ``size`` (torch's FLOP counter; 2 per MAC)."""
    import torch

    try:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            module(torch.zeros(1, 3, size, size))
        return float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - the profile is still useful without the FLOP count
        return None
