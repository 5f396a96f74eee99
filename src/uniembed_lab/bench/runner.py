"""``uniembed bench``: every measure side by side with its baseline, in the same run.

Each side of each measure runs in its own process; this process draws progress with rich, samples the
side's memory (its whole process tree, DataLoader workers included), collects the results, writes
``<out>/<name>.json`` and prints one ``RATIO <name> <project> <baseline> <ratio>`` line per measure at the
end (bench/report.py). The measures themselves are listed in bench/measures.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from uniembed_lab.bench.common import BenchConfig, write_json
from uniembed_lab.bench.measures import MEASURES, BenchError, Measure, resolve_names
from uniembed_lab.bench.report import fmt, fmt_mb, print_report
from uniembed_lab.bench.sysinfo import tree_rss_mb

__all__ = ["MEASURES", "BenchError", "fmt", "print_report", "resolve_names", "run_bench"]


def _run_side(cfg: BenchConfig, name: str, side: str, fn: str, progress: Progress, console: Console) -> dict:
    """Run one side in a subprocess; returns its result plus wall time and memory figures."""
    tmp = cfg.work_dir / "sides"
    tmp.mkdir(parents=True, exist_ok=True)
    cfg_path, res_path, prog_path = (
        tmp / f"{name}-{side}.{s}.json" for s in ("config", "result", "progress")
    )
    for p in (res_path, prog_path):
        p.unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    log_dir = Path(cfg.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{side}.log"
    env = dict(os.environ)
    # Same thread count for every library of every side (BLAS under numpy included).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(cfg.threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, "-m", "uniembed_lab.bench.worker", "--fn", fn, "--config", str(cfg_path)]
    cmd += ["--result", str(res_path), "--progress", str(prog_path)]
    timeout = cfg.extra.get("timeout_s") or MEASURES[name].timeout_s["quick" if cfg.quick else "full"]
    task = progress.add_task(f"{name} · {side}", total=None, rss="")
    t0 = time.perf_counter()
    peak_tree = 0.0
    rusage = None
    rc = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        last_sample = 0.0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                rc, rusage = os.waitstatus_to_exitcode(status), ru
                proc.returncode = rc
                break
            now = time.perf_counter()
            if now - last_sample >= 0.25:
                last_sample = now
                peak_tree = max(peak_tree, tree_rss_mb(proc.pid))
                try:
                    pr = json.loads(prog_path.read_text())
                    progress.update(
                        task,
                        total=pr["total"] or None,
                        completed=pr["done"],
                        description=f"{name} · {side}: {pr['desc']}",
                        rss=f"{peak_tree:,.0f} MB",
                    )
                except (OSError, ValueError, KeyError):
                    progress.update(task, rss=f"{peak_tree:,.0f} MB")
            if now - t0 > timeout:
                proc.kill()
                proc.wait()
                rc = -9
                break
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    progress.update(task, visible=False)
    if rc == -9:
        return {"error": f"timed out after {timeout} s (log: {log_path})", "wall_s": wall}
    try:
        res = json.loads(res_path.read_text())
    except (OSError, ValueError):
        tail = log_path.read_text()[-2000:] if log_path.exists() else ""
        res = {"error": f"side exited with code {rc} and no result; log {log_path}:\n{tail}"}
    res["wall_s"] = wall
    res["exit_code"] = rc
    res["peak_rss_mb"] = rusage.ru_maxrss / 1024 if rusage else None  # the side's largest process
    res["peak_tree_rss_mb"] = peak_tree  # sampled sum over the side's process tree (upper bound)
    res["log"] = str(log_path)
    if "error" in res:
        console.print(f"[red]{name} · {side} failed:[/] {res['error'].splitlines()[0]}  (log: {log_path})")
    else:
        fig = f"{fmt(res['figure'])} {res.get('unit', '')}" if res.get("figure") is not None else "done"
        console.print(
            f"[green]✓[/] {name} · {side}: {fig} in {wall:.1f} s, peak RSS {fmt_mb(res['peak_rss_mb'])} MB "
            f"(tree {fmt_mb(peak_tree)} MB)"
        )
    return res


def run_bench(cfg: BenchConfig, names: list[str], console: Console | None = None) -> dict[str, dict]:
    """Run the named measures; write their JSON files; return {name: result}."""
    from uniembed_lab.bench.sysinfo import machine_info

    console = console or Console(stderr=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        torch.set_num_threads(cfg.threads)  # so machine_info reports the threads the sides use
    except ImportError:  # pragma: no cover
        pass
    machine = machine_info()
    machine["bench_threads"] = cfg.threads
    results: dict[str, dict] = {}
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("peak {task.fields[rss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        for name in names:
            m = MEASURES[name]
            sides: dict[str, dict] = {}
            for side, fn in m.sides:
                sides[side] = _run_side(cfg, name, side, fn, progress, console)
                if "error" in sides[side]:
                    break
            results[name] = _finish(cfg, m, sides, machine)
            _write(cfg, m, results[name])
    return results


def _finish(cfg: BenchConfig, m: Measure, sides: dict[str, dict], machine: dict) -> dict:
    r: dict = {
        "name": m.name,
        "what": m.what,
        "quick": cfg.quick,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine,
        "config": cfg.to_dict(),
        **sides,
    }
    errors = {s: v["error"] for s, v in sides.items() if "error" in v}
    if errors or len(sides) < len(m.sides):
        r["error"] = "; ".join(f"{s}: {e.splitlines()[0]}" for s, e in errors.items()) or "a side did not run"
        return r
    if m.ratio:
        p, b = sides["project"]["figure"], sides["baseline"]["figure"]
        r["ratio"] = (p / b) if m.higher_is_better else (b / p)
        r["ratio_definition"] = (
            "project / baseline (higher is better)" if m.higher_is_better else "baseline / project (time)"
        )
        r["unit"] = sides["project"]["unit"]
    if m.extra_check:
        r["checks"] = m.extra_check(cfg, r)
    if m.goal:
        r["goal"] = m.goal
        met = m.goal_check(r) if m.goal_check else None
        # Goals are set for the full-size inputs; quick runs only show that the code works.
        r["goal_met"] = met if not cfg.quick else None
        r["goal_met_on_this_input"] = met
    return r


def _write(cfg: BenchConfig, m: Measure, r: dict) -> None:
    out = Path(cfg.out)
    if m.name == "extract_profile" and "profile" in r and "details" in r["profile"]:
        payload = dict(r)
        payload.update(r["profile"]["details"])
        write_json(out / "extract_profile.json", payload)
    else:
        write_json(out / f"{m.name}.json", r)
