"""The closing report of ``uniembed bench``: the tables on the console, then one
``RATIO <name> <project> <baseline> <ratio>`` line per measure on stdout (what scripts and CI read)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from uniembed_lab.bench.common import BenchConfig
from uniembed_lab.bench.measures import MEASURES


def fmt(x: float | None) -> str:
    """Numbers in RATIO lines: plain decimals (no exponent), 2 decimals from 1 up, 4 significant below."""
    if x is None:
        return "nan"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.4g}"


def fmt_mb(x: float | None) -> str:
    return f"{x:,.0f}" if x else "-"


def print_report(cfg: BenchConfig, results: dict[str, dict], wall_s: float, console: Console) -> int:
    """Tables (measures, profile) on ``console``; then the RATIO lines on stdout. Returns failures."""
    failures = _print_measures(cfg, results, console)
    prof = results.get("extract_profile")
    if prof and "error" not in prof:
        _print_profile(prof["profile"]["details"], console)
    elif prof:
        failures += 1
    console.print(f"bench wall time: {wall_s:.1f} s; results in {cfg.out}/")
    sys.stdout.flush()
    for name, r in results.items():
        if MEASURES[name].ratio and "error" not in r:
            print(
                f"RATIO {name} {fmt(r['project']['figure'])} {fmt(r['baseline']['figure'])} {r['ratio']:.2f}"
            )
    if "sharded_index" in results and "error" not in results["sharded_index"]:
        from uniembed_lab.bench.sharded import summary_line

        print(summary_line(results["sharded_index"]["checks"], cfg.k))
    dedup = results.get("dedup")
    if dedup and "error" not in dedup:
        d = dedup["project"]["details"]
        print(
            f"DEDUP vectors {d['n']} dim {d['dim']} threshold {d['threshold']:g} seconds {d['seconds']:.1f} "
            f"vectors_per_s {d['vectors_per_s']:.0f} groups {d['groups']}"
        )
    for name, r in results.items():
        if "error" in r:
            print(f"FAILED {name}: {r['error'].splitlines()[0]}")
    sys.stdout.flush()
    return failures


def _print_measures(cfg: BenchConfig, results: dict[str, dict], console: Console) -> int:
    """The table of measures with a ratio, then one note per measure; returns how many failed."""
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
        note = _measure_note(cfg, name, r)
        if note:
            notes.append(note)
        mem = f"{fmt_mb(p.get('peak_rss_mb'))} / {fmt_mb(b.get('peak_rss_mb'))}"
        mem += f"  (tree {fmt_mb(p.get('peak_tree_rss_mb'))} / {fmt_mb(b.get('peak_tree_rss_mb'))})"
        table.add_row(name, fmt(p["figure"]), fmt(b["figure"]), r["unit"], f"{r['ratio']:.2f}x", goal, mem)
    console.print(table)
    for n in notes:
        console.print("  " + n)
    return failures


def _measure_note(cfg: BenchConfig, name: str, r: dict) -> str | None:
    """The one line under the table that says what a measure's figure stands on."""
    p, b = r["project"], r["baseline"]
    if name == "search_ann":
        c = r["checks"]
        return (
            f"search_ann: recall@{cfg.k} {c[f'recall_at_{cfg.k}']:.4f} at nprobe {c['nprobe']} "
            f"({p['details']['index']}, {p['details']['vectors']:,} clustered vectors); at the project's "
            f"default nprobe rule ({p['details']['project_rule_nprobe']}): recall@{cfg.k} "
            f"{p['details'][f'project_rule_recall_at_{cfg.k}']:.4f}, "
            f"{p['details']['project_rule_qps']:.0f} queries/s"
        )
    if name == "search_exact":
        a = r["checks"]["top_k_agreement"]
        return (
            f"search_exact: identical top-{cfg.k} sets for {a['identical_top_k_sets']:.2%} of "
            f"{a['queries']} queries, {a['differ_beyond_ties']} differ beyond float ties"
        )
    if name == "extract":
        d = p["details"]
        return (
            f"extract: files -> features {d['seconds_extract_files']:.1f} s for {d['images']} images "
            f"(engine {d['engine']}); shards path: prepare {d['seconds_prepare']:.1f} s + extract "
            f"{d['seconds_extract']:.1f} s = {d['shards_path_images_per_s']:.1f} img/s "
            f"(extract alone {d['images_per_s_extract_only']:.1f} img/s)"
        )
    if name == "extract_ray":
        d, c = p["details"], r["checks"]
        same = "byte-identical" if c["features_identical"] else f"max |diff| {c['max_abs_diff']}"
        return (
            f"extract_ray: {d['images_per_s_per_worker']:.1f} images/s/worker ({d['workers']} workers x "
            f"{d['threads_per_worker']} thread(s), {d['engine']}); {d['images']} images in "
            f"{d['seconds']:.1f} s (local cluster start {d['cluster_start_s']:.1f} s apart); features {same} "
            "to the single process"
        )
    if name == "head_epoch":
        return (
            f"head_epoch: {p['details']['samples_per_epoch']} samples/epoch; baseline extrapolated from "
            f"{b['details']['timed_batches']} batches of {b['details']['batch_size']}"
        )
    return None


def _print_profile(d: dict, console: Console) -> None:
    """The extraction profile: every stage's ms/image, which side bounds, the model by batch size."""
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
            "model alone, images/s by batch size: " + ", ".join(f"{b}: {ips:.0f}" for b, ips in sweep.items())
        )
