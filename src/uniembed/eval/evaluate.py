"""``evaluate(source, data, out_dir)``: GUIE retrieval scores of a trained run, an exported model, or
raw-feature baselines, on the same images, with reports and figures.

Sources:
  * a training run dir (``head.pt``): cached features (the run's own, a given feature dir, or extracted from a
    prepared dataset) through the head; with a labels.csv, images are embedded by the run's eager model;
  * an exported ``saved_model.pt`` (or a folder holding it): images embedded by the TorchScript model, from a
    prepared dataset's shards, a labels.csv, or the shards behind a feature dir;
  * a feature dir: the baselines only.
Baselines (``compare``): ``raw`` = L2-normalised backbone features, ``pca<k>`` = PCA to k dims fitted on the
training labels' rows (the complement of the evaluated split), then L2-normalised.

Protocol: leave-one-out GUIE mP@5 over the selected images (each image queries all the others), so "val"
scores images of labels the head never saw.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("auto", "val", "photos", "all")
BASELINES = ("raw", "pca64")
#: ``raw_cnn`` / ``pca64_cnn``: the baseline on the CNN columns only (features of a ``+colour`` pooling).
CNN_SUFFIX = "_cnn"
PROTOCOL = (
    "leave-one-out: every selected image queries all other selected images; Euclidean k-NN on "
    "the embeddings; mP@5 = precision over the top min(n_q, 5); queries whose label has no other "
    "image are skipped and counted"
)


class EvalError(ValueError):
    """Bad evaluation input (wrong source, missing data, impossible split): a clear message, no stack."""


@dataclass
class Items:
    """The evaluated images, row-aligned with every method's embeddings."""

    labels: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    dataset_dir: str | None = None  # prepared dataset holding the images (thumbnails by key)

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------------------- sources


def source_kind(source: str | Path) -> str:
    """``run`` | ``saved_model`` | ``features``; EvalError otherwise."""
    from uniembed.export.embedder import resolve_saved_model
    from uniembed.features.store import is_complete

    p = Path(source)
    if not p.exists():
        raise EvalError(f"source {p} does not exist")
    if p.is_dir() and (p / "head.pt").exists():
        return "run"
    if resolve_saved_model(p) is not None:
        return "saved_model"
    if p.is_dir() and is_complete(p):
        return "features"
    raise EvalError(f"{p} is not a training run (head.pt), an exported saved_model.pt, or a feature dir")


def data_kind(data: str | Path | None) -> str | None:
    """``features`` | ``dataset`` | ``labels_csv`` | None."""
    if data is None:
        return None
    from uniembed.features.store import is_complete

    p = Path(data)
    if p.is_file() and p.suffix.lower() == ".csv":
        return "labels_csv"
    if p.is_dir() and is_complete(p):
        return "features"
    if p.is_dir() and (p / "manifest.json").exists():
        return "dataset"
    if p.is_dir() and (p / "labels.csv").exists():
        return "labels_csv"
    raise EvalError(
        f"--data {p} is not a feature dir, a prepared dataset dir (manifest.json) or a labels.csv"
    )


def _run_of(source: Path, kind: str) -> Path | None:
    """The training run behind a source (itself, or the run_dir recorded in export.json), if it exists."""
    if kind == "run":
        return source
    if kind == "saved_model":
        folder = source if source.is_dir() else source.parent
        ej = folder / "export.json"
        if ej.exists():
            run = Path(json.loads(ej.read_text()).get("run_dir", ""))
            if (run / "head.pt").exists():
                return run
    return None


def run_split(run_dir: Path) -> tuple[set[str], set[str], set[str]]:
    """(train labels, held-out labels, held-out photo paths) of a run, recomputed exactly as training split
    them (same feature dirs, same split config). The photo paths are empty unless the run held out photos of
    its training labels (``split.photo_fraction``)."""
    from uniembed.core.run_record import HeadRecord
    from uniembed.core.splits import heldout_photos, split_labels
    from uniembed.features.store import load_features
    from uniembed.train import TrainConfig

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise EvalError(f"{run_dir} has no config.yaml: cannot recompute its label split (use --split all)")
    cfg = TrainConfig.from_yaml(cfg_path)
    dirs = [str(d) for d in HeadRecord.load(run_dir).feature_dirs()]
    missing = [d for d in dirs if not (Path(d) / "info.json").exists()]
    if not dirs or missing:
        raise EvalError(
            f"the run's feature dir(s) {missing or dirs} are gone: cannot recompute its label split"
        )
    fs, names, _ = load_features(dirs)
    sp = split_labels(
        names,
        fs.domains,
        cfg.split.val_fraction,
        cfg.split.seed,
        cfg.train_domains,
        cfg.split.unseen_domains_all_labels,
    )
    train_labels = set(sp.train_labels)
    photos = heldout_photos(
        names, fs.domains, train_labels, cfg.split.photo_fraction, cfg.split.seed, cfg.train_domains
    )
    photo_paths = {fs.paths[i] for i in np.flatnonzero(photos).tolist()}
    return train_labels, set(sp.val_labels), photo_paths


