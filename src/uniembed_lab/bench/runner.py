"""``uniembed bench``: every measure side by side with its baseline, in the same run.

Each side of each measure runs in its own process; this process draws progress with rich, samples the
side's memory (its whole process tree, DataLoader workers included), collects the results, writes
``<out>/<name>.json`` and prints one ``RATIO <name> <project> <baseline> <ratio>`` line per measure at the
end.
``ratio`` is always how many times better the project is: throughput project/baseline, or for times
(head_epoch) baseline/project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from uniembed_lab.bench.common import BenchConfig, write_json
from uniembed_lab.bench.sysinfo import tree_rss_mb


@dataclass
class Measure:
    """A measure: its sides (run in order, each in a process), how to turn them into a ratio, its goal."""

    name: str
    sides: list[tuple[str, str]]  # (side, "module:function")
    what: str
    higher_is_better: bool = True
    goal: str = ""
    goal_check: Callable[[dict], bool] | None = None
    extra_check: Callable[[BenchConfig, dict], dict] | None = None
    ratio: bool = True
    timeout_s: dict = field(default_factory=lambda: {"quick": 300, "full": 1500})


def _extract_goal(r: dict) -> bool:
    return r["ratio"] >= 5.0 and r["project"]["figure"] >= 120.0


def _head_goal(r: dict) -> bool:
    return r["ratio"] >= 100.0


def _exact_check(cfg: BenchConfig, r: dict) -> dict:
    from uniembed_lab.bench.search import compare_topk

    return {"top_k_agreement": compare_topk(cfg.work_dir)}


def _exact_goal(r: dict) -> bool:
    return bool(r["checks"]["top_k_agreement"]["same_top_k"])


def _ann_check(cfg: BenchConfig, r: dict) -> dict:
    d = r["project"]["details"]
    return {f"recall_at_{cfg.k}": d[f"recall_at_{cfg.k}"], "nprobe": d["nprobe"], "goal": cfg.recall_goal}


def _ann_goal(r: dict) -> bool:
    c = r["checks"]
    rec = next(v for k, v in c.items() if k.startswith("recall_at_"))
    return rec >= c["goal"]


M = "uniembed_lab.bench"
MEASURES: dict[str, Measure] = {
    m.name: m
    for m in [
        Measure(
            "extract",
            [("baseline", f"{M}.extract:extract_baseline"), ("project", f"{M}.extract:extract_project")],
            "images/s from image files to MobileNetV2 features: prepare+extract vs torch eager loop",
            goal="ratio >= 5 and project >= 120 images/s",
            goal_check=_extract_goal,
        ),
        Measure(
            "extract_profile",
            [("profile", f"{M}.extract:extract_profile")],
            "where extraction time goes, stage by stage (ms/image)",
            ratio=False,
        ),
        Measure(
            "head_epoch",
            [("project", f"{M}.head:head_epoch_project"), ("baseline", f"{M}.head:head_epoch_baseline")],
            "seconds per head epoch: cached features vs re-running the frozen backbone",
            higher_is_better=False,
            goal="ratio >= 100",
            goal_check=_head_goal,
        ),
        Measure(
            "search_exact",
            [
                ("baseline", f"{M}.search:search_exact_baseline"),
                ("project", f"{M}.search:search_exact_project"),
            ],
            "queries/s, exact top-5: FAISS IndexFlatL2 vs numpy brute force",
            goal="same top-5 as numpy",
            goal_check=_exact_goal,
            extra_check=_exact_check,
        ),
        Measure(
            "search_ann",
            [("baseline", f"{M}.search:search_ann_baseline"), ("project", f"{M}.search:search_ann_project")],
            "queries/s: IVF index vs exact search over the same vectors",
            goal="recall@5 >= 0.95",
            goal_check=_ann_goal,
            extra_check=_ann_check,
        ),
    ]
}


def fmt(x: float | None) -> str:
    """Numbers in RATIO lines: plain decimals (no exponent), 2 decimals from 1 up, 4 significant below."""
    if x is None:
        return "nan"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.4g}"


class BenchError(RuntimeError):
    """Bad ``uniembed bench`` arguments."""


def resolve_names(only: list[str] | None) -> list[str]:
    """``--only`` values (repeatable, comma-separated allowed) -> measure names in run order."""
    if not only:
        return list(MEASURES)
    want = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in want if n not in MEASURES]
    if unknown:
        raise BenchError(f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    return [n for n in MEASURES if n in want]


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
            f"[green]✓[/] {name} · {side}: {fig} in {wall:.1f} s, peak RSS {_mb(res['peak_rss_mb'])} MB "
            f"(tree {_mb(peak_tree)} MB)"
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


def _mb(x: float | None) -> str:
    return f"{x:,.0f}" if x else "-"


def print_report(cfg: BenchConfig, results: dict[str, dict], wall_s: float, console: Console) -> int:
    """Tables (measures, profile) on ``console``; then the RATIO lines on stdout. Returns failures."""
    table = Table(title=f"uniembed bench ({'quick' if cfg.quick else 'full'}, {cfg.threads} threads)")
    for col in ("measure", "project", "baseline", "unit", "ratio", "goal", "peak RSS MB proj / base"):
        table.add_column(col, justify="right" if col in ("project", "baseline", "ratio") else "left")
    notes: list[str] = []
    failures = 0
    for name, r in results.items():
        if not MEASURES[name].ratio:
            continue
        if "error" in r:
            failures += 1
            table.add_row(name, "-", "-", "-", "-", f"[red]failed: {r['error'][:60]}[/]", "-")
            continue
        p, b = r["project"], r["baseline"]
        met = r.get("goal_met")
        mark = "n/a (quick)" if met is None else ("[green]met[/]" if met else "[red]MISSED[/]")
        goal = f"{r.get('goal', '')}: {mark}"
        if name == "search_ann":
            c = r["checks"]
            notes.append(
                f"search_ann: recall@{cfg.k} {c[f'recall_at_{cfg.k}']:.4f} at nprobe {c['nprobe']} "
                f"({p['details']['index']}, {p['details']['vectors']:,} clustered vectors); at the project's "
                f"default nprobe rule ({p['details']['project_rule_nprobe']}): recall@{cfg.k} "
                f"{p['details'][f'project_rule_recall_at_{cfg.k}']:.4f}, "
                f"{p['details']['project_rule_qps']:.0f} queries/s"
            )
        if name == "search_exact":
            a = r["checks"]["top_k_agreement"]
            notes.append(
                f"search_exact: identical top-{cfg.k} sets for {a['identical_top_k_sets']:.2%} of "
                f"{a['queries']} queries, {a['differ_beyond_ties']} differ beyond float ties"
            )
        if name == "extract":
            d = p["details"]
            notes.append(
                f"extract: files -> features {d['seconds_extract_files']:.1f} s for {d['images']} images "
                f"(engine {d['engine']}); shards path: prepare {d['seconds_prepare']:.1f} s + extract "
                f"{d['seconds_extract']:.1f} s = {d['shards_path_images_per_s']:.1f} img/s "
                f"(extract alone {d['images_per_s_extract_only']:.1f} img/s)"
            )
        if name == "head_epoch":
            notes.append(
                f"head_epoch: {p['details']['samples_per_epoch']} samples/epoch; baseline extrapolated from "
                f"{b['details']['timed_batches']} batches of {b['details']['batch_size']}"
            )
        mem = f"{_mb(p.get('peak_rss_mb'))} / {_mb(b.get('peak_rss_mb'))}"
        mem += f"  (tree {_mb(p.get('peak_tree_rss_mb'))} / {_mb(b.get('peak_tree_rss_mb'))})"
        table.add_row(name, fmt(p["figure"]), fmt(b["figure"]), r["unit"], f"{r['ratio']:.2f}x", goal, mem)
    console.print(table)
    for n in notes:
        console.print("  " + n)

    prof = results.get("extract_profile")
    if prof and "error" not in prof:
        d = prof["profile"]["details"]
        pt = Table(title=f"extraction profile ({d['summary']['images']} images, each stage timed alone)")
        pt.add_column("group")
        pt.add_column("stage")
        pt.add_column("ms/image", justify="right")
        for group, stages in d["stages"].items():
            for stage, v in stages.items():
                pt.add_row(group, stage, f"{v['ms_per_image']:.2f}")
        console.print(pt)
        s = d["summary"]
        console.print(
            f"worker (decode+resize) {s['extract_worker_ms_per_image']:.2f} ms/img, main (copy+model) "
            f"{s['extract_main_ms_per_image']:.2f} ms/img -> bound by {s['bound']}; ideal "
            f"{s['ideal_extract_images_per_s']:.0f} img/s; model "
            + (
                f"{s['model_gflop_per_image']:.2f} GFLOP/img at {s['model_gflop_per_s_achieved']:.1f} GFLOP/s"
                if s.get("model_gflop_per_image")
                else "FLOPs n/a"
            )
        )
        sweep = next((v for k, v in s.items() if k.endswith("_images_per_s_by_batch")), {})
        if sweep:
            console.print(
                "model alone, images/s by batch size: "
                + ", ".join(f"{b}: {ips:.0f}" for b, ips in sweep.items())
            )
    elif prof:
        failures += 1
    console.print(f"bench wall time: {wall_s:.1f} s; results in {cfg.out}/")
    sys.stdout.flush()
    for name, r in results.items():
        if MEASURES[name].ratio and "error" not in r:
            print(
                f"RATIO {name} {fmt(r['project']['figure'])} {fmt(r['baseline']['figure'])} {r['ratio']:.2f}"
            )
    for name, r in results.items():
        if "error" in r:
            print(f"FAILED {name}: {r['error'].splitlines()[0]}")
    sys.stdout.flush()
    return failures
