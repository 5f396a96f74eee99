"""Bounded memory and work in the HTTP service: the admission gate (503 + Retry-After), uploads reduced
before the model sees them, and a real ``uniembed serve`` process under six concurrent 9000 x 9000 PNG
uploads (260 KB each on the wire, 243 MB each decoded) whose peak RSS must stay bounded and fall back.

Measured on a 2-core machine with the tiny model (baseline RSS ~0.73 GB): before the bound, peak 7.3 GB; with
``--max-concurrent 2`` and reduction at decode, peak ~1.3 GB and ~0.8 GB a few seconds later.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from uniembed.data.images import DEFAULT_MAX_PIXELS, load_image
from uniembed.serve.admission import Admission, ServerBusy, release_memory
from uniembed.serve.app import create_app
from uniembed.serve.index import build_index
from uniembed.serve.limits import BOMB_MEGAPIXELS, ServiceLimits, k_error, pixels_message
from uniembed_lab.scaffold.background import ServerProcess
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

UPLOADS = 6
#: Allowed growth of the server's RSS over its idle baseline during the burst, with two decodes at a time:
#: two full-size decodes are 2 x 243 MB; measured growth ~0.6 GB (before the bound: 6.7 GB).
PEAK_GROWTH_BOUND = 1.0 * 2**30
#: How close to the baseline RSS must come back once the burst is over (measured: +0.06 GB).
SETTLED_BOUND = 0.25 * 2**30


def big_png(width: int, height: int, bands: int = 9) -> bytes:
    """A valid RGB PNG of ``width`` x ``height`` pixels that is only a few hundred KB: a few gradient rows,
    each repeated with PNG's "Up" filter (an all-zero row), streamed through zlib without the full image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    x = np.arange(width) * 255 // max(width - 1, 1)
    repeat = b"\x02" + bytes(3 * width)
    comp = zlib.compressobj(9)
    parts = []
    for y in range(height):
        band = y * bands // height
        if y == 0 or band != (y - 1) * bands // height:
            row = np.stack([x, np.full(width, 40 + 20 * band), 255 - x], 1).astype(np.uint8)
            parts.append(comp.compress(b"\x00" + row.tobytes()))
        else:
            parts.append(comp.compress(repeat))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process: psutil when installed, else /proc/<pid>/status (Linux)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None
    return int(psutil.Process(pid).memory_info().rss)


class RssSampler:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------ unit: limits
def test_limits_messages() -> None:
    assert BOMB_MEGAPIXELS * 1e6 == DEFAULT_MAX_PIXELS
    assert k_error(1) is None and k_error(100) is None
    assert k_error(101) == "k must be between 1 and 100, got 101"
    assert k_error(0, max_k=20) == "k must be between 1 and 20, got 0"
    msg = pixels_message((9000, 9000), 40_000_000)
    assert msg == "image is 9000x9000 = 81.0 MP; this server accepts at most 40.0 MP (--max-pixels)"
    assert "decompression bomb" in pixels_message(None, 40_000_000)
    release_memory()  # a no-op without glibc, never an error


def test_admission_bounds_holders_and_waiters() -> None:
    """One slot, one place in the queue: the second caller waits (and gives up after wait_s), a third is
    refused at once; a freed slot goes to the next caller."""

    async def main() -> None:
        gate = Admission(slots=1, queue=1, wait_s=0.2)
        outcome: list[object] = []

        async def waiter(gate: Admission) -> None:
            try:
                async with gate.slot():
                    outcome.append("got a slot")
            except ServerBusy as e:
                outcome.append(e)

        async with gate.slot():
            assert gate.busy == 1
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter, gate)
                while gate.waiting == 0:
                    await anyio.sleep(0)
                with pytest.raises(ServerBusy, match="already waiting") as refused:
                    async with gate.slot():
                        pass
                assert refused.value.retry_after >= 1
        busy = outcome[0]
        assert isinstance(busy, ServerBusy) and "no free slot within 0.2 s" in busy.detail
        assert gate.busy == 0 and gate.waiting == 0

        patient = Admission(slots=1, queue=1, wait_s=60)
        outcome.clear()
        async with anyio.create_task_group() as tg:
            async with patient.slot():
                tg.start_soon(waiter, patient)
                while patient.waiting == 0:
                    await anyio.sleep(0)
        assert outcome == ["got a slot"] and patient.busy == 0

    anyio.run(main)


# ------------------------------------------------------------------------------------- in-process service
@pytest.fixture(scope="module")
def served_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("membound")
    model = make_tiny_model(root / "saved_model.pt")
    make_synthetic_images(root / "imgs", labels=3, per_label=4)
    build_index(model, [root / "imgs"], root / "idx", progress=False)
    return root / "idx", model


