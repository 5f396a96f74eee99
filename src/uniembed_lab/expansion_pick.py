"""Which alpha-QE / DBA setting goes on by default, and the report of `python -m uniembed_lab.expansion_eval`.

The decision rule (a gain on the mean over domains that survives holding each domain out of the choice) and
report.md / report.json / per_domain.png, apart from the measuring in ``expansion_eval``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: A setting goes on by default only if picking it this way also gains this much mP@5 on held-out domains.
MIN_GAIN = 0.005


@dataclass
class Pick:
    """The decision for one embedding. ``held_out``: for each domain, the setting the other domains' mean
    picks and that domain's gain with it -- an estimate of the rule's gain free of the winner's curse."""

    chosen: str
    best: str
    gain: float
    held_out_gain: float
    held_out: dict[str, tuple[str, float]]


def _best(results: dict, domains: list[str], variant: str) -> tuple[str, float]:
    means = {s: float(np.mean([r[variant][d] for d in domains])) for s, r in results.items()}
    best = max((s for s in means if s != "off"), key=lambda s: (means[s], s))
    return best, means[best] - means["off"]


def choose(results: dict[str, dict[str, dict[str, float]]], variant: str = "new") -> Pick:
    """The best setting on the mean over domains; on by default only when it gains on the mean and the
    same rule, applied with each domain held out of the choice, gains at least MIN_GAIN on those domains."""
    doms = list(results["off"][variant])
    best, gain = _best(results, doms, variant)
    held = {}
    for d in doms:
        s, g = _best(results, [o for o in doms if o != d], variant) if len(doms) > 1 else ("off", 0.0)
        s = s if g > 0 else "off"
        held[d] = (s, results[s][variant][d] - results["off"][variant][d])
    held_gain = float(np.mean([g for _, g in held.values()]))
    chosen = best if gain > 0 and held_gain >= MIN_GAIN else "off"
    return Pick(chosen, best, gain, held_gain, held)


LABELS = {
    "adapted": "default index embedding (`uniembed index` without --model: pcaw256, fitted without labels)",
    "model": "trained 64-d GUIE model, leave-one-domain-out (each domain scored by a run that never saw it)",
}


def _mean(r: dict[str, float]) -> float:
    return float(np.mean(list(r.values())))


def _per_domain_rows(results: dict, best: str) -> list[str]:
    """Markdown rows: without / with (the best setting) / delta per domain, for both query variants."""
    doms = list(results["off"]["new"])
    head = "| | mean | " + " | ".join(d.split("_")[0] for d in doms) + " |"
    lines = [head, "|---" * (len(doms) + 2) + "|"]
    off = results["off"]["new"]
    rows = [("off", off)]
    for var, what in (("new", "new image"), ("mlt", "more like this")):
        r = results[best][var]
        rows += [(f"{best} ({what})", r), (f"delta ({what})", {d: r[d] - off[d] for d in doms})]
    for name, r in rows:
        fmt = "{:+.3f}" if name.startswith("delta") else "{:.3f}"
        lines.append(
            f"| {name} | {fmt.format(_mean(r))} | " + " | ".join(fmt.format(r[d]) for d in doms) + " |"
        )
    return lines


def _grid_rows(results: dict) -> list[str]:
    off_new = _mean(results["off"]["new"])
    lines = [
        "| setting | mean mP@5 (new image) | delta | mean (more like this) | delta | domains gaining |",
        "|---|---|---|---|---|---|",
    ]
    order = sorted(results, key=lambda s: -_mean(results[s]["new"]))
    for s in order:
        r = results[s]
        gains = sum(r["new"][d] > results["off"]["new"][d] for d in r["new"])
        lines.append(
            f"| {s} | {_mean(r['new']):.3f} | {_mean(r['new']) - off_new:+.3f} | "
            f"{_mean(r['mlt']):.3f} | {_mean(r['mlt']) - off_new:+.3f} | {gains}/{len(r['new'])} |"
        )
    return lines


def plot(results: dict, picks: dict[str, Pick], path: Path) -> None:
    """Per-domain bars of the mP@5 gain of each embedding's best setting (new-image queries) over off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from uniembed.core.fsutil import atomic_path

    doms = list(next(iter(results.values()))["off"]["new"])
    xs, width = np.arange(len(doms) + 1), 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (emb, res) in enumerate(results.items()):
        pk, off = picks[emb], res["off"]["new"]
        gains = [res[pk.best]["new"][d] - off[d] for d in doms]
        label = f"{emb}: {pk.best} (default {pk.chosen})"
        ax.bar(xs + (i - (len(results) - 1) / 2) * width, [np.mean(gains), *gains], width, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(xs, ["MEAN"] + [d.split("_")[0] for d in doms], rotation=30)
    ax.set_ylabel("mP@5 gain over off (merged index, leave-one-out)")
    ax.set_title("alpha-QE + DBA: per-domain gain of the best setting on the mean", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


HEADER = (
    "# alpha-QE and DBA, measured per domain\n\n"
    "Command: `python -m uniembed_lab.expansion_eval` ({minutes:.1f} min). Merged index of every shared "
    "image, each domain's images as queries (leave-one-out), GUIE mP@5. "
    "'new image': the query's raw vector against a database augmented without it (picks the defaults); "
    "'more like this': an indexed item's stored vector as the query. Grid: n in {{1,2,3,5,10}}, alpha in "
    "{{0,1,3}}; 'both' = DBA and QE with the same n and alpha.\n"
)


def write_outputs(results: dict, picks: dict[str, Pick], out: Path, seconds: float) -> None:
    """report.md (per-domain table + whole grid per embedding), report.json and per_domain.png."""
    from uniembed.core.fsutil import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    lines = [HEADER.format(minutes=seconds / 60)]
    for emb, res in results.items():
        pk = picks[emb]
        held = ", ".join(f"{d.split('_')[0]} {g:+.3f} ({s})" for d, (s, g) in pk.held_out.items())
        lines += [
            f"## {LABELS.get(emb, emb)}\n\nBest on the mean: {pk.best} ({pk.gain:+.3f}). Held-out-domain "
            f"check of that rule (each domain's gain with the setting the other domains pick): mean "
            f"{pk.held_out_gain:+.3f}: {held}. **Default: {pk.chosen}** (on only if both gain, the held-out "
            f"one by >= {MIN_GAIN}).\n",
            *_per_domain_rows(res, pk.best),
            "\n<details><summary>whole grid</summary>\n",
            *_grid_rows(res),
            "\n</details>\n",
        ]
    atomic_write_text(out / "report.md", "\n".join([*lines, "![per domain](per_domain.png)", ""]))
    payload = {"results": results, "chosen": {e: p.chosen for e, p in picks.items()}, "seconds": seconds}
    payload["picks"] = {e: asdict(p) for e, p in picks.items()}
    atomic_write_text(out / "report.json", json.dumps(payload, indent=1))
    plot(results, picks, out / "per_domain.png")
