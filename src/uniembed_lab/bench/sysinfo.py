"""The machine a benchmark ran on, and its peak memory, read from the kernel.

Throughput figures mean nothing without the CPU, core count and library versions beside them, so every
result file carries this description.
"""

from __future__ import annotations

import os
import platform
import resource
from importlib import metadata
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The SIMD extensions that decide how fast matmuls and convolutions can go."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni")
                return [f for f in keep if f in flags]
    except OSError:
        pass
    return []


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_count() -> int:
    """Cores this process may actually use (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    """CPU model, usable cores, RAM, library versions and the thread counts the libraries will use."""
    info: dict = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores_usable": cpu_count(),
        "cores_host": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in ("torch", "torchvision", "onnxruntime", "faiss-cpu", "numpy", "pillow", "uniembed")
        },
        "env_threads": {
            k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }
    threads: dict = {}
    try:
        import torch

        threads["torch_intra_op"] = torch.get_num_threads()
        threads["torch_inter_op"] = torch.get_num_interop_threads()
    except Exception as e:  # noqa: BLE001 - a description must never fail the benchmark
        threads["torch_error"] = str(e)
    try:
        import faiss

        threads["faiss_omp"] = faiss.omp_get_max_threads()
    except Exception as e:  # noqa: BLE001
        threads["faiss_error"] = str(e)
    info["threads"] = threads
    try:
        la = os.getloadavg()
        info["load_avg_1_5_15"] = [round(x, 2) for x in la]
    except OSError:
        pass
    return info


def self_peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_children() -> dict[int, list[int]]:
    """ppid -> child pids, by scanning /proc (``/proc/<pid>/task/*/children`` is not always compiled in)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces; fields after it are fixed.
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) > 1:
            kids.setdefault(int(rest[1]), []).append(int(name))
    return kids


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(pid: int) -> float:
    """Current RSS of ``pid`` plus all its descendants (DataLoader workers count too).

    Pages shared between a parent and its forked workers are counted once per process, so this is an upper
    bound on the memory the tree really holds.
    """
    kids = _proc_children()
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss_kib(p)
        stack.extend(kids.get(p, []))
    return total / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS, so the peak of one phase can be read
    after another (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mb() -> float | None:
    """VmHWM of this process in MB: the peak since start or since the last ``reset_peak_rss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
