"""Bounded soak of the real service: several clients send good and bad uploads while ``uniembed index --add``
keeps extending the same index, for a fixed time.

Why: single requests and short load tests do not show slow leaks, latency creep, or what happens when the
index folder is swapped under a running server. The server loads the index once at start (it does not
reload), so the soak checks: every request got a clean answer (200, a 4xx with a reason, or 503 when busy; no
other 5xx, no timeout, no dropped connection, server alive); the server's RSS stays under a bound; the index
on disk ends consistent (vectors == items == index.json count == what the ``--add`` runs put in, `uniembed
search` finds the newest image, a restarted server serves them all).

``python -m uniembed_lab.soak --minutes 10`` writes artifacts/soak/report.json and report.png (RSS and p50/p99
latency per interval) and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniembed_lab.fuzz import classify_response
from uniembed_lab.image_mutations import set_dimensions
from uniembed_lab.soak_report import plot, print_report, summarise

#: Request mix (weights): mostly real photos, the rest every kind of bad upload, plus thumbnail fetches.
MIX = {
    "good": 50,
    "truncated": 10,
    "garbage": 8,
    "empty": 5,
    "oversized": 3,
    "forged": 8,
    "big": 4,
    "thumb": 12,
}
#: Bad kinds for which a 200 is a fine answer too (a cut JPEG may still decode; a big photo may fit).
MAY_DECODE = {"truncated", "big"}
MAX_UPLOAD_MB = 2.0
INITIAL_IMAGES = 40


@dataclass
class SoakConfig:
    """How long and how hard; ``max_rss_mb`` is the server RSS bound the soak asserts."""

    minutes: float = 10.0
    clients: int = 4
    add_batch: int = 20
    interval_s: float = 10.0
    max_rss_mb: float = 2048.0
    timeout_s: float = 60.0
    seed: int = 0
    out: Path = Path("artifacts/soak")


@dataclass
class Record:
    """One request: when (s since the start), what, how long, and how it was answered."""

    t: float
    kind: str
    latency: float
    status: int
    outcome: str
    cls: str
    detail: str = ""


@dataclass
class SoakState:
    """What the threads share: request records, RSS samples, add runs, the index's expected contents."""

    t0: float = field(default_factory=time.monotonic)
    records: list[Record] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)
    adds: list[dict[str, Any]] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def photo_pool() -> list[dict[str, str]]:
    """Real photos (path,label,domain; absolute paths) from grocery_store and coil100, interleaved; synthetic
    images when ../shared/data is absent."""
    from uniembed.core.paths import shared_data_dir

    shared = shared_data_dir()
    if shared is None:
        import tempfile

        from uniembed_lab.scaffold.tiny_model import make_synthetic_images

        imgs = make_synthetic_images(Path(tempfile.mkdtemp(prefix="soak-imgs-")), labels=20, per_label=40)
        return [{"path": str(p), "label": p.parent.name, "domain": "synthetic"} for p in imgs]
    pools = []
    for sub in ("grocery_store", "coil100"):
        with open(shared / sub / "labels.csv", newline="") as f:
            pools.append([{**r, "path": str(shared / sub / r["path"])} for r in csv.DictReader(f)])
    return [r for pair in zip(*pools, strict=False) for r in pair]


def path_key(p: str) -> str:
    """The last three path parts: matches an item whether the index stores its path absolute or relative."""
    return "/".join(Path(p).parts[-3:])


def make_payloads(photos: list[dict[str, str]], rng: np.random.Generator) -> dict[str, Any]:
    """Good photo bodies (read once, reused) and the fixed bad ones."""
    from PIL import Image

    good = [Path(r["path"]).read_bytes() for r in photos[:300]]
    buf = io.BytesIO()
    Image.new("RGB", (3000, 3000), (120, 60, 200)).save(buf, format="PNG")
    return {
        "good": good,
        "big": buf.getvalue(),
        "forged": [set_dimensions(g, 65535, 65535) for g in good[:20]],
        "oversized": b"\xff\xd8\xff\xe0" + rng.bytes(int((MAX_UPLOAD_MB + 0.5) * 2**20)),
    }


def one_request(c: Any, kind: str, payloads: dict[str, Any], rng: np.random.Generator) -> tuple[int, str]:
    """Send one request of ``kind``; (status, body text)."""
    good = payloads["good"][int(rng.integers(len(payloads["good"])))]
    if kind == "thumb":
        r = c.get(f"/thumb/{int(rng.integers(INITIAL_IMAGES))}")
        return r.status_code, "" if r.status_code == 200 else r.text
    body = {
        "good": good,
        "truncated": good[: int(rng.integers(10, max(11, len(good) - 10)))],
        "garbage": (b"\xff\xd8\xff" if rng.random() < 0.5 else b"") + rng.bytes(int(rng.integers(1, 50_000))),
        "empty": b"",
        "oversized": payloads["oversized"],
        "forged": payloads["forged"][int(rng.integers(len(payloads["forged"])))],
        "big": payloads["big"],
    }[kind]
    r = c.post("/search", files={"image": ("q", body, "application/octet-stream")}, data={"k": "5"})
    return r.status_code, r.text


