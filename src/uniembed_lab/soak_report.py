"""The soak's report (``uniembed_lab.soak``): totals, outcomes by kind and class, latency percentiles,
server RSS, the ``index --add`` runs, the index check, pass/fail per check, and a PNG of RSS and latency."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from uniembed_lab.soak import SoakConfig, SoakState


def ms(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(xs) * 1000, q)), 1) if xs else None


def intervals(state: SoakState, seconds: float, step: float) -> list[dict[str, Any]]:
    """Requests, p50/p99 latency and peak server RSS per ``step`` seconds of the soak."""
    out = []
    for t in np.arange(0.0, seconds, step):
        lat = [r.latency for r in state.records if t <= r.t < t + step]
        rss = [m for s, m in state.rss if t <= s < t + step]
        out.append(
            {
                "t": float(t),
                "requests": len(lat),
                "p50_ms": ms(lat, 50),
                "p99_ms": ms(lat, 99),
                "rss_mb": round(max(rss), 1) if rss else None,
            }
        )
    return out


def summarise(state: SoakState, cfg: SoakConfig, seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    """The report: totals, outcomes by kind and class, latency, RSS, add runs, the index check, the checks."""
    recs, adds, rss = state.records, state.adds, [m for _, m in state.rss]
    lat, good = [r.latency for r in recs], [r.latency for r in recs if r.kind == "good"]
    rep = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "seconds": round(seconds, 1),
        "requests": len(recs),
        "throughput_rps": round(len(recs) / max(seconds, 1e-9), 1),
        "by_outcome": dict(Counter(r.outcome for r in recs)),
        "by_kind_and_class": dict(sorted(Counter(f"{r.kind} -> {r.outcome}: {r.cls}" for r in recs).items())),
        "latency_ms": {
            "p50": ms(lat, 50),
            "p99": ms(lat, 99),
            "max": ms(lat, 100),
            "good_p50": ms(good, 50),
            "good_p99": ms(good, 99),
        },
        "server_rss_mb": {
            "first": round(rss[0] if rss else 0, 1),
            "peak": round(max(rss, default=0), 1),
            "last": round(rss[-1] if rss else 0, 1),
            "bound": cfg.max_rss_mb,
        },
        "add_runs": {
            "runs": len(adds),
            "ok": sum(a["rc"] == 0 for a in adds),
            "images_added": sum(a["images"] for a in adds if a["rc"] == 0),
            "mean_seconds": round(float(np.mean([a["seconds"] for a in adds] or [0])), 1),
            "failed": [a for a in adds if a["rc"] != 0][:5],
        },
        "intervals": intervals(state, seconds, cfg.interval_s),
        "failures": [asdict(r) for r in recs if r.outcome == "failure"][:30],
        **extra,
    }
    rep["checks"] = {
        "no failed requests": rep["by_outcome"].get("failure", 0) == 0,
        "server alive at the end": rep["server_alive"],
        f"server RSS under {cfg.max_rss_mb:g} MiB": rep["server_rss_mb"]["peak"] < cfg.max_rss_mb,
        "every index --add run succeeded": rep["add_runs"]["ok"] == rep["add_runs"]["runs"] > 0,
        "index consistent on disk": rep["index"]["consistent"],
        "restarted server serves every item": rep["restarted_count"] == rep["index"]["expected"],
    }
    rep["warnings"] = []
    rep["passed"] = all(rep["checks"].values())
    return rep


def plot(rep: dict[str, Any], state: SoakState, path: Path) -> None:
    """Server RSS (every sample) and p50/p99 latency per interval, the --add runs' ends marked in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a.plot([t for t, _ in state.rss], [m for _, m in state.rss], lw=1)
    a.set_ylabel("server RSS (MiB)")
    a.set_ylim(bottom=0)
    iv = [x for x in rep["intervals"] if x["requests"]]
    for q in ("p99", "p50"):
        b.step([x["t"] for x in iv], [x[f"{q}_ms"] for x in iv], where="post", label=q)
    b.set_yscale("log")
    b.set_ylabel(f"latency per {rep['config']['interval_s']:g} s (ms)")
    b.set_xlabel("seconds")
    b.legend()
    for ax in (a, b):
        for run in state.adds:
            ax.axvline(run["t_end"], color="grey", lw=0.5, alpha=0.6)
    fig.suptitle(
        f"soak: {rep['requests']} requests, {rep['config']['clients']} clients, "
        f"{rep['add_runs']['runs']} index --add runs (grey: each run's end)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_report(rep: dict[str, Any]) -> None:
    lat, rss, add = rep["latency_ms"], rep["server_rss_mb"], rep["add_runs"]
    print(
        f"\nsoak: {rep['seconds']} s, {rep['config']['clients']} clients: {rep['requests']} requests "
        f"({rep['throughput_rps']}/s), outcomes {rep['by_outcome']}"
    )
    for name, n in rep["by_kind_and_class"].items():
        print(f"  {n:6d}  {name}")
    print(
        f"latency ms: p50 {lat['p50']}, p99 {lat['p99']}, max {lat['max']}; "
        f"good uploads p50 {lat['good_p50']}, p99 {lat['good_p99']}"
    )
    print(f"server RSS MiB: first {rss['first']:.0f}, peak {rss['peak']:.0f}, last {rss['last']:.0f}")
    print(
        f"index --add: {add['runs']} runs, {add['ok']} ok, {add['images_added']} images, "
        f"{add['mean_seconds']} s each; the running server kept {rep['server_count_during_soak']} items"
    )
    print(f"index after: {rep['index']}; a restarted server serves {rep['restarted_count']}")
    for r in rep["failures"][:10]:
        print(f"  FAILURE {r['kind']} {r['status']} {r['cls']}: {r['detail'][:160]}")
    for name, ok in rep["checks"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    for w in rep["warnings"]:
        print(f"  [warning] {w}")
