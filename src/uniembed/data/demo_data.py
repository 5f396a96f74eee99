"""Which photos the demo runs on. First match wins:

1. ``--data DIR`` (or a CSV): labels.csv files in DIR or its sub-folders;
2. the real photo sets beside the checkout (``shared_data_dir()``: grocery_store + coil100);
3. a cached copy of the Grocery Store Dataset (MIT), downloaded from its GitHub repository at a pinned commit
   when the machine is online (the download gives up within seconds when it is not);
4. a small built-in smoke set: real photos that ship inside scikit-image, each turned into several views by
   random crops, rotations, lighting/colour jitter, blur and JPEG re-encoding. Numbers on it only show that
   the pipeline runs; the demo says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import threading
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from uniembed.core.fsutil import atomic_path, building_dir, sha256_file
from uniembed.core.paths import cache_dir, shared_data_dir
from uniembed.data.sources import LABELS_CSV_FIELDS, DataError, write_labels_csv

GROCERY_COMMIT = "fc80ba90f803d79d0383df52c5a4ac5de99ff6fc"
GROCERY_URL = f"https://github.com/marcusklasson/GroceryStoreDataset/archive/{GROCERY_COMMIT}.zip"
#: Set to 1 to never try the download (CI, air-gapped machines).
OFFLINE_ENV = "UNIEMBED_OFFLINE"
_AUTO = object()

#: (skimage.data function, label, domain). All of these files ship inside the scikit-image wheel, so building
#: the smoke set never touches the network.
SMOKE_IMAGES: tuple[tuple[str, str, str], ...] = (
    ("astronaut", "astronaut", "photos"),
    ("camera", "cameraman", "photos"),
    ("chelsea", "cat", "photos"),
    ("coffee", "coffee_cup", "photos"),
    ("rocket", "rocket", "photos"),
    ("stereo_motorcycle", "motorcycle", "photos"),
    ("coins", "coins", "photos"),
    ("clock", "clock", "photos"),
    ("hubble_deep_field", "hubble_deep_field", "science"),
    ("moon", "moon", "science"),
    ("retina", "retina", "science"),
    ("immunohistochemistry", "ihc_stain", "science"),
    ("brick", "brick", "textures"),
    ("grass", "grass", "textures"),
    ("gravel", "gravel", "textures"),
)
SMOKE_VERSION = 2


class DownloadError(DataError):
    """The dataset could not be downloaded (offline, HTTP error, checksum mismatch)."""


# ----------------------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------------------


def find_labels_csvs(data: Path) -> list[Path]:
    """``data`` itself if it is a CSV, else every ``labels.csv`` in it or its sub-folders (sorted)."""
    data = Path(data).expanduser()
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise DataError(f"--data {data}: expected a folder or a labels .csv file")
        return [data.resolve()]
    if not data.is_dir():
        raise DataError(f"--data {data}: no such folder")
    found = sorted(p.resolve() for p in data.rglob("labels.csv") if p.is_file())
    if not found:
        raise DataError(f"--data {data}: no labels.csv (columns path,label,domain) in it or its sub-folders")
    return found


#: The shared sets the quick demo uses (packaged goods, produce, turntable toys).
DEMO_SETS = ("grocery_store", "coil100")


def resolve_demo_data(
    data: Path | str | None = None,
    *,
    shared: Path | None | object = _AUTO,
    cache: Path | None = None,
    url: str = GROCERY_URL,
    download: bool | None = None,
    timeout: float = 4.0,
    smoke_views: int = 6,
    console=None,
    shared_sets: tuple[str, ...] | None = DEMO_SETS,
) -> tuple[list[Path], str, str]:
    """Return ``(labels_csv_paths, description, kind)`` with kind in ``data``, ``shared``, ``download``,
    ``smoke`` (order in the module docstring).

    ``shared_sets``: which folders of the shared data to use (None: every folder with a labels.csv, as
    ``uniembed model`` does -- its recipe is chosen over every domain there).

    ``shared`` defaults to ``shared_data_dir()`` (pass None to skip it); ``download`` defaults to on unless
    ``$UNIEMBED_OFFLINE`` is set; ``timeout`` bounds the connection attempt in seconds.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    if data is not None:
        csvs = find_labels_csvs(Path(data))
        return csvs, f"--data {data}: {len(csvs)} labels.csv file(s)", "data"

    shared_dir = shared_data_dir() if shared is _AUTO else shared
    if shared_dir is not None:
        shared_dir = Path(shared_dir)
        if shared_sets is None:
            csvs = sorted(shared_dir.glob("*/labels.csv"))
        else:
            csvs = [shared_dir / s / "labels.csv" for s in shared_sets]
        csvs = [c for c in csvs if c.is_file()]
        if csvs:
            names = ", ".join(c.parent.name for c in csvs)
            return csvs, f"real photos in {shared_dir} ({names})", "shared"

    cache = Path(cache) if cache is not None else cache_dir()
    grocery = cache / "grocery_store"
    cached = cached_grocery(grocery)
    if cached is not None:
        return [cached], f"Grocery Store Dataset (cached download in {grocery})", "download"

    if download is None:
        download = os.environ.get(OFFLINE_ENV, "").strip() not in ("1", "true", "yes")
    if download:
        try:
            csv_path = download_grocery(grocery, url=url, timeout=timeout, console=console)
            return [csv_path], f"Grocery Store Dataset (downloaded to {grocery})", "download"
        except DownloadError as e:
            console.print(f"[yellow]Could not download the Grocery Store Dataset: {e}[/]")

    csv_path = build_smoke_set(cache / f"smoke_set_v{SMOKE_VERSION}", views=smoke_views, console=console)
    n = len(SMOKE_IMAGES)
    desc = (
        f"SMOKE SET: {n} scikit-image sample photos x {smoke_views} synthetic views ({csv_path.parent}). "
        "It only shows that the pipeline runs; its scores say nothing about model quality. "
        "Use --data DIR or put real photos in ../shared/data."
    )
    console.print(f"[bold yellow]{desc}[/]")
    return [csv_path], desc, "smoke"


