"""Extraction measure: image files -> features, the project's pipeline vs a plain torch eager loop.

Both sides start from the same image files (a fixed, seeded mix of grocery JPEGs and COIL-100 PNGs) and end
with features in memory or on disk. The project side is what a user runs: ``prepare`` (files -> shards) then
``extract`` (shards -> feature cache, DataLoader decode workers, default engine). The baseline is the loop
everyone writes first: PIL + torchvision transforms, batches of 32, the same MobileNetV2 in eager torch.
"""

from __future__ import annotations

import csv
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uniembed.data.sources import write_labels_csv
from uniembed_lab.bench.common import BenchConfig, ProgressFile


class BenchDataError(RuntimeError):
    """The real photo sets are missing or too small for the requested subset."""


# ---------------------------------------------------------------------------------------------- image subset
def select_images(cfg: BenchConfig) -> list[dict]:
    """A fixed subset: ``n_images`` rows, ``png_fraction`` of them COIL-100 PNGs, the rest grocery JPEGs,
    drawn with a seeded RNG and sorted by path, so every run and both sides see the same files."""
    from uniembed.core.paths import shared_data_dir

    root = cfg.data_dir or shared_data_dir()
    if root is None:
        raise BenchDataError(
            "no real photos: ../shared/data not found beside the checkout; pass --data DIR or set "
            "UNIEMBED_SHARED_DATA to a folder holding grocery_store/ and/or coil100/ with labels.csv"
        )
    root = Path(root)
    pools: dict[str, list[dict]] = {}
    for sub in ("grocery_store", "coil100"):
        csv_path = root / sub / "labels.csv"
        if not csv_path.exists():
            continue
        with open(csv_path, newline="") as f:
            rows = [
                {"path": str((root / sub / r["path"]).resolve()), "label": r["label"], "domain": r["domain"]}
                for r in csv.DictReader(f)
            ]
        pools[sub] = [r for r in rows if Path(r["path"]).is_file()]
    if not pools:
        raise BenchDataError(f"{root} holds neither grocery_store/labels.csv nor coil100/labels.csv")
    rng = random.Random(cfg.seed)
    n_png = round(cfg.n_images * cfg.png_fraction) if "coil100" in pools else 0
    if "grocery_store" not in pools:
        n_png = cfg.n_images
    want = {"coil100": n_png, "grocery_store": cfg.n_images - n_png}
    picked: list[dict] = []
    for sub, n in want.items():
        pool = pools.get(sub, [])
        if n > len(pool):
            raise BenchDataError(f"{root / sub}: {len(pool)} images, the benchmark wants {n}")
        picked += rng.sample(pool, n)
    return sorted(picked, key=lambda r: r["path"])


def write_subset_csv(cfg: BenchConfig, rows: list[dict]) -> Path:
    """labels.csv (absolute paths) of the subset: the project's ``prepare`` reads it."""
    out = cfg.work_dir / "images.csv"
    write_labels_csv(out, rows)
    return out