def judge(kind: str, status: int, text: str) -> tuple[str, str, str]:
    """(outcome, class, detail) of an answer: as the fuzz classifies it, plus good requests must succeed and
    bad uploads that cannot decode must not."""
    o = classify_response(status, text)
    if o.kind == "clean" and kind in ("good", "thumb"):
        return "failure", f"good request rejected: {o.cls}", o.detail
    if o.kind == "ok" and kind not in ("good", "thumb", *MAY_DECODE):
        return "failure", f"bad upload accepted ({kind})", ""
    return o.kind, o.cls, o.detail


def lost_answer(kind: str, e: Exception) -> tuple[str, str, str]:
    """(outcome, class, detail) of a request that got no answer: always a failure. The server reads and drops
    a refused body before its 413, so even an oversized upload on a keep-alive connection gets its answer."""
    what = "lost 413" if kind == "oversized" else "connection"
    return "failure", f"{what}: {type(e).__name__}", str(e)[:200]


def client_loop(
    url: str, worker: int, deadline: float, payloads: dict, state: SoakState, cfg: SoakConfig
) -> None:
    """One client: draw a kind from MIX, send it, judge the answer, until the deadline."""
    import httpx

    rng = np.random.default_rng(cfg.seed * 1000 + worker)
    kinds, p = list(MIX), np.array(list(MIX.values()), dtype=float) / sum(MIX.values())
    with httpx.Client(base_url=url, timeout=cfg.timeout_s) as c:
        while time.monotonic() < deadline:
            kind = kinds[int(rng.choice(len(kinds), p=p))]
            t0 = time.monotonic()
            try:
                status, text = one_request(c, kind, payloads, rng)
                outcome, cls, detail = judge(kind, status, text)
            except httpx.TimeoutException as e:
                status, outcome, cls, detail = 0, "failure", "timeout", str(e)[:200]
            except httpx.HTTPError as e:
                status, outcome, cls, detail = 0, *lost_answer(kind, e)
            rec = Record(t0 - state.t0, kind, time.monotonic() - t0, status, outcome, cls, detail)
            with state.lock:
                state.records.append(rec)


def uniembed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `uniembed` command line as a user would: a fresh process."""
    cmd = [sys.executable, "-m", "uniembed.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def adder_loop(
    work: Path, model: Path, pool: list[dict], deadline: float, state: SoakState, batch: int
) -> None:
    """`uniembed index --add` of the next ``batch`` new photos, one run after another, until the deadline; a
    successful run's photos join the expected contents (a failed one must leave the index as it was)."""
    from uniembed.data.sources import write_labels_csv

    start = INITIAL_IMAGES
    while time.monotonic() < deadline and start < len(pool):
        rows = pool[start : start + batch]
        csv_path = write_labels_csv(work / f"batch-{len(state.adds):04d}.csv", rows)
        t0 = time.monotonic()
        p = uniembed(
            "index",
            "--add",
            "--images",
            str(csv_path),
            "--out",
            str(work / "idx"),
            "--model",
            str(model),
            "--threads",
            "1",
        )
        run = {
            "t_end": time.monotonic() - state.t0,
            "seconds": round(time.monotonic() - t0, 2),
            "images": len(rows),
            "rc": p.returncode,
            "stderr": p.stderr[-400:] if p.returncode else "",
        }
        with state.lock:
            state.adds.append(run)
            state.expected += [r["path"] for r in rows] if p.returncode == 0 else []
        start += batch


def rss_loop(pid: int, stop: threading.Event, state: SoakState) -> None:
    """Sample the server's RSS once a second."""
    import psutil

    proc = psutil.Process(pid)
    while not stop.wait(1.0):
        try:
            state.rss.append((time.monotonic() - state.t0, proc.memory_info().rss / 2**20))
        except psutil.Error:
            return


