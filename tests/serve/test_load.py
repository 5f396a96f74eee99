"""Bounded load test on loopback: 500 /search requests from 8 concurrent clients against real uvicorn.

Prints p50/p99 latency and asserts zero errors. Uses the tiny model so it stays a few seconds; real photos
from ../shared/data are the queries when present (synthetic images otherwise).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from uniembed.core.paths import repo_root, shared_data_dir
from uniembed.serve.index import build_index
from uniembed_lab.scaffold.background import ServerProcess
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

REQUESTS = 500
CLIENTS = 8


def _queries(root: Path) -> list[tuple[str, bytes]]:
    shared = shared_data_dir()
    if shared is not None:
        import csv

        with open(shared / "grocery_store" / "labels.csv") as f:
            rows = list(csv.DictReader(f))[::400][:12]
        return [(Path(r["path"]).name, (shared / "grocery_store" / r["path"]).read_bytes()) for r in rows]
    return [(p.name, p.read_bytes()) for p in make_synthetic_images(root / "queries", labels=3, per_label=4)]


def test_500_requests_8_clients_zero_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = make_tiny_model(tmp_path / "saved_model.pt")
    make_synthetic_images(tmp_path / "imgs", labels=10, per_label=20)
    build_index(model, [tmp_path / "imgs"], tmp_path / "idx", progress=False)
    queries = _queries(tmp_path)

    with ServerProcess(tmp_path / "idx", model) as srv:

        def client(worker: int) -> list[tuple[float, int, str]]:
            out = []
            with httpx.Client(base_url=srv.url, timeout=30.0) as c:
                for i in range(worker, REQUESTS, CLIENTS):
                    name, data = queries[i % len(queries)]
                    t0 = time.perf_counter()
                    try:
                        r = c.post("/search", files={"image": (name, data, "image/jpeg")}, data={"k": "5"})
                        ok = r.status_code == 200 and len(r.json()["results"]) == 5
                        out.append((time.perf_counter() - t0, r.status_code, "" if ok else r.text[:200]))
                    except httpx.HTTPError as e:
                        out.append((time.perf_counter() - t0, 0, f"{type(e).__name__}: {e}"))
            return out

        t0 = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [x for part in pool.map(client, range(CLIENTS)) for x in part]
        wall = time.perf_counter() - t0
        assert srv.proc is not None and srv.proc.poll() is None, "server died under load"

    lat = np.array([r[0] for r in results]) * 1000
    errors = [r for r in results if r[2] or r[1] != 200]
    stats = {
        "requests": len(results),
        "clients": CLIENTS,
        "errors": len(errors),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "max_ms": round(float(lat.max()), 1),
        "throughput_rps": round(len(results) / wall, 1),
        "query_images": "shared grocery photos" if shared_data_dir() else "synthetic",
    }
    out = repo_root() / "artifacts" / "load_test.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stats, indent=2))
    with capsys.disabled():
        print(
            f"\nload test: {stats['requests']} requests, {CLIENTS} clients: p50 {stats['p50_ms']} ms, "
            f"p99 {stats['p99_ms']} ms, {stats['throughput_rps']} req/s, {stats['errors']} errors"
        )
    assert len(results) == REQUESTS
    assert not errors, errors[:3]
