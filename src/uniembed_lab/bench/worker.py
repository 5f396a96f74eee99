"""One side of one measure, in its own process (``python -m uniembed_lab.bench.worker``).

A process per side gives each side its own peak RSS (ru_maxrss never goes down, so two sides sharing a
process would share a peak) and the same clean start: no warm caches left by the other side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
import time
import traceback
from pathlib import Path

from uniembed_lab.bench.common import BenchConfig, ProgressFile, set_threads, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fn", required=True, help="module:function that runs the side")
    ap.add_argument("--config", required=True, help="BenchConfig as JSON file")
    ap.add_argument("--result", required=True, help="where to write the result JSON")
    ap.add_argument("--progress", default=None, help="progress JSON file polled by the parent")
    a = ap.parse_args(argv)

    cfg = BenchConfig.from_dict(json.loads(Path(a.config).read_text()))
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    mod_name, fn_name = a.fn.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    progress = ProgressFile(a.progress)
    t0 = time.perf_counter()
    try:
        res = fn(cfg, progress)
    except Exception as e:  # noqa: BLE001 - reported to the parent as a failed side, with the traceback logged
        traceback.print_exc()
        write_json(a.result, {"error": f"{type(e).__name__}: {e}"})
        return 1
    from uniembed_lab.bench.sysinfo import machine_info

    res["side_seconds"] = time.perf_counter() - t0
    res["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["largest_child_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    res["threads"] = machine_info()["threads"]
    write_json(a.result, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