# ----------------------------------------------------------------------------------------------------------
# Grocery Store Dataset download
# ----------------------------------------------------------------------------------------------------------


def _stat_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def cached_grocery(folder: Path) -> Path | None:
    """The cached labels.csv if a previous download finished and its archive still matches its checksum."""
    marker = folder / ".complete"
    labels = folder / "labels.csv"
    archive = folder / "archive.zip"
    sidecar = folder / "archive.zip.sha256"
    if not (marker.is_file() and labels.is_file() and archive.is_file() and sidecar.is_file()):
        return None
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    expected = sidecar.read_text().split()[0]
    if info.get("sha256") != expected:
        return None
    if info.get("stamp") != _stat_stamp(archive) and sha256_file(archive) != expected:
        # The archive changed on disk since extraction; do not trust the extracted copy either.
        return None
    return labels


def _host_resolves(url: str, timeout: float) -> bool:
    """DNS lookups ignore requests' timeout and can hang for a long time offline; bound them with a thread."""
    host = urlparse(url).hostname
    if not host:
        return False
    result: list[bool] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, None)
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def download_grocery(folder: Path, url: str = GROCERY_URL, timeout: float = 4.0, console=None) -> Path:
    """Download (streaming, with a progress bar), verify, extract and index the Grocery Store Dataset.

    The archive's SHA-256 cannot be known in advance here (this project is built offline), so it is
    trust-on-first-use: the first complete download records its checksum in ``archive.zip.sha256`` and every
    later download or load of the archive must match it.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "archive.zip"
    sidecar = folder / "archive.zip.sha256"
    if not archive.is_file():
        if not _host_resolves(url, timeout):
            raise DownloadError(f"cannot resolve {urlparse(url).hostname} (offline?)")
        # A failed or mismatching download leaves nothing behind: the archive appears whole or not at all.
        with atomic_path(archive) as part:
            digest = _stream_to(url, part, timeout, console)
            if sidecar.is_file() and sidecar.read_text().split()[0] != digest:
                raise DownloadError(
                    f"checksum mismatch for {url}: got {digest}, expected {sidecar.read_text().split()[0]}"
                )
        if not sidecar.is_file():
            sidecar.write_text(f"{digest}  archive.zip\n")
    else:
        digest = sha256_file(archive)
        if sidecar.is_file() and sidecar.read_text().split()[0] != digest:
            raise DownloadError(
                f"{archive} does not match its recorded checksum; delete {folder} to download again"
            )
        if not sidecar.is_file():
            sidecar.write_text(f"{digest}  archive.zip\n")

    extract = folder / "extract"
    if extract.exists():
        shutil.rmtree(extract)
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(extract)  # zipfile drops absolute and '..' path parts, so no path escapes
    except zipfile.BadZipFile as e:
        archive.unlink(missing_ok=True)
        raise DownloadError(f"{url} did not give a valid zip archive: {e}") from e
    n = write_grocery_labels(extract, folder / "labels.csv")
    (folder / ".complete").write_text(
        json.dumps({"sha256": digest, "stamp": _stat_stamp(archive), "images": n})
    )
    console.print(f"Grocery Store Dataset ready: {n} images in {folder}")
    return folder / "labels.csv"


def _stream_to(url: str, path: Path, timeout: float, console: Any) -> str:
    """Download ``url`` into ``path`` with a progress bar; returns the bytes' SHA-256 (DownloadError on any
    HTTP or connection problem)."""
    import requests
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    h = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=(timeout, 60)) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length") or 0) or None
            with (
                open(path, "wb") as f,
                Progress(
                    TextColumn("[bold]Downloading Grocery Store Dataset"),
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    console=console,
                ) as bar,
            ):
                task = bar.add_task("download", total=total)
                for block in r.iter_content(chunk_size=1 << 20):
                    f.write(block)
                    h.update(block)
                    bar.advance(task, len(block))
    except requests.RequestException as e:
        raise DownloadError(f"{url}: {type(e).__name__}: {str(e)[:160]}") from e
    return h.hexdigest()


_GROCERY_DOMAINS = {"Packages": "packaged_goods", "Fruit": "produce", "Vegetables": "produce"}
_GROCERY_SPLITS = {"train", "val", "test", "iconic-images-and-descriptions"}


def write_grocery_labels(extract_root: Path, csv_path: Path) -> int:
    """Index the repository's ``dataset/<split>/<Fruit|Vegetables|Packages>/.../<class>/*.jpg`` tree as a
    labels.csv in our format (label ``grocery:<finest class folder>``, paths relative to the CSV)."""
    rows: list[tuple[str, str, str]] = []
    for p in sorted(extract_root.rglob("*.jpg")):
        parts = p.relative_to(extract_root).parts
        split_idx = next((i for i, part in enumerate(parts) if part in _GROCERY_SPLITS), None)
        if split_idx is None or split_idx + 2 >= len(parts):
            continue
        domain = _GROCERY_DOMAINS.get(parts[split_idx + 1])
        if domain is None:
            continue
        rel = os.path.relpath(p, csv_path.parent)
        rows.append((rel, f"grocery:{p.parent.name}", domain))
    if not rows:
        raise DownloadError(f"no dataset images found in the downloaded archive under {extract_root}")
    counts: dict[str, int] = {}
    for _, label, _ in rows:
        counts[label] = counts.get(label, 0) + 1
    kept = [{"path": p, "label": lab, "domain": dom} for p, lab, dom in rows if counts[lab] >= 2]
    write_labels_csv(csv_path, kept)
    return len(kept)


# ----------------------------------------------------------------------------------------------------------
# Smoke set
# ----------------------------------------------------------------------------------------------------------


def _skimage_photo(func_name: str):
    """A scikit-image sample photo as RGB PIL (gray ones converted; a stereo pair gives its left image)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    arr = getattr(skimage.data, func_name)()
    if isinstance(arr, tuple):
        arr = arr[0]
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(float(arr.max()), 1e-12))).astype(np.uint8)
    im = Image.fromarray(arr).convert("RGB")
    im.thumbnail((800, 800), Image.Resampling.LANCZOS)  # views end at <= 400 px; smaller sources are faster
    return im


