"""Re-check a recipe with the project's own trainer (`uniembed.train.train`) on a library feature cache.

Runs the all-domains label split and the three leave-one-domain-out rotations exactly as `uniembed model`
does (train_domains = the other two, the left-out domain's labels all held out), and prints the trainer's
own validation numbers (head, raw, PCA-64) per domain. Note the trainer scores all held-out images in one
index (per-domain numbers average that domain's queries), a slightly harder index than universality.py's
per-domain index, so numbers can differ in the third decimal.

Example::

    python scripts/experiments/library_check.py --config configs/model.yaml \
        --features artifacts/features/mobilenetv2-<fingerprint>-<manifest>
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DOMAINS = ("packaged_goods", "produce", "toys_household_objects")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/model.yaml")
    ap.add_argument("--features", required=True, help="library feature dir (uniembed extract)")
    ap.add_argument("--out", default="/tmp/research/libruns")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    args = ap.parse_args()

    from uniembed.train import TrainConfig, train

    rows = {}
    t_all = time.time()
    for left_out in (None, *DOMAINS):
        cfg = TrainConfig.from_yaml(args.config).with_overrides(args.set)
        cfg.features = [args.features]
        cfg.progress = False
        tag = "all3" if left_out is None else f"lodo-{left_out}"
        cfg.out = str(Path(args.out) / tag)
        if left_out is not None:
            cfg.train_domains = [d for d in DOMAINS if d != left_out]
            cfg.split.unseen_domains_all_labels = True
        t0 = time.time()
        run = train(cfg, overwrite=True)
        s = json.loads((Path(run) / "summary.json").read_text())
        per = {"head": s["val"]["per_domain"], **{k: v["per_domain"] for k, v in s["baselines"].items()}}
        rows[tag] = {"per_domain": per, "seconds": round(time.time() - t0, 1)}
        doms = DOMAINS if left_out is None else (left_out,)
        for m, v in per.items():
            print(f"{tag:32s} {m:6s} " + " ".join(f"{d}={v[d]:.3f}" for d in doms if d in v), flush=True)
    rows["total_seconds"] = round(time.time() - t_all, 1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "library_check.json").write_text(json.dumps(rows, indent=2))
    print(f"total {rows['total_seconds']} s")


if __name__ == "__main__":
    main()
