"""Calibrate ``uniembed dedup``'s default threshold on real photos with made duplicates.

``python -m uniembed_lab.dedup_calibration [--out artifacts/dedup_calibration]``: picks originals spread over
every set of ../shared/data and writes 4 variants of each (JPEG re-encode at quality 40-70, 0.5x resize,
a 10% crop, a hue/saturation/brightness jitter), adds other real photos as distinct images, embeds all of
them with the default index embedding (``build_index`` without a model: pcaw256 on the ensemble backbone),
then scores thresholds:

- pairs: a pair is a true duplicate when both files are one original or its variants (or have identical
  bytes); every other pair is a false positive, including two real photos of the same object (coil100
  turntable views 30 degrees apart, vehicle2cam's two cameras, the same product shot twice): those are
  different photos, so a dedup tool must not drop one. Their share of the false positives is reported.
- predicted pairs are the pairs inside one group (connected components, what ``dedup`` reports), and
  separately the direct links (distance <= threshold).
- groups: a family (original + variants) is found when one group holds exactly its files.

The default is the largest threshold at which grouped pairs of *different* objects (different labels) stay
under ``1 - --min-precision`` (0.999) of the grouped pairs: dedup writes a list of files to delete, so
linking two different things costs more than a missed duplicate, while two photos of a rotationally
symmetric coil100 object 30 degrees apart are pixel-for-pixel near twins that a user would also call
duplicates. Strict precision (those counted as errors too) is reported beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from uniembed.core.fsutil import atomic_path, atomic_write_text
from uniembed.core.paths import repo_root, shared_data_dir

VARIANTS = ("jpeg", "resize", "crop", "recolour")
THRESHOLDS = np.round(np.arange(0.05, 1.201, 0.025), 3)


def _rows(shared: Path) -> dict[str, list[dict[str, str]]]:
    """labels.csv rows of every set, paths made absolute."""
    out = {}
    for sub in sorted(p for p in shared.iterdir() if (p / "labels.csv").is_file()):
        with open(sub / "labels.csv", newline="") as f:
            out[sub.name] = [{**r, "path": str(sub / r["path"])} for r in csv.DictReader(f)]
    return out


def pick(shared: Path, originals: int, distinct: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(originals, distinct others): spread evenly over the sets, disjoint, from distinct files."""
    rng = random.Random(seed)
    sets = _rows(shared)
    for rows in sets.values():
        rng.shuffle(rows)
    per_o = -(-originals // len(sets))
    chosen_o = [r | {"set": s} for s, rows in sets.items() for r in rows[:per_o]][:originals]
    per_d = -(-distinct // len(sets))
    chosen_d = [r | {"set": s} for s, rows in sets.items() for r in rows[per_o : per_o + per_d]]
    return chosen_o, chosen_d[:distinct]


def make_variant(src: Path, kind: str, dst: Path, rng: random.Random) -> None:
    """One made duplicate of ``src``: saved as JPEG quality 95 except the re-encode itself (40-70)."""
    from PIL import Image, ImageEnhance

    with Image.open(src) as im:
        im = im.convert("RGB")
    quality = 95
    if kind == "jpeg":
        quality = rng.randint(40, 70)
    elif kind == "resize":
        im = im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.LANCZOS)
    elif kind == "crop":  # 10% of each side's length, split at random between its two ends
        dx, dy = round(im.width * 0.1), round(im.height * 0.1)
        left, top = rng.randint(0, dx), rng.randint(0, dy)
        im = im.crop((left, top, im.width - (dx - left), im.height - (dy - top)))
    else:  # recolour: hue shift, saturation and brightness jitter
        hsv = np.asarray(im.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randint(-18, 18)) % 256
        im = Image.fromarray(hsv, "HSV").convert("RGB")
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
    im.save(dst, format="JPEG", quality=quality)


def build_set(out: Path, originals: int, distinct: int, seed: int) -> Path:
    """labels.csv (path,label,domain) + truth.csv (path, family, kind, set, label) of the calibration set."""
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data not found; set UNIEMBED_SHARED_DATA")
    rng = random.Random(seed)
    origs, others = pick(shared, originals, distinct, seed)
    vdir = out / "variants"
    vdir.mkdir(parents=True, exist_ok=True)
    truth = []
    for n, r in enumerate(origs):
        truth.append(
            {"path": r["path"], "family": n, "kind": "original", "set": r["set"], "label": r["label"]}
        )
        for kind in VARIANTS:
            dst = vdir / f"{n:04d}_{kind}.jpg"
            make_variant(Path(r["path"]), kind, dst, rng)
            truth.append({"path": str(dst), "family": n, "kind": kind, "set": r["set"], "label": r["label"]})
    for r in others:
        truth.append(
            {"path": r["path"], "family": -1, "kind": "distinct", "set": r["set"], "label": r["label"]}
        )
    for name, fields in (("truth.csv", list(truth[0])), ("labels.csv", ["path", "label", "domain"])):
        with atomic_path(out / name) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows([t | {"domain": t["set"]} for t in truth])
    return out / "labels.csv"


def truth_keys(truth: list[dict[str, str]], paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key, label, kind) per indexed row: rows with one key are true duplicates (a family, or files with
    identical bytes, which are duplicates whatever the sampling said)."""
    from uniembed.serve.dedup import exact_groups

    by_path = {t["path"]: t for t in truth}
    rows = [by_path[p] for p in paths]
    key = np.array([int(t["family"]) if int(t["family"]) >= 0 else 10**6 + i for i, t in enumerate(rows)])
    for g in exact_groups(paths)[0]:
        key[np.isin(key, key[g])] = key[g[0]]
    return key, np.array([t["label"] for t in rows]), np.array([t["kind"] for t in rows])


def _pairs_within(groups: list[list[int]], attr: np.ndarray) -> int:
    """Pairs inside the groups whose two members share ``attr``."""
    total = 0
    for g in groups:
        _, counts = np.unique(attr[g], return_counts=True)
        total += int((counts * (counts - 1) // 2).sum())
    return total


def score(vectors: np.ndarray, key: np.ndarray, label: np.ndarray, kind: np.ndarray) -> list[dict[str, Any]]:
    """Pair and group precision/recall at every threshold of THRESHOLDS."""
    from uniembed.serve.dedup import components, range_pairs

    rows, cols, dist = range_pairs(vectors, float(THRESHOLDS.max()))
    _, kc = np.unique(key, return_counts=True)
    true_pairs = int((kc * (kc - 1) // 2).sum())
    families = {int(k): set(np.flatnonzero(key == k).tolist()) for k in np.unique(key[kind != "distinct"])}
    out = []
    for t in THRESHOLDS:
        m = dist <= t
        links_true = int((key[rows[m]] == key[cols[m]]).sum())
        groups = components(len(key), rows[m], cols[m])
        predicted = sum(len(g) * (len(g) - 1) // 2 for g in groups)
        tp = _pairs_within(groups, key)
        same_false = _pairs_within(groups, label) - _tp_same_label(groups, key, label)
        comp = np.arange(len(key))
        for n, g in enumerate(groups):
            comp[g] = len(key) + n
        found = sum(1 for g in groups if families.get(int(key[g[0]])) == set(g))
        orig = {int(key[i]): comp[i] for i in np.flatnonzero(kind == "original")}
        by_kind = {
            v: float(np.mean([comp[i] == orig[int(key[i])] for i in np.flatnonzero(kind == v)]))
            for v in VARIANTS
        }
        out.append(
            {
                "threshold": float(t),
                "links": int(m.sum()),
                "link_precision": links_true / max(1, int(m.sum())),
                "link_recall": links_true / max(1, true_pairs),
                "group_pairs": predicted,
                "precision": tp / predicted if predicted else 1.0,
                "recall": tp / max(1, true_pairs),
                "precision_same_label_ok": (predicted - (predicted - tp - same_false)) / predicted
                if predicted
                else 1.0,
                "false_pairs": predicted - tp,
                "false_pairs_same_label": same_false,
                "families_exact": found / max(1, len(families)),
                "variant_recall": by_kind,
                "groups": len(groups),
            }
        )
    return out


def _tp_same_label(groups: list[list[int]], key: np.ndarray, label: np.ndarray) -> int:
    """True pairs whose members also share a label (all of a family's do)."""
    joint = np.array([f"{k}\t{lab}" for k, lab in zip(key, label, strict=True)])
    return _pairs_within(groups, joint)


def choose(curve: list[dict[str, Any]], min_precision: float) -> dict[str, Any]:
    """The largest threshold whose grouped pairs are at least ``min_precision`` duplicates or photos of one
    object (different objects linked in under 1 - min_precision of them)."""
    ok = [c for c in curve if c["precision_same_label_ok"] >= min_precision]
    return ok[-1] if ok else curve[0]


def plot(curve: list[dict[str, Any]], chosen: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [c["threshold"] for c in curve]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(t, [c["precision"] for c in curve], label="precision (pairs in a group)")
    a.plot(t, [c["recall"] for c in curve], label="recall (pairs in a group)")
    a.plot(t, [c["link_precision"] for c in curve], "--", label="precision (direct links)")
    a.plot(
        t, [c["precision_same_label_ok"] for c in curve], ":", label="precision, same-object photos allowed"
    )
    a.axvline(chosen["threshold"], color="grey", lw=1)
    a.set_xlabel("threshold (Euclidean distance between unit vectors)")
    a.set_ylim(0, 1.02)
    a.legend(fontsize=8)
    a.set_title("dedup: precision / recall vs threshold")
    b.plot([c["recall"] for c in curve], [c["precision"] for c in curve], marker=".")
    b.scatter(
        [chosen["recall"]], [chosen["precision"]], color="red", zorder=3, label=f"T={chosen['threshold']}"
    )
    b.set_xlabel("recall")
    b.set_ylabel("precision")
    b.set_ylim(0, 1.02)
    b.legend()
    b.set_title("PR curve (pairs in a group)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=repo_root() / "artifacts" / "dedup_calibration")
    ap.add_argument("--originals", type=int, default=150)
    ap.add_argument("--distinct", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-precision", type=float, default=0.999)
    ap.add_argument(
        "--reuse", action="store_true", help="score the index a previous run built (no re-embedding)"
    )
    args = ap.parse_args(argv)
    from uniembed.serve.build import build_index
    from uniembed.serve.commands import DEFAULT_ADAPT, DEFAULT_BACKBONE
    from uniembed.serve.dedup import index_vectors
    from uniembed.serve.store import ImageIndex

    t0 = time.perf_counter()
    if not (args.reuse and (args.out / "index" / "index.json").is_file()):
        labels = build_set(args.out, args.originals, args.distinct, args.seed)
        build_index(None, [labels], args.out / "index", adapt=DEFAULT_ADAPT, backbone=DEFAULT_BACKBONE)
    with open(args.out / "truth.csv", newline="") as f:
        truth = list(csv.DictReader(f))
    index = ImageIndex.load(args.out / "index", verify=False)
    paths = [it["path"] for it in index.items]
    key, label, kind = truth_keys(truth, paths)
    curve = score(index_vectors(index.index), key, label, kind)
    chosen = choose(curve, args.min_precision)
    plot(curve, chosen, args.out / "pr_threshold.png")
    result = {
        "images": len(paths),
        "originals": int((kind == "original").sum()),
        "variants": int(np.isin(kind, VARIANTS).sum()),
        "distinct": int((kind == "distinct").sum()),
        "embedding": f"--adapt {DEFAULT_ADAPT} --backbone {DEFAULT_BACKBONE}",
        "min_precision": args.min_precision,
        "chosen": chosen,
        "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(args.out / "results.json", json.dumps(result, indent=2) + "\n")
    print(
        f"{len(paths)} images; chosen threshold {chosen['threshold']}: precision {chosen['precision']:.3f} "
        f"(same-object photos allowed {chosen['precision_same_label_ok']:.3f}) "
        f"recall {chosen['recall']:.3f} families found {chosen['families_exact']:.3f} "
        f"variant recall {chosen['variant_recall']} ({result['seconds']} s); {args.out / 'results.json'}"
    )
    return result


if __name__ == "__main__":
    main()