# ------------------------------------------------------------------------------------------- data


def _read_labels_csv(path: Path) -> list[dict]:
    if path.is_dir():
        path = path / "labels.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"path", "label"} <= set(rows[0]):
        raise EvalError(f"{path} needs columns path,label[,domain]; has {', '.join(rows[0])}")
    base = path.parent
    out = []
    for r in rows:
        p = Path(r["path"])
        out.append(
            {
                "path": str(p if p.is_absolute() else base / p),
                "label": r["label"],
                "domain": r.get("domain") or "default",
                "key": "",
            }
        )
    return out


def _image_stream(
    data: Path, kind: str, keep: Any, items: Items, skipped: Counter
) -> tuple[Iterator[Any], int]:
    """(generator of uint8 [3,H,W] tensors, expected count) over the selected images of a dataset dir or
    labels.csv; ``items`` is filled as images are yielded; undecodable images are skipped and counted."""
    from torchvision.transforms.functional import pil_to_tensor

    from uniembed.data.images import BadImageError, load_image

    if kind == "dataset":
        from uniembed.data.shards import iter_samples, load_manifest

        man = load_manifest(data)
        items.dataset_dir = str(data)
        total = int(man.get("count", 0)) or None

        def gen_ds() -> Iterator[Any]:
            for s in iter_samples(data):
                m = s.meta
                if not keep(m["label"], m.get("domain", "default"), m.get("path", "")):
                    continue
                try:
                    t = pil_to_tensor(load_image(s.image_bytes))
                except BadImageError as e:
                    skipped[f"bad image: {e.reason}"] += 1
                    continue
                items.labels.append(m["label"])
                items.domains.append(m.get("domain", "default"))
                items.paths.append(m.get("path", ""))
                items.keys.append(s.key)
                yield t

        return gen_ds(), total or 0
    rows = [r for r in _read_labels_csv(data) if keep(r["label"], r["domain"], r["path"])]

    def gen_csv() -> Iterator[Any]:
        for r in rows:
            try:
                t = pil_to_tensor(load_image(r["path"]))
            except BadImageError as e:
                skipped[f"bad image: {e.reason}"] += 1
                continue
            items.labels.append(r["label"])
            items.domains.append(r["domain"])
            items.paths.append(r["path"])
            items.keys.append("")
            yield t

    return gen_csv(), len(rows)


# ------------------------------------------------------------------------------------------- methods


def _colour_dim(info: dict) -> int:
    """Width of the colour-histogram block at the end of ``+colour`` features (0 without one)."""
    from uniembed.models.colour import COLOUR_BINS, split_colour

    return COLOUR_BINS**3 if split_colour(str(info.get("pooling") or ""))[1] else 0


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def baseline_embeddings(name: str, feats: np.ndarray, fit_feats: np.ndarray) -> tuple[np.ndarray, str]:
    """``raw``: L2-normalised features. ``pca<k>``: L2-normalise, PCA fitted on ``fit_feats``, project to k,
    L2-normalise (the same PCA the head's ``init: pca`` starts from)."""
    import torch

    from uniembed.models.heads import pca_fit

    x = _l2(np.asarray(feats, np.float32))
    if name == "raw":
        return x, "L2-normalised backbone features"
    if name.startswith("pca") and name[3:].isdigit():
        k_req = int(name[3:])
        fit = _l2(np.asarray(fit_feats, np.float32))
        k = min(k_req, fit.shape[1], max(1, fit.shape[0] - 1))
        if fit.shape[0] < 2:
            raise EvalError(f"{name}: need at least 2 rows to fit PCA, have {fit.shape[0]}")
        mean, comps, _ = pca_fit(torch.from_numpy(fit), k)
        proj = (torch.from_numpy(x) - mean) @ comps.T
        note = f"PCA to {k} dims fitted on {fit.shape[0]} rows"
        if k < k_req:
            note += f" (asked {k_req}; limited by the fit rows / feature width)"
        return _l2(proj.numpy()), note
    raise EvalError(f"unknown baseline {name!r}; known: raw, pca<k> (e.g. pca64)")