def check_index(index_dir: Path, expected: list[str]) -> dict[str, Any]:
    """The index on disk after the soak: the counts agree, it holds exactly what the runs added, and `uniembed
    search` finds the newest image as its own nearest neighbour."""
    from uniembed.serve.index import ImageIndex

    ix = ImageIndex.load(index_dir)
    keys = [path_key(it["path"]) for it in ix.items]
    want = {path_key(p) for p in expected}
    p = uniembed("search", expected[-1], "--index", str(index_dir), "-k", "1", "--json", timeout=300)
    top = json.loads(p.stdout)[0]["results"][0] if p.returncode == 0 else {"path": ""}
    res = {
        "vectors": int(ix.index.ntotal),
        "items": len(ix.items),
        "index_json_count": int(ix.info["count"]),
        "expected": len(expected),
        "duplicates": len(keys) - len(set(keys)),
        "missing": sorted(want - set(keys))[:10],
        "unexpected": sorted(set(keys) - want)[:10],
        "search_newest_finds_itself": path_key(top["path"]) == path_key(expected[-1]),
    }
    same = res["vectors"] == res["items"] == res["index_json_count"] == res["expected"]
    exact = not (res["duplicates"] or res["missing"] or res["unexpected"])
    res["consistent"] = same and exact and res["search_newest_finds_itself"]
    return res


def soak_phase(
    work: Path, model: Path, pool: list[dict], state: SoakState, cfg: SoakConfig
) -> dict[str, Any]:
    """Start the server, run the clients, the adder and the RSS sampler until the deadline, stop it."""
    import httpx

    from uniembed_lab.scaffold.background import ServerProcess

    payloads = make_payloads(pool, np.random.default_rng(cfg.seed))
    with ServerProcess(work / "idx", model, extra_args=["--max-upload-mb", str(MAX_UPLOAD_MB)]) as srv:
        assert srv.proc is not None
        stop, state.t0 = threading.Event(), time.monotonic()
        deadline = state.t0 + cfg.minutes * 60
        workers = [
            threading.Thread(target=client_loop, args=(srv.url, i, deadline, payloads, state, cfg))
            for i in range(cfg.clients)
        ]
        workers.append(
            threading.Thread(target=adder_loop, args=(work, model, pool, deadline, state, cfg.add_batch))
        )
        sampler = threading.Thread(target=rss_loop, args=(srv.proc.pid, stop, state))
        for t in [sampler, *workers]:
            t.start()
        for t in workers:
            t.join()
        stop.set()
        alive = srv.proc.poll() is None
        count = httpx.get(srv.url + "/health", timeout=30).json()["count"] if alive else None
    return {"seconds": time.monotonic() - state.t0, "server_alive": alive, "server_count_during_soak": count}


def run_soak(cfg: SoakConfig, work: Path) -> dict[str, Any]:
    """Set up (tiny model, an index of the first photos), soak, check the index, write report.json + .png."""
    import httpx

    from uniembed.data.sources import write_labels_csv
    from uniembed.serve.index import build_index
    from uniembed_lab.scaffold.background import ServerProcess
    from uniembed_lab.scaffold.tiny_model import make_tiny_model

    model = make_tiny_model(work / "saved_model.pt")
    pool = photo_pool()
    build_index(
        model, [write_labels_csv(work / "initial.csv", pool[:INITIAL_IMAGES])], work / "idx", progress=False
    )
    state = SoakState(expected=[r["path"] for r in pool[:INITIAL_IMAGES]])
    extra = soak_phase(work, model, pool, state, cfg)
    with ServerProcess(work / "idx", model) as srv:
        extra["restarted_count"] = httpx.get(srv.url + "/health", timeout=30).json()["count"]
    extra["index"] = check_index(work / "idx", state.expected)
    rep = summarise(state, cfg, extra.pop("seconds"), extra)
    cfg.out.mkdir(parents=True, exist_ok=True)
    plot(rep, state, cfg.out / "report.png")
    (cfg.out / "report.json").write_text(json.dumps(rep, indent=2, default=str))
    return rep


def main(argv: list[str] | None = None) -> int:
    """``python -m uniembed_lab.soak``: exit 1 if any check failed."""
    import tempfile

    p = argparse.ArgumentParser(prog="python -m uniembed_lab.soak", description=__doc__.split("\n\n")[0])
    d = SoakConfig()
    p.add_argument("--minutes", type=float, default=d.minutes, help="soak duration (default 10)")
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent HTTP clients (default 4)")
    p.add_argument("--add-batch", type=int, default=d.add_batch, help="photos per index --add run")
    p.add_argument("--interval", type=float, default=d.interval_s, help="seconds per report interval")
    p.add_argument("--max-rss-mb", type=float, default=d.max_rss_mb, help="server RSS bound to assert")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=d.out, help="report.json and report.png go here")
    a = p.parse_args(argv)
    cfg = SoakConfig(a.minutes, a.clients, a.add_batch, a.interval, a.max_rss_mb, d.timeout_s, a.seed, a.out)
    with tempfile.TemporaryDirectory(prefix="uniembed-soak-") as work:
        rep = run_soak(cfg, Path(work))
    print_report(rep)
    print(f"report: {cfg.out / 'report.json'}, {cfg.out / 'report.png'}")
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
