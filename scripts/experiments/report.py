"""Render the universality results (JSON lines from ``universality.py``) as a markdown table.

Each row keeps the exact command that produced it, so docs/experiments.md can be regenerated and every
number re-checked. Later runs with the same name replace earlier ones.

Example::

    python scripts/experiments/report.py --results /tmp/research/results.jsonl > /tmp/research/table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="/tmp/research/results.jsonl")
    ap.add_argument("--group", action="store_true", help="insert a blank-name separator per feature set")
    args = ap.parse_args()
    rows: dict[str, dict] = {}
    for line in Path(args.results).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["name"]] = r
    # runs with --seen-photos add three columns: new photos of the training labels
    photos = any("seen_photos" in r for r in rows.values())
    extra_head = " new-photo pg | new-photo produce | new-photo toys |" if photos else ""
    print(
        "| variant | left-out pg | left-out produce | left-out toys | **left-out avg** "
        "| unseen-label pg | unseen-label produce | unseen-label toys |" + extra_head + " command |"
    )
    print("|---" * (9 + 3 * photos) + "|")
    for r in rows.values():
        lo, un = r["leftout"], r["unseen"]
        sp = r.get("seen_photos")
        extra = (
            (f" {sp['pg']:.3f} | {sp['produce']:.3f} | {sp['toys']:.3f} |" if sp else " - | - | - |")
            if photos
            else ""
        )
        print(
            f"| {r['name']} | {lo['pg']:.3f} | {lo['produce']:.3f} | {lo['toys']:.3f} "
            f"| **{r['leftout_avg']:.3f}** "
            f"| {un['pg']:.3f} | {un['produce']:.3f} | {un['toys']:.3f} |{extra} `{r['cmd']}` |"
        )


if __name__ == "__main__":
    main()