def head_embeddings(head: Any, feats: np.ndarray, batch: int = 4096) -> np.ndarray:
    """A head applied to cached backbone features, in blocks (no gradients)."""
    import torch

    with torch.no_grad():
        return (
            np.concatenate(
                [
                    head(torch.from_numpy(np.asarray(feats[i : i + batch], np.float32))).numpy()
                    for i in range(0, len(feats), batch)
                ]
            )
            if len(feats)
            else np.zeros((0, 1))
        )


# ------------------------------------------------------------------------------------------- main


def evaluate(
    source: str | Path,
    data: str | Path | None = None,
    out_dir: str | Path = "artifacts/eval",
    split: str = "auto",
    domains: list[str] | None = None,
    compare: list[str] | tuple[str, ...] = (),
    batch_size: int = 32,
    grid_queries: int = 8,
    progress: bool = True,
) -> dict:
    """Score ``source`` (and the ``compare`` baselines) on ``data``; write metrics.json, report.md,
    per_domain.png and grid.png into ``out_dir``. Returns the metrics dict."""
    from uniembed.core.metrics import per_domain_metrics, retrieval_metrics

    src = Path(source)
    kind = source_kind(src)
    dkind = data_kind(data)
    if split not in SPLITS:
        raise EvalError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    compare = [c.strip() for c in compare if c.strip()]
    for c in compare:
        base_c = c.removesuffix(CNN_SUFFIX)
        if not (base_c == "raw" or (base_c.startswith("pca") and base_c[3:].isdigit())):
            raise EvalError(
                f"unknown --compare method {c!r}; known: raw, pca<k> (e.g. pca64), and raw_cnn / pca<k>_cnn "
                "(the same without the colour block of a '+colour' pooling)"
            )
    if kind == "features":
        if dkind not in (None, "features"):
            raise EvalError("a feature dir source is evaluated on its own features; drop --data")
        compare = compare or list(BASELINES)

    run = _run_of(src, kind)
    if split == "auto":
        split = "val" if run is not None else "all"
    train_labels: set[str] = set()
    val_labels: set[str] = set()
    photo_paths: set[str] = set()
    if split in ("val", "photos"):
        if run is None:
            raise EvalError(
                f"--split {split} needs the training run behind {src} (not found); use --split all"
            )
        train_labels, val_labels, photo_paths = run_split(run)
        split_note = f"held-out labels of run {run.name} ({len(val_labels)} labels)"
        if split == "photos":
            if not photo_paths:
                raise EvalError(
                    f"run {run.name} held out no photos of its training labels: train it with "
                    "split.photo_fraction=0.2 (for example), or use --split val"
                )
            split_note = (
                f"held-out photos of the training labels of run {run.name} ({len(photo_paths)} photos)"
            )
    else:
        split_note = "every image"
    dom_set = set(domains) if domains else None

    def keep(label: str, domain: str, path: str) -> bool:
        if dom_set is not None and domain not in dom_set:
            return False
        if split == "val":
            return label in val_labels
        if split == "photos":
            return path in photo_paths
        return True

    items = Items()
    skipped: Counter = Counter()
    methods: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    feats = fit_feats = None
    primary = "head" if kind == "run" else ("saved_model" if kind == "saved_model" else None)

    # ---- which features (if any) and whether a model embeds images
    head = hinfo = None
    finetuned = False
    if kind == "run":
        from uniembed.train import load_head

        head, hinfo = load_head(src)
        # A fine-tuned backbone makes the cached features stale for the head: its images are embedded by the
        # run's own model instead (the cached features still serve as raw/PCA baselines).
        finetuned = bool(hinfo.backbone_state)
    model_route = kind == "saved_model" or (kind == "run" and (finetuned or dkind == "labels_csv"))
    feature_dirs: list[str] = []
    if kind == "features":
        feature_dirs = [str(src)]
    elif dkind == "features":
        feature_dirs = [str(data)]
    elif kind == "run" and dkind is None:
        feature_dirs = [str(d) for d in hinfo.feature_dirs()]
    elif kind == "run" and dkind == "dataset" and not finetuned:
        from uniembed.features.extract import extract

        feature_dirs = [str(extract(data, backbone=hinfo.backbone, pooling=hinfo.pooling))]
    if compare and not feature_dirs:
        raise EvalError(
            "--compare needs features: pass --data <feature dir> (for an exported model the images "
            "are then read from the feature dir's prepared dataset)"
        )
    if kind == "saved_model" and data is None:
        raise EvalError("an exported model needs --data (prepared dataset dir, labels.csv or feature dir)")

    fs = None
    if feature_dirs:
        from uniembed.features.store import load_features

        try:
            fs, names, _ = load_features(feature_dirs)
        except FileNotFoundError as e:
            raise EvalError(str(e)) from None
        if kind == "run" and not finetuned:
            want = hinfo.fingerprint
            if want and fs.info.get("fingerprint") and want != fs.info["fingerprint"]:
                raise EvalError(
                    f"features in {feature_dirs[0]} come from {fs.info.get('backbone')} "
                    f"({fs.info['fingerprint']}), the head was trained on {want}"
                )
        triples = zip(names.tolist(), fs.domains.tolist(), fs.paths, strict=True)
        mask = np.array([keep(n, d, p) for n, d, p in triples], bool)
        rows = np.flatnonzero(mask)
        items.labels = names[rows].astype(str).tolist()
        items.domains = fs.domains[rows].astype(str).tolist()
        items.paths = [fs.paths[i] for i in rows]
        items.keys = [fs.keys[i] for i in rows]
        items.dataset_dir = fs.info.get("dataset") or fs.info.get("dataset_dir")
        feats = np.asarray(fs.features[rows], np.float32)
        # PCA is fitted on the training labels' rows when there is a held-out split, else on what is scored.
        fit_mask = np.isin(names, list(train_labels))
        if photo_paths:  # the photos held out of training are not fitted on either
            fit_mask &= ~np.isin(np.asarray(fs.paths, dtype=object), list(photo_paths))
        fit_rows = np.flatnonzero(fit_mask) if train_labels else rows
        if len(fit_rows) < 2:
            fit_rows = rows
        fit_feats = np.asarray(fs.features[fit_rows], np.float32)
        if kind == "run" and not model_route:
            methods["head"] = head_embeddings(head, feats)
            notes["head"] = f"head of run {src.name} on cached features {Path(feature_dirs[0]).name}"

    # ---- image route (exported model; a run on a labels.csv or with a fine-tuned backbone)
    if model_route:
        from uniembed.export.embedder import load_embedder

        emb = load_embedder(src, batch_size=batch_size)
        model_name = "saved_model" if kind == "saved_model" else "run model"
        if fs is not None:
            # the feature dir's own images: read them from its prepared dataset, rows aligned by key
            if len(feature_dirs) > 1:
                raise EvalError(
                    f"{len(feature_dirs)} feature dirs: sample keys are only unique within one dataset; pass "
                    "--data with one feature dir or prepared dataset"
                )
            ds = items.dataset_dir
            if not ds or not (Path(ds) / "manifest.json").exists():
                raise EvalError(
                    f"the prepared dataset of {feature_dirs[0]} ({ds}) is gone: cannot embed its images"
                )
            want = set(items.keys)
            got: dict[str, int] = {}
            bad: set[str] = set()

            def only_wanted() -> Iterator[Any]:
                from torchvision.transforms.functional import pil_to_tensor

                from uniembed.data.images import BadImageError, load_image
                from uniembed.data.shards import iter_samples

                for s in iter_samples(ds):
                    if s.key not in want:
                        continue
                    try:
                        t = pil_to_tensor(load_image(s.image_bytes))
                    except BadImageError as e:
                        skipped[f"bad image: {e.reason}"] += 1
                        bad.add(s.key)
                        continue
                    got[s.key] = len(got)
                    yield t

            e = emb.embed_iter(
                only_wanted(), total=len(want), progress=progress, desc=f"embedding ({model_name})"
            )
            keep_rows = [i for i, k in enumerate(items.keys) if k in got]
            missing = len(want - set(got) - bad)
            if missing:
                skipped["key not found in the prepared dataset"] += missing
            items = Items(
                [items.labels[i] for i in keep_rows],
                [items.domains[i] for i in keep_rows],
                [items.paths[i] for i in keep_rows],
                [items.keys[i] for i in keep_rows],
                items.dataset_dir,
            )
            feats = feats[keep_rows]
            methods[primary] = e[[got[k] for k in items.keys]]
        else:
            if data is None or dkind is None:
                raise EvalError(f"{src}: pass --data (a prepared dataset dir, labels.csv or feature dir)")
            stream, total = _image_stream(Path(data), dkind, keep, items, skipped)
            methods[primary] = emb.embed_iter(
                stream, total=total, progress=progress, desc=f"embedding ({model_name})"
            )
        n_bad = int((~np.isfinite(methods[primary]).all(axis=1)).sum())
        if n_bad:  # scoring NaN rows would give meaningless ranks, silently
            raise EvalError(f"{src}: the model produced non-finite embeddings for {n_bad} images")
        notes[primary] = (
            f"images embedded by {'saved_model.pt' if kind == 'saved_model' else 'the run model'} "
            f"(fingerprint {emb.fingerprint})"
        )

    if feats is not None:
        colour_dim = _colour_dim(fs.info if fs is not None else {})
        for c in compare:
            if c.endswith(CNN_SUFFIX):
                if not colour_dim:
                    raise EvalError(
                        f"--compare {c}: the features have no colour block (pooling "
                        f"{(fs.info if fs is not None else {}).get('pooling')!r}; '_cnn' baselines need "
                        "a '+colour' pooling)"
                    )
                methods[c], notes[c] = baseline_embeddings(
                    c.removesuffix(CNN_SUFFIX), feats[:, :-colour_dim], fit_feats[:, :-colour_dim]
                )
                notes[c] += f" (CNN part only: the last {colour_dim} colour-histogram columns dropped)"
            else:
                methods[c], notes[c] = baseline_embeddings(c, feats, fit_feats)

    if len(items) == 0:
        raise EvalError("no images selected (check --split / --domains and the data)")
    if not methods:
        raise EvalError("nothing to evaluate")

    # ---- scores
    labels = np.asarray(items.labels)
    _, lab_ids = np.unique(labels, return_inverse=True)
    doms = np.asarray(items.domains)
    results: dict[str, dict] = {}
    raw_results = {}
    for name, e in methods.items():
        r = retrieval_metrics(e, lab_ids)
        raw_results[name] = r
        results[name] = {
            "overall": r.as_dict(),
            "per_domain": per_domain_metrics(r, doms),
            "dim": int(e.shape[1]),
            "notes": notes.get(name, ""),
        }
    first = primary or next(iter(methods))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "version": 1,
        "source": str(src),
        "source_kind": kind,
        "source_name": (src.name if src.is_dir() else src.parent.name + "/" + src.name),
        "run_dir": str(run) if run else None,
        "data": str(data) if data is not None else (feature_dirs[0] if feature_dirs else None),
        "feature_dirs": feature_dirs,
        "split": split,
        "split_note": split_note,
        "domains": sorted(set(items.domains)),
        "domain_filter": sorted(dom_set) if dom_set else None,
        "n_images": len(items),
        "n_labels": int(len(set(items.labels))),
        "skipped": dict(skipped),
        "protocol": PROTOCOL,
        "primary": first,
        "methods": results,
    }
    # ---- figures
    from uniembed.core.splits import spread_rows
    from uniembed.eval.report import (
        load_thumbnails,
        plot_grid,
        plot_per_domain,
        write_metrics_json,
        write_report_md,
    )

    plot_per_domain(out, result)
    r0 = raw_results[first]
    # Half the rows show queries with at least one miss (where the method fails is the informative part),
    # the rest are spread over all scored queries; both spread over domains, deterministic.
    missed = r0.scored & (r0.per_query_mp5 < 1.0)
    hard = spread_rows(doms, grid_queries // 2, allowed=missed)
    rest = spread_rows(doms, grid_queries, allowed=r0.scored & ~np.isin(np.arange(len(doms)), hard))
    queries = hard + [q for q in rest if q not in hard][: max(0, grid_queries - len(hard))]
    if queries:
        need = sorted({*queries, *[int(i) for q in queries for i in r0.neighbors[q] if i >= 0]})
        thumbs, missing = load_thumbnails(need, items.paths, items.keys, items.dataset_dir)
        plot_grid(
            out,
            queries,
            r0.neighbors,
            labels,
            thumbs,
            f"{result['source_name']} ({first}): top-5 of {len(queries)} queries ({len(hard)} with a miss, "
            "the rest evenly spread) — green right, red wrong",
            lambda i: _short(items.labels[i]),
        )
        result["grid"] = {"method": first, "queries": len(queries), "missing_thumbnails": missing}
    write_metrics_json(out, result)
    write_report_md(out, result)
    return result


def _short(label: str, n: int = 22) -> str:
    s = label.split(":", 1)[-1]
    return s if len(s) <= n else s[: n - 1] + "…"
