"""Leave-one-domain-out over every domain of ../shared/data, merged index, method by method (research only).

The protocol of ``uniembed model`` (``uniembed.eval.lodo``): for each domain d, fit (PCA) or train (head) on
the other domains only, embed *every* image of every domain, and score d's images as queries against the
merged index of all images (leave-one-out: the query is removed; the other domains are distractors, as in
the UnED benchmark). The metric that picks a recipe is the mean over the left-out domains. ``adapt_*``
methods are the collection-adapted index: the projection is fitted without labels on all images, the
left-out domain's included (its labels never used).

Everything is the library's own code, so a row here is the figure ``uniembed model`` would report for the
same features: projections ``uniembed.models.projection``, scoring ``uniembed.eval.lodo.merged_mp5``, heads
trained by ``uniembed.train.train`` (the shipped recipe, ``--config``, with the method's overrides). What the
harness adds is the choice of feature blocks (``--feats``) and one JSON line per (features, method).

Methods (``--methods``, comma-separated):

- ``raw``: the features, L2-normalised;
- ``pca<D>`` / ``pcaw<D>@<power>``: projection fitted on the training domains (``pcaw<D>``: power 0.5);
- ``adapt_pca<D>`` / ``adapt_pcaw<D>@<power>``: fitted on every image, no labels;
- ``head[-<ArcFace w>-<similarity-distillation w>-<epochs>-<rank w>-<tau>[-rand]]``: the recipe of
  ``--config`` trained on the training domains; each given part overrides ``loss.margin_weight``,
  ``loss.distill_weight``, ``epochs``, ``loss.rank_weight``, ``loss.rank_temperature``; ``rand`` sets
  ``sampler: random`` (instead of anchor + neighbour batches). ``--set key=value`` applies to every head.

Inputs are library feature directories (``uniembed extract``):

    uniembed extract /tmp/rf/all.csv -b mobilenetv2 -p avg+stages_l2+colour --out /tmp/rf
    uniembed extract /tmp/rf/all.csv -b efficientnet_lite2 -p avg+stages_l2 --out /tmp/rf
    python scripts/experiments/lodo_merged.py --mnv2 /tmp/rf/mobilenetv2-... \
        --lite2 /tmp/rf/efficientnet_lite2-...

or any one feature directory used as it is (feature set name ``features``), e.g. the cache of ``make model``:

    python scripts/experiments/lodo_merged.py --features artifacts/work/features/<dir> --methods raw,pca64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from uniembed.eval.lodo import merged_mp5
from uniembed.features.store import load_features, write_feature_set
from uniembed.models.projection import fit_projection, l2n, parse_adapt_spec

# mobilenetv2 avg+stages_l2+colour: 96 | 160 | 320 | 1280 | colour 512 (each block L2, colour x sqrt2)
MNV2_BLOCKS = (96, 160, 320, 1280)
HEAD_KEYS = (
    "loss.margin_weight",
    "loss.distill_weight",
    "epochs",
    "loss.rank_weight",
    "loss.rank_temperature",
)


def load(fdir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(features float32, label names, domains, paths) of a feature directory."""
    fs, names, _ = load_features([fdir])
    return fs.float32(), np.asarray(names), np.asarray(fs.domains), list(fs.paths)


def feature_sets(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[str]]:
    """The named feature combinations of ``--feats`` and the rows' labels, domains and paths. A
    ``--features`` dir is used unchanged (heads train on it directly, as in ``uniembed model``)."""
    if args.features:
        x, labels, domains, paths = load(args.features)
        return {"features": x}, labels, domains, paths
    if not (args.mnv2 and args.lite2):
        raise SystemExit("give --features DIR, or both --mnv2 DIR and --lite2 DIR")
    xm, labels, domains, paths = load(args.mnv2)
    xl, _, _, paths_l = load(args.lite2)
    if paths != paths_l:
        raise SystemExit("feature sets not aligned: --mnv2 and --lite2 rows differ")
    mb = np.split(xm, np.cumsum(MNV2_BLOCKS), axis=1)
    lite_last = xl[:, -1280:]
    stages_m = l2n(np.concatenate(mb[:4], 1))
    feats = {
        "m_avg": lambda: l2n(mb[3]),
        "l_avg": lambda: l2n(lite_last),
        "join_avg": lambda: l2n(np.concatenate([l2n(mb[3]), l2n(lite_last)], 1)),
        "m_stg": lambda: stages_m,
        "l_stg": lambda: l2n(xl),
        "join_stg": lambda: l2n(np.concatenate([stages_m, l2n(xl)], 1)),
        "m_col": lambda: l2n(np.concatenate(mb, 1)),
        "join_avg_col": lambda: l2n(np.concatenate([l2n(mb[3]), l2n(lite_last), l2n(mb[4]) * 0.5], 1)),
        "join_avgstg": lambda: l2n(
            np.concatenate([l2n(mb[3]), l2n(lite_last), l2n(np.concatenate(mb[:3], 1)) * 0.7], 1)
        ),
    }
    unknown = [f for f in args.feats.split(",") if f not in feats]
    if unknown:
        raise SystemExit(f"unknown --feats {unknown}; known: {', '.join(feats)}")
    return {f: feats[f]() for f in args.feats.split(",")}, labels, domains, paths