def make_view(im, rng: random.Random):
    """One realistic re-photograph of ``im``: crop, small rotation, lighting/colour change, maybe blur,
    resize and JPEG re-encoding at a random quality (returned as JPEG bytes)."""
    import io

    from PIL import Image, ImageEnhance, ImageFilter, ImageStat

    w, h = im.size
    # Random resized crop: 40-90 % of the area, aspect 3:4 .. 4:3.
    for _ in range(10):
        area = rng.uniform(0.4, 0.9) * w * h
        aspect = rng.uniform(3 / 4, 4 / 3)
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = w, h
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    view = im.crop((x0, y0, x0 + cw, y0 + ch))
    fill = tuple(int(v) for v in ImageStat.Stat(view).mean[:3])
    view = view.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BICUBIC, fillcolor=fill)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.65, 1.35))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.7, 1.3))
    view = ImageEnhance.Color(view).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.5:
        view = view.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.6)))
    longest = rng.randint(200, 400)
    scale = longest / max(view.size)
    view = view.resize((max(1, round(view.width * scale)), max(1, round(view.height * scale))))
    buf = io.BytesIO()
    view.save(buf, format="JPEG", quality=rng.randint(45, 90))
    return buf.getvalue()


def build_smoke_set(out_dir: Path, views: int = 6, seed: int = 0, console=None) -> Path:
    """Write the smoke set (files + labels.csv) into ``out_dir`` once; later calls return the cached CSV."""
    out_dir = Path(out_dir)
    csv_path = out_dir / "labels.csv"
    marker = out_dir / ".complete"
    if marker.is_file() and csv_path.is_file():
        try:
            if json.loads(marker.read_text()).get("views") == views:
                return csv_path
        except json.JSONDecodeError:
            pass
    if views < 2:
        raise ValueError("the smoke set needs at least 2 views per photo (a query needs a positive)")
    with building_dir(out_dir) as tmp:
        (tmp / "images").mkdir(parents=True)
        rows = []
        for func_name, label, domain in SMOKE_IMAGES:
            im = _skimage_photo(func_name)
            for v in range(views):
                rng = random.Random(f"{seed}:{label}:{v}")
                rel = f"images/{label}_{v}.jpg"
                (tmp / rel).write_bytes(make_view(im, rng))
                rows.append((rel, f"smoke:{label}", domain))
        write_labels_csv(tmp / "labels.csv", [dict(zip(LABELS_CSV_FIELDS, r, strict=True)) for r in rows])
        (tmp / ".complete").write_text(json.dumps({"views": views, "seed": seed, "images": len(rows)}))
    return csv_path
