"""Demo data resolution order, the smoke-set builder, and the Grocery download (served from localhost)."""

from __future__ import annotations

import csv
import functools
import http.server
import io
import socket
import threading
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniembed.core.paths import shared_data_dir
from uniembed.data.demo_data import (
    GROCERY_COMMIT,
    SMOKE_IMAGES,
    DownloadError,
    build_smoke_set,
    cached_grocery,
    download_grocery,
    resolve_demo_data,
)
from uniembed.data.images import load_image
from uniembed.data.prepare import prepare
from uniembed.data.sources import DataError


def closed_port_url() -> str:
    """A localhost URL nobody listens on: the connection is refused at once, like an offline machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{GROCERY_COMMIT}.zip"


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def test_data_dir_first(tmp_path: Path) -> None:
    for sub in ("a", "b/nested"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "labels.csv").write_text("path,label,domain\n")
    csvs, desc, kind = resolve_demo_data(tmp_path, shared=None)
    assert kind == "data" and [c.parent.name for c in csvs] == ["a", "nested"]
    assert "2 labels.csv" in desc
    one, _, kind = resolve_demo_data(tmp_path / "a" / "labels.csv")
    assert kind == "data" and one == [(tmp_path / "a" / "labels.csv").resolve()]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no labels.csv"):
        resolve_demo_data(tmp_path / "empty")
    with pytest.raises(DataError, match="no such folder"):
        resolve_demo_data(tmp_path / "absent")


def test_shared_data_second(tmp_path: Path) -> None:
    (tmp_path / "coil100").mkdir()
    (tmp_path / "coil100" / "labels.csv").write_text("path,label,domain\n")
    csvs, desc, kind = resolve_demo_data(shared=tmp_path, cache=tmp_path / "cache", url=closed_port_url())
    assert kind == "shared" and csvs == [tmp_path / "coil100" / "labels.csv"]
    if shared_data_dir() is not None:  # the real sets beside the checkout, found by default
        csvs, _, kind = resolve_demo_data(cache=tmp_path / "cache", url=closed_port_url())
        assert kind == "shared" and {c.parent.name for c in csvs} == {"grocery_store", "coil100"}


def test_offline_falls_back_to_smoke_set_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    failed: list[tuple] = []
    real_get = requests.get

    def spy_get(url: str, **kwargs):
        try:
            return real_get(url, **kwargs)
        except requests.RequestException as e:
            failed.append((kwargs.get("timeout"), type(e)))
            raise

    monkeypatch.setattr(requests, "get", spy_get)
    csvs, desc, kind = resolve_demo_data(shared=None, cache=tmp_path, url=closed_port_url(), smoke_views=3)
    assert kind == "smoke" and "SMOKE SET" in desc
    # Fast: one connection attempt with a bounded timeout, refused at once (no retry, no waiting it out).
    assert len(failed) == 1
    timeout, error = failed[0]
    assert timeout == (4.0, 60)
    assert issubclass(error, requests.ConnectionError) and not issubclass(error, requests.Timeout)
    assert not (tmp_path / "grocery_store" / "archive.zip").exists()
    assert not (tmp_path / "grocery_store" / "archive.zip.part").exists()
    rows = read_rows(csvs[0])
    assert len(rows) == len(SMOKE_IMAGES) * 3
    assert Counter(r["label"] for r in rows) == {f"smoke:{lab}": 3 for _, lab, _ in SMOKE_IMAGES}
    assert {r["domain"] for r in rows} == {"photos", "science", "textures"}
    # Cached: the second call builds nothing.
    mtime = csvs[0].stat().st_mtime_ns
    again, _, kind = resolve_demo_data(shared=None, cache=tmp_path, download=False, smoke_views=3)
    assert kind == "smoke" and again == csvs and csvs[0].stat().st_mtime_ns == mtime


def test_offline_env_skips_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIEMBED_OFFLINE", "1")
    _, _, kind = resolve_demo_data(
        shared=None, cache=tmp_path, url="http://unused.invalid/x.zip", smoke_views=2
    )
    assert kind == "smoke"


def test_smoke_views_are_real_varied_photos(tmp_path: Path) -> None:
    csv_path = build_smoke_set(tmp_path / "smoke", views=6)
    rows = read_rows(csv_path)
    assert len(rows) == 6 * len(SMOKE_IMAGES)
    cat = [load_image(csv_path.parent / r["path"]) for r in rows if r["label"] == "smoke:cat"]
    assert len(cat) == 6
    sizes = {im.size for im in cat}
    assert len(sizes) > 1 and all(200 <= max(s) <= 400 for s in sizes)
    small = [np.asarray(im.resize((32, 32)), dtype=np.float32) for im in cat]
    assert min(float(np.abs(a - b).mean()) for i, a in enumerate(small) for b in small[i + 1 :]) > 1.0
    assert all(a.std() > 10 for a in small)  # real content, not flat fills
    # Deterministic: the same seed builds the same bytes.
    again = build_smoke_set(tmp_path / "smoke2", views=6)
    first = (csv_path.parent / rows[0]["path"]).read_bytes()
    assert (again.parent / rows[0]["path"]).read_bytes() == first
    with pytest.raises(ValueError):
        build_smoke_set(tmp_path / "smoke3", views=1)


def test_smoke_set_prepares(tmp_path: Path) -> None:
    csv_path = build_smoke_set(tmp_path / "smoke", views=2)
    m = prepare([csv_path], tmp_path / "ds", workers=1, size=64, progress=False)
    assert m["count"] == 2 * len(SMOKE_IMAGES) and len(m["labels"]) == len(SMOKE_IMAGES)
    assert m["skipped"] == []


def make_grocery_zip() -> tuple[bytes, dict[str, tuple[str, int]]]:
    """A miniature of the repository archive's layout, with real JPEG bytes."""
    top = f"GroceryStoreDataset-{GROCERY_COMMIT}/dataset"
    classes = {
        "Fruit/Apple/Granny-Smith": ("produce", 3),
        "Vegetables/Leek": ("produce", 2),
        "Packages/Juice/Bravo-Apple-Juice": ("packaged_goods", 2),
        "Packages/Milk/Arla-Lactose-Medium-Fat-Milk": ("packaged_goods", 1),  # a singleton: dropped
    }
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{top}/classes.csv", "Class Name (str),Class ID (int)\n")
        for cls, (_, n) in classes.items():
            name = cls.rsplit("/", 1)[-1]
            for i in range(n):
                img = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(img, format="JPEG")
                split = "train" if i else "test"
                zf.writestr(f"{top}/{split}/{cls}/{name}_{i:03d}.jpg", img.getvalue())
        zf.writestr(f"{top}/iconic-images-and-descriptions/Vegetables/Leek/Leek_Description.txt", "a leek")
    return buf.getvalue(), classes


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def grocery_server(tmp_path: Path):
    data, classes = make_grocery_zip()
    root = tmp_path / "www"
    root.mkdir()
    (root / f"{GROCERY_COMMIT}.zip").write_bytes(data)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{GROCERY_COMMIT}.zip", root, classes
    finally:
        server.shutdown()
        server.server_close()