def gradient_png(size: tuple[int, int]) -> bytes:
    """A photo-sized PNG that compresses to a few hundred KB (smooth gradients in all three channels)."""
    bands = [Image.linear_gradient("L"), Image.radial_gradient("L"), Image.linear_gradient("L").rotate(90)]
    buf = io.BytesIO()
    Image.merge("RGB", [b.resize(size) for b in bands]).save(buf, format="PNG")
    return buf.getvalue()


def test_large_upload_reaches_the_model_reduced(
    served_index: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model gets the upload reduced per axis right after decoding, never the full-size pixels, and the
    embedding barely moves (the model squash-resizes to its own small input anyway)."""
    app = create_app(*served_index, warmup=False)
    data = gradient_png((3000, 2000))
    embedder = app.state.embedder
    seen: list[tuple[int, int]] = []
    real = embedder.embed_images

    def spy(images: list, *a: object, **k: object) -> np.ndarray:
        seen.extend(im.size for im in images)
        return real(images, *a, **k)

    monkeypatch.setattr(embedder, "embed_images", spy)
    r = TestClient(app).post("/embed", files={"image": ("big.png", data, "image/png")})
    assert r.status_code == 200, r.text
    assert seen == [(1500, 2000)]  # 3000 // 1024 = 2 across, 2000 // 1024 = 1 down (no side under 1024)
    full = real([load_image(data)])[0]
    assert float(np.dot(full, np.array(r.json()["embedding"]))) > 0.995


def test_busy_service_answers_503_with_retry_after(
    served_index: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slot, no queue: a second upload while the first is being embedded gets 503 + Retry-After at once,
    and the service answers normally again when the slot is free."""
    limits = ServiceLimits(max_concurrent=1, queue=0, queue_wait_s=0.0)
    app = create_app(*served_index, warmup=False, limits=limits)
    embedder = app.state.embedder
    inside, release = threading.Event(), threading.Event()
    real = embedder.embed_images

    def slow(images: list, *a: object, **k: object) -> np.ndarray:
        inside.set()
        assert release.wait(30)
        return real(images, *a, **k)

    monkeypatch.setattr(embedder, "embed_images", slow)
    upload = {"image": ("q.png", gradient_png((64, 48)), "image/png")}
    with TestClient(app) as c:
        first: list = []
        t = threading.Thread(target=lambda: first.append(c.post("/search", files=upload)))
        t.start()
        try:
            assert inside.wait(30)
            busy = c.post("/search", files=upload)
            assert busy.status_code == 503, busy.text
            assert int(busy.headers["retry-after"]) >= 1
            assert "server busy" in busy.json()["detail"]
            assert c.post("/embed", files=upload).status_code == 503
            assert c.get("/health").json()["busy"] == 1
        finally:
            release.set()
            t.join(30)
        assert first[0].status_code == 200, first[0].text
        assert c.post("/search", files=upload).status_code == 200


# ------------------------------------------------------------------------------ a real server under load


def test_six_concurrent_9000px_pngs_keep_rss_bounded(served_index: tuple[Path, Path]) -> None:
    """The pixel budget is raised to admit 81 MP, so every upload is really decoded; two at a time, each
    reduced at once: peak RSS stays within PEAK_GROWTH_BOUND of the idle server, answers are 200 (or 503 when
    the queue wait runs out; never another 5xx), and RSS falls back near the baseline afterwards."""
    index, model = served_index
    data = big_png(9000, 9000)
    assert len(data) < 400_000
    args = ["--max-pixels", "85", "--max-concurrent", "2", "--queue-timeout", "60"]
    with ServerProcess(index, model, extra_args=args) as srv:
        assert srv.proc is not None
        pid = srv.proc.pid
        baseline = rss_bytes(pid)

        def upload(i: int) -> httpx.Response:
            files = {"image": (f"big{i}.png", data, "image/png")}
            return httpx.post(srv.url + "/search", files=files, timeout=300)

        with RssSampler(pid) as sampler, ThreadPoolExecutor(UPLOADS) as pool:
            answers = list(pool.map(upload, range(UPLOADS)))
        settled = rss_bytes(pid)
        for _ in range(50):  # a short grace for the last responses' buffers
            if settled - baseline < SETTLED_BOUND:
                break
            time.sleep(0.1)
            settled = rss_bytes(pid)
        assert srv.proc.poll() is None, srv.log()

    codes = [r.status_code for r in answers]
    assert all(c in (200, 422, 503) for c in codes), [(r.status_code, r.text[:200]) for r in answers]
    assert codes.count(200) >= 2, codes
    gb = 2**30
    figures = (
        f"baseline {baseline / gb:.2f} GB, peak {sampler.peak / gb:.2f} GB, settled {settled / gb:.2f} GB"
    )
    print(f"\n{UPLOADS} x 9000x9000 PNG, 2 at a time: {figures}, answers {codes}")
    assert sampler.peak - baseline < PEAK_GROWTH_BOUND, figures
    assert settled - baseline < SETTLED_BOUND, figures