# ---------------------------------------------------------------------------------------------- baseline
def baseline_transform(size: int = 224):
    """torchvision's classic eval transform: Resize(short side) + CenterCrop + ToTensor + Normalize."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(size),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


def baseline_model(cfg: BenchConfig):
    """The same MobileNetV2 (same weights, avg pooling) as a plain eager torch module."""
    from uniembed.models.registry import create_backbone

    return create_backbone(cfg.backbone).module.eval()


def extract_baseline(cfg: BenchConfig, progress: ProgressFile) -> dict:
    """The naive loop: open each file with PIL, transform, batch 32, eager forward; features in memory."""
    import torch
    from PIL import Image

    rows = select_images(cfg)
    paths = [r["path"] for r in rows]
    for p in paths:  # page cache warm for both sides (the project side does the same)
        Path(p).read_bytes()
    t0 = time.perf_counter()
    model = baseline_model(cfg)
    tf = baseline_transform()
    feats: list[np.ndarray] = []
    batch: list = []
    skipped = 0
    with torch.no_grad():
        for i, p in enumerate(paths):
            try:
                with Image.open(p) as im:
                    batch.append(tf(im.convert("RGB")))
            except OSError:
                skipped += 1
            if len(batch) == cfg.batch_size or (i == len(paths) - 1 and batch):
                feats.append(model(torch.stack(batch)).numpy())
                batch = []
            progress.update(i + 1, len(paths), "torch eager loop (PIL + torchvision transforms)")
    dt = time.perf_counter() - t0
    f = np.concatenate(feats)
    return {
        "figure": len(f) / dt,
        "unit": "images/s",
        "details": {
            "method": "PIL open+convert, Resize(224)+CenterCrop(224)+ToTensor+Normalize, batch "
            f"{cfg.batch_size}, torch eager MobileNetV2 (no_grad), {cfg.threads} threads, no DataLoader",
            "images": int(len(f)),
            "skipped": skipped,
            "seconds": dt,
            "feature_shape": list(f.shape),
        },
    }


# ---------------------------------------------------------------------------------------------- project
def extract_project(cfg: BenchConfig, progress: ProgressFile) -> dict:
    """Two project paths from the same files, timed separately.

    The primary figure is ``extract_files`` (``uniembed extract labels.csv``): image files -> feature cache
    on disk in one pass. The shards path, ``prepare`` (files -> WebDataset shards) + ``extract`` (shards ->
    feature cache), is reported beside it: it pays a decode/resize/re-encode pass once per dataset, which
    other backbones, fine-tuning and the index then reuse. The one-time ONNX export of the backbone (cached
    per machine) is done before the clock starts and reported apart."""
    rows = select_images(cfg)
    csv_path = write_subset_csv(cfg, rows)
    engine, t_warm = _warm_up(cfg, rows, progress)
    shutil.rmtree(cfg.work_dir / "dataset", ignore_errors=True)
    shutil.rmtree(cfg.work_dir / "features", ignore_errors=True)
    # Peak RSS of each phase of this process (the side's overall peak and process tree are measured by the
    # parent); prepare's pool and extract's DataLoader workers are separate processes, not included here.
    phase_peak: dict[str, float | None] = {}
    shards = _shards_path(cfg, csv_path, len(rows), engine, progress, phase_peak)
    files = _files_path(cfg, csv_path, progress, phase_peak)
    return {
        "figure": files.images / files.seconds,
        "unit": "images/s",
        "details": _project_details(cfg, engine, t_warm, shards, files, phase_peak),
    }


@dataclass
class _TimedPath:
    """One timed project path: images it extracted, its phases' seconds, where the features went."""

    images: int
    seconds: float
    feature_dir: Path
    phase_seconds: dict[str, float] = field(default_factory=dict)
    shard_count: int = 0


def _warm_up(cfg: BenchConfig, rows: list[dict], progress: ProgressFile) -> tuple[str, float]:
    """One-time costs, outside the clock: ONNX export into the cache, and the page cache of the files.
    Returns (engine, seconds of the export)."""
    from uniembed.features import extract as ext
    from uniembed.models.registry import create_backbone

    progress.update(0, 3, "warm-up: ONNX export of the backbone (cached per machine)", force=True)
    t0 = time.perf_counter()
    bb = create_backbone(cfg.backbone)
    runner = ext.make_runner(bb, "auto", threads=cfg.threads)
    t_warm = time.perf_counter() - t0
    engine = runner.engine
    for r in rows:
        Path(r["path"]).read_bytes()
    del runner, bb
    # make_runner keeps the last session per process; drop it so each timed call below builds its own
    # session, as a fresh `uniembed extract` would.
    ext._RUNNERS.clear()
    return engine, t_warm