def test_download_extract_index_and_checksum(tmp_path: Path, grocery_server) -> None:
    url, www, classes = grocery_server
    cache = tmp_path / "cache"
    csvs, desc, kind = resolve_demo_data(shared=None, cache=cache, url=url)
    assert kind == "download" and "downloaded" in desc
    rows = read_rows(csvs[0])
    labels = Counter((r["label"], r["domain"]) for r in rows)
    assert labels == {
        ("grocery:Granny-Smith", "produce"): 3,
        ("grocery:Leek", "produce"): 2,
        ("grocery:Bravo-Apple-Juice", "packaged_goods"): 2,
    }
    assert all((csvs[0].parent / r["path"]).is_file() for r in rows)
    folder = cache / "grocery_store"
    recorded = (folder / "archive.zip.sha256").read_text().split()[0]
    assert len(recorded) == 64

    # Later loads use the cache (the server is not needed) ...
    csvs2, desc2, kind2 = resolve_demo_data(shared=None, cache=cache, url=closed_port_url())
    assert kind2 == "download" and "cached" in desc2 and csvs2 == csvs
    # ... and a changed archive is caught against the recorded checksum.
    with open(folder / "archive.zip", "ab") as f:
        f.write(b"tampered")
    assert cached_grocery(folder) is None
    with pytest.raises(DownloadError, match="recorded checksum"):
        download_grocery(folder, url=url)
    # A fresh download whose bytes differ from the first one is refused too.
    (folder / "archive.zip").unlink()
    (www / f"{GROCERY_COMMIT}.zip").write_bytes(make_grocery_zip()[0] + b"\0")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_grocery(folder, url=url)
    assert not (folder / "archive.zip").exists()


def test_download_http_error_is_clean(tmp_path: Path, grocery_server) -> None:
    url, _, _ = grocery_server
    with pytest.raises(DownloadError, match="404"):
        download_grocery(tmp_path / "g", url=url.replace(".zip", "-nope.zip"))
    assert not (tmp_path / "g" / "archive.zip.part").exists()