def head_overrides(method: str) -> list[str]:
    """``head-<arc>-<kd>-<epochs>-<rank>-<tau>[-rand]`` -> TrainConfig ``key=value`` overrides."""
    parts = method.split("-")[1:]
    rand = bool(parts) and parts[-1] == "rand"
    values = parts[:-1] if rand else parts
    if len(values) > len(HEAD_KEYS):
        raise SystemExit(f"{method}: at most {len(HEAD_KEYS)} numbers ({', '.join(HEAD_KEYS)})")
    return [f"{k}={v}" for k, v in zip(HEAD_KEYS, values, strict=False)] + (
        ["sampler=random"] if rand else []
    )


class HeadTrainer:
    """Heads trained by the library's trainer on one feature combination (written once as a feature dir)."""

    def __init__(self, args: argparse.Namespace, fname: str, x: np.ndarray, labels, domains, paths):
        self.args, self.fname, self.x = args, fname, x
        self.work = Path(args.work)
        self.feature_dir: Path | None = Path(args.features) if args.features else None
        self._rows = (labels, domains, paths)

    def _features(self) -> Path:
        """The combination as a feature directory (float16 like every cache), written on first use."""
        if self.feature_dir is None:
            labels, domains, paths = self._rows
            names = sorted(set(labels.tolist()))
            ids = {n: i for i, n in enumerate(names)}
            meta = [
                {
                    "key": str(i),
                    "path": p,
                    "label": lab,
                    "label_id": ids[lab],
                    "domain": d,
                    "source": "harness",
                }
                for i, (p, lab, d) in enumerate(zip(paths, labels.tolist(), domains.tolist(), strict=True))
            ]
            info = {
                "backbone": f"harness:{self.fname}",
                "fingerprint": f"harness-{self.fname}",
                "pooling": "avg",
            }
            self.feature_dir = write_feature_set(
                self.work / "features" / self.fname, self.x, meta, info, names
            )
        return self.feature_dir

    def embed_without(self, method: str, left_out: str, train_domains: list[str]) -> np.ndarray:
        """Train ``method`` on ``train_domains`` (every label) and embed every row."""
        from uniembed.configs import config_path
        from uniembed.eval.evaluate import head_embeddings
        from uniembed.train import TrainConfig, load_head, train

        cfg = TrainConfig.from_yaml(config_path(self.args.config)).with_overrides(
            head_overrides(method) + list(self.args.set)
        )
        cfg.features = [str(self._features())]
        cfg.out = str(self.work / "runs" / self.fname / method / f"lodo-{left_out}")
        cfg.progress = False
        cfg.train_domains = train_domains
        cfg.split.val_fraction = 0.0
        run = train(cfg, overwrite=True)
        return head_embeddings(load_head(run)[0], self.x)


def embed(
    method: str, x: np.ndarray, train_rows: np.ndarray, heads: HeadTrainer, left_out: str, doms
) -> np.ndarray:
    """Every row's embedding by ``method`` fitted without the ``left_out`` domain (``train_rows``)."""
    if method == "raw":
        return l2n(x)
    if method.startswith("adapt_"):
        return fit_projection(x, parse_adapt_spec(method.removeprefix("adapt_"))).apply(x)
    if method.startswith("pca"):
        return fit_projection(x[train_rows], parse_adapt_spec(method)).apply(x)
    if method == "head" or method.startswith("head-"):
        return heads.embed_without(method, left_out, [d for d in doms if d != left_out])
    raise SystemExit(f"unknown method {method}")


def run_method(fname: str, method: str, x: np.ndarray, labels, domains, heads: HeadTrainer, args) -> dict:
    """One (features, method) row: mP@5 of every left-out domain and their mean, appended to --results."""
    doms = sorted(set(domains.tolist()))
    t0 = time.time()
    per = {}
    for d in doms:
        e = embed(method, x, domains != d, heads, d, doms)
        per[d] = merged_mp5(e, labels, domains, d)
        print(f"    {fname} {method} {d}: {per[d]:.3f} ({time.time() - t0:.0f}s)", flush=True)
    mean = float(np.mean(list(per.values())))
    row = {"feats": fname, "method": method, "mean": mean, "per": per, "s": time.time() - t0, "tag": args.tag}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(
        f"{fname:12s} {method:18s} mean {mean:.3f}  "
        + " ".join(f"{d[:6]}={v:.3f}" for d, v in per.items())
        + f"  ({row['s']:.0f}s)",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnv2", help="mobilenetv2 avg+stages_l2+colour feature dir (with --lite2)")
    ap.add_argument("--lite2", help="efficientnet_lite2 avg+stages_l2 feature dir, same images (with --mnv2)")
    ap.add_argument("--features", help="one feature dir, used as it is (feature set name: features)")
    ap.add_argument("--feats", default="m_avg,l_avg,join_avg,m_stg,join_stg,m_col")
    ap.add_argument("--methods", default="raw,pca64,pcaw64@0.5,adapt_pcaw64@0.5")
    ap.add_argument("--config", default="model", help="head recipe: a YAML file or a shipped config name")
    ap.add_argument("--set", action="append", default=[], help="recipe override key=value (repeatable)")
    ap.add_argument("--work", default="/tmp/rf/lodo_work", help="feature dirs and training runs of heads")
    ap.add_argument("--results", default="/tmp/rf/lodo_results.jsonl")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    feats, labels, domains, paths = feature_sets(args)
    for fname, x in feats.items():
        heads = HeadTrainer(args, fname, x, labels, domains, paths)
        for method in args.methods.split(","):
            run_method(fname, method, x, labels, domains, heads, args)


if __name__ == "__main__":
    main()