def _shards_path(
    cfg: BenchConfig, csv_path: Path, n_rows: int, engine: str, progress: ProgressFile, phase_peak: dict
) -> _TimedPath:
    """``prepare`` (files -> shards) then ``extract`` (shards -> feature cache), each timed."""
    from uniembed.data.prepare import prepare
    from uniembed.features import extract as ext
    from uniembed_lab.bench.sysinfo import peak_rss_since_reset_mb, reset_peak_rss

    ds_dir = cfg.work_dir / "dataset"
    progress.update(1, 3, f"prepare: {n_rows} files -> shards", force=True)
    reset_peak_rss()
    t0 = time.perf_counter()
    manifest = prepare([str(csv_path)], ds_dir, min_per_class=1, progress=False)
    t_prepare = time.perf_counter() - t0
    phase_peak["prepare"] = peak_rss_since_reset_mb()
    if int(manifest["count"]) != n_rows:
        raise RuntimeError(f"prepare kept {manifest['count']} of {n_rows} images: {manifest.get('skipped')}")

    progress.update(2, 3, f"extract: shards -> features ({engine})", force=True)
    reset_peak_rss()
    t0 = time.perf_counter()
    result = ext.extract_with_stats(
        ds_dir, cfg.backbone, out_root=cfg.work_dir / "features", threads=cfg.threads, progress=False
    )
    t_extract = time.perf_counter() - t0
    phase_peak["extract"] = peak_rss_since_reset_mb()
    n = int(result.stats.images)
    phases = {"prepare": t_prepare, "extract": t_extract}
    return _TimedPath(n, t_prepare + t_extract, result.path, phases, len(manifest["shards"]))


def _files_path(cfg: BenchConfig, csv_path: Path, progress: ProgressFile, phase_peak: dict) -> _TimedPath:
    """``extract_files`` (files -> feature cache, no shards), timed with a fresh session."""
    from uniembed.features import extract as ext
    from uniembed_lab.bench.sysinfo import peak_rss_since_reset_mb, reset_peak_rss

    progress.update(3, 3, "extract_files: files -> features (no shards)", force=True)
    ext._RUNNERS.clear()
    reset_peak_rss()
    t0 = time.perf_counter()
    files_result = ext.extract_files_with_stats(
        [str(csv_path)], cfg.backbone, out_root=cfg.work_dir / "features", threads=cfg.threads, progress=False
    )
    t_files = time.perf_counter() - t0
    phase_peak["extract_files"] = peak_rss_since_reset_mb()
    n_files = int(files_result.stats.images)
    return _TimedPath(n_files, t_files, files_result.path)


def _project_details(
    cfg: BenchConfig, engine: str, t_warm: float, shards: _TimedPath, files: _TimedPath, phase_peak: dict
) -> dict:
    """The extract measure's details block (extract.json): both paths, their phases, the settings."""
    from uniembed.data.prepare import default_workers as prepare_workers
    from uniembed.features import extract as ext

    n, t_prepare, t_extract = shards.images, shards.phase_seconds["prepare"], shards.phase_seconds["extract"]
    return {
        "measured": "extract_files (`uniembed extract labels.csv`: files -> feature cache, no shards)",
        "images": files.images,
        "engine": engine,
        "threads": cfg.threads,
        "seconds_extract_files": files.seconds,
        "shards_path_images_per_s": n / shards.seconds,
        "shards_path_note": "prepare (files -> WebDataset shards) + extract (shards -> feature cache)",
        "extract_workers": ext.default_workers(shards.shard_count),
        "extract_batch_size": 64,
        "prepare_workers": prepare_workers(),
        "seconds_prepare": t_prepare,
        "seconds_extract": t_extract,
        "seconds_prepare_plus_extract": shards.seconds,
        "images_per_s_extract_only": n / t_extract,
        "images_per_s_prepare_only": n / t_prepare,
        "feature_dir_files": str(files.feature_dir),
        "one_time_warmup_s": t_warm,
        "main_process_peak_rss_mb_by_phase": phase_peak,
        "feature_dir": str(shards.feature_dir),
    }
