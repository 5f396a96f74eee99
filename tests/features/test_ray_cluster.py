"""``uniembed extract --ray`` on a real two-node Ray cluster started by the test itself (127.0.0.1, one CPU
each): the cluster's features are the single-process features, byte for byte, with the broken photo skipped
and counted the same way, also when the worker node is killed mid-run. The cluster is stopped through the
processes the test started, and none of them is left running."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

if importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (pip install 'uniembed[cluster]')", allow_module_level=True)

RAY = Path(sys.executable).parent / "ray"
# A local test cluster: no auth token to share, no usage stats, and a dead node noticed within seconds.
ENV = dict(
    os.environ,
    RAY_AUTH_MODE="disabled",
    RAY_USAGE_STATS_ENABLED="0",
    RAY_health_check_period_ms="1000",
    RAY_health_check_failure_threshold="3",
)
BATCH = 4  # 4 batches a block: 16 photos a block, 6 blocks


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ports(*names: str) -> list[str]:
    """Every port a node opens, free ones: two nodes on one machine must not collide on Ray's defaults."""
    return [x for n in names for x in (f"--{n}-port", str(_port()))]


NODE_PORTS = (
    "node-manager",
    "object-manager",
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "runtime-env-agent",
)


@dataclass
class Node:
    proc: subprocess.Popen
    pids: set[int] = field(default_factory=set)

    def snapshot(self) -> None:
        """Remember the node's processes (ray start, GCS, raylet, the workers it spawned)."""
        import psutil

        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        self.pids |= {self.proc.pid, *(k.pid for k in kids)}

    def kill(self) -> None:
        """SIGKILL every process of the node the test knows of (a node dying, or the teardown)."""
        self.snapshot()
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def alive(self) -> list[int]:
        import psutil

        return [p for p in self.pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def _start(args: list[str], log: Path) -> Node:
    out = open(log, "w")  # noqa: SIM115 - the node writes to it until it is killed
    return Node(subprocess.Popen([str(RAY), "start", *args], stdout=out, stderr=subprocess.STDOUT, env=ENV))


def _wait_started(log: Path, timeout: float = 120) -> None:
    """Until ``ray start`` says the node runs (polling its log: a ``ray status`` per poll costs seconds)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.exists() and "Ray runtime started" in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(
        f"a Ray node did not start in {timeout:.0f} s: {log.read_text(errors='replace')[-2000:]}"
    )


@dataclass
class Cluster:
    address: str
    head: Node
    worker: Node
    temp: str


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head and a second node, one CPU each, no dashboard, their own ports and temp dir."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    port = _port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(200 << 20)]
    common += ["--disable-usage-stats", "--block"]
    head = _start(
        ["--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard", "false", *common]
        + _ports(*NODE_PORTS, "dashboard", "metrics-export"),
        Path(temp) / "head.log",
    )
    address = f"127.0.0.1:{port}"
    worker = None
    try:
        _wait_started(Path(temp) / "head.log")
        worker = _start(["--address", address, *common, *_ports(*NODE_PORTS)], Path(temp) / "worker.log")
        _wait_started(Path(temp) / "worker.log")
        head.snapshot()
        worker.snapshot()
        yield Cluster(address, head, worker, temp)
    finally:
        nodes = [n for n in (worker, head) if n is not None]
        for n in nodes:
            n.kill()
        time.sleep(1)
        left = [p for n in nodes for p in n.alive()]
        stray = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left and not stray, f"Ray processes left running: {left or stray}"


@pytest.fixture(scope="module")
def photos(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 real photos of 2 sets (40 each of coil100 and eth80) and one broken JPEG among them."""
    root = tmp_path_factory.mktemp("rayphotos")
    rows = []
    for sub in ("coil100", "eth80"):
        with open(shared_data / sub / "labels.csv", newline="") as f:
            for r in list(csv.DictReader(f))[::12][:40]:
                rows.append(
                    {"path": str(shared_data / sub / r["path"]), "label": r["label"], "domain": r["domain"]}
                )
    broken = root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    rows.insert(21, dict(rows[20], path=str(broken)))
    out = root / "labels.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "domain"])
        w.writeheader()
        w.writerows(rows)
    return out


def _extract(photos: Path, out: Path, *ray: str) -> list[str]:
    cmd = [sys.executable, "-m", "uniembed.cli", "extract", str(photos), "--out", str(out), "-q"]
    return cmd + ["--engine", "onnxruntime", "--batch-size", str(BATCH), *ray]


@pytest.fixture(scope="module")
def single(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    got = subprocess.run(_extract(photos, out), capture_output=True, text=True, env=ENV, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    return Path(got.stdout.splitlines()[0])


def _ray_args(c: Cluster) -> list[str]:
    # 0.6 CPU an actor: one actor per node; a decode task (0.25) fits beside it.
    return [
        "--ray",
        c.address,
        "--ray-actors",
        "2",
        "--ray-cpus-per-actor",
        "0.6",
        "--ray-cpus-per-task",
        "0.25",
    ]


def _same_cache(got: Path, want: Path) -> None:
    import json

    assert got.name == want.name  # same cache folder: same fingerprint, same data hash
    for name in ("features.npy", "meta.csv"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    info, ref = (json.loads((d / "info.json").read_text()) for d in (got, want))
    assert info["skipped"] == ref["skipped"] and sum(info["skipped_counts"].values()) == 1
    assert info["count"] == ref["count"] == 80 and "ray" in info and not (got / "parts").exists()


def test_cluster_run_survives_a_dead_node_and_matches_single_process(
    photos: Path, single: Path, cluster: Cluster, tmp_path: Path
) -> None:
    """One run (two runs would double this test's time): the worker node dies once the first block is back;
    Ray restarts its actor / retries its tasks on the head and the result is the single-process cache."""
    t0 = time.monotonic()
    run = subprocess.Popen(
        _extract(photos, tmp_path, *_ray_args(cluster)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        end = time.monotonic() + 240
        while (
            not list(tmp_path.glob("*/parts/block-*.npz")) and run.poll() is None and time.monotonic() < end
        ):
            time.sleep(0.05)
        assert run.poll() is None, (
            f"the run ended before the node could be killed: {run.communicate()[1][-3000:]}"
        )
        finished = len(list(tmp_path.glob("*/parts/block-*.npz")))
        print(f"first block back after {time.monotonic() - t0:.1f} s; worker node killed")
        cluster.worker.kill()
        out, err = run.communicate(timeout=300)
        print(f"run finished after {time.monotonic() - t0:.1f} s")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert 0 < finished < 6, finished
    assert run.returncode == 0, err[-3000:]
    assert "skipped=1" in out and "skipped images by reason:" in out
    _same_cache(Path(out.splitlines()[0]), single)
