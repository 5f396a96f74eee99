"""One embedding route per kind of evaluated source, all returning the same :class:`Embedded`:

* a training run: its head on cached features (the run's own, a given feature dir, or extracted from a
  prepared dataset); images embedded by the run's eager model instead when the data is a labels.csv or the
  run fine-tuned its backbone (the cached features are then stale for the head);
* an exported ``saved_model.pt``: images embedded by the TorchScript model, from a prepared dataset, a
  labels.csv, or the shards behind a feature dir (rows aligned with the features by sample key);
* a feature dir: its own features, for the baselines only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uniembed.eval.inputs import EvalError, Items, Selection
from uniembed.eval.methods import head_embeddings

if TYPE_CHECKING:
    from uniembed.core.run_record import HeadRecord
    from uniembed.export.embedder import Embedder


@dataclass
class Plan:
    """A checked evaluation request: what is scored, on what, which images."""

    source: Path
    kind: str  # run | saved_model | features
    data: str | Path | None
    data_kind: str | None  # features | dataset | labels_csv | None
    run: Path | None  # the training run behind the source, when known
    selection: Selection
    compare: list[str]
    batch_size: int = 32
    progress: bool = True


@dataclass
class Embedded:
    """What a route produced: the scored images and each method's embeddings, row-aligned; the cached
    features (``feats``, and ``fit_feats`` for fitting PCA baselines) when the route read any."""

    items: Items = field(default_factory=Items)
    methods: dict[str, np.ndarray] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    feature_dirs: list[str] = field(default_factory=list)
    feats: np.ndarray | None = None
    fit_feats: np.ndarray | None = None
    info: dict = field(default_factory=dict)  # the feature set's info.json

    @property
    def has_features(self) -> bool:
        return self.feats is not None


def _require_features_for_compare(plan: Plan, feature_dirs: list[str]) -> None:
    if plan.compare and not feature_dirs:
        raise EvalError(
            "--compare needs features: pass --data <feature dir> (for an exported model the images "
            "are then read from the feature dir's prepared dataset)"
        )


def cached_features(feature_dirs: list[str], sel: Selection) -> Embedded:
    """The selected rows of the feature dirs, and the rows a PCA baseline is fitted on: the training labels'
    rows when there is a held-out split (less any held-out photos), else what is scored."""
    from uniembed.features.store import load_features

    try:
        fs, names, _ = load_features(feature_dirs)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    triples = zip(names.tolist(), fs.domains.tolist(), fs.paths, strict=True)
    rows = np.flatnonzero(np.array([sel.keep(n, d, p) for n, d, p in triples], bool))
    items = Items(
        names[rows].astype(str).tolist(),
        fs.domains[rows].astype(str).tolist(),
        [fs.paths[i] for i in rows],
        [fs.keys[i] for i in rows],
        fs.info.get("dataset") or fs.info.get("dataset_dir"),
    )
    fit_mask = np.isin(names, list(sel.train_labels))
    if sel.photo_paths:  # the photos held out of training are not fitted on either
        fit_mask &= ~np.isin(np.asarray(fs.paths, dtype=object), list(sel.photo_paths))
    fit_rows = np.flatnonzero(fit_mask) if sel.train_labels else rows
    if len(fit_rows) < 2:
        fit_rows = rows
    return Embedded(
        items,
        feature_dirs=feature_dirs,
        feats=np.asarray(fs.features[rows], np.float32),
        fit_feats=np.asarray(fs.features[fit_rows], np.float32),
        info=fs.info,
    )


def _embed_feature_dir_images(emb: Embedder, out: Embedded, plan: Plan, name: str, desc: str) -> None:
    """Embed the images behind the feature rows (read from the feature dir's prepared dataset by key) and
    drop the rows whose image is missing or undecodable, so every method scores the same images."""
    from uniembed.eval.images import keyed_stream

    if len(out.feature_dirs) > 1:
        raise EvalError(
            f"{len(out.feature_dirs)} feature dirs: sample keys are only unique within one dataset; pass "
            "--data with one feature dir or prepared dataset"
        )
    ds = out.items.dataset_dir
    if not ds or not (Path(ds) / "manifest.json").exists():
        raise EvalError(
            f"the prepared dataset of {out.feature_dirs[0]} ({ds}) is gone: cannot embed its images"
        )
    want = set(out.items.keys)
    got: dict[str, int] = {}
    bad: set[str] = set()
    stream = keyed_stream(ds, want, got, bad, out.skipped)
    e = emb.embed_iter(stream, total=len(want), progress=plan.progress, desc=desc)
    keep_rows = [i for i, k in enumerate(out.items.keys) if k in got]
    missing = len(want - set(got) - bad)
    if missing:
        out.skipped["key not found in the prepared dataset"] += missing
    out.items = out.items.subset(keep_rows)
    out.feats = out.feats[keep_rows] if out.feats is not None else None
    out.methods[name] = e[[got[k] for k in out.items.keys]]


def _embed_images(plan: Plan, out: Embedded, name: str) -> None:
    """Embed the selected images with the source's model (the exported file, or the run rebuilt eagerly)
    into ``out.methods[name]``: the images behind the feature rows when features were read, else the
    images of the prepared dataset / labels.csv given as data."""
    from uniembed.eval.images import image_stream
    from uniembed.export.embedder import load_embedder

    emb = load_embedder(plan.source, batch_size=plan.batch_size)
    model_name = "saved_model" if plan.kind == "saved_model" else "run model"
    desc = f"embedding ({model_name})"
    if out.has_features:
        _embed_feature_dir_images(emb, out, plan, name, desc)
    else:
        if plan.data is None or plan.data_kind is None:
            raise EvalError(f"{plan.source}: pass --data (a prepared dataset dir, labels.csv or feature dir)")
        stream, total = image_stream(
            Path(plan.data), plan.data_kind, plan.selection.keep, out.items, out.skipped
        )
        out.methods[name] = emb.embed_iter(stream, total=total, progress=plan.progress, desc=desc)
    n_bad = int((~np.isfinite(out.methods[name]).all(axis=1)).sum())
    if n_bad:  # scoring NaN rows would give meaningless ranks, silently
        raise EvalError(f"{plan.source}: the model produced non-finite embeddings for {n_bad} images")
    out.notes[name] = (
        f"images embedded by {'saved_model.pt' if plan.kind == 'saved_model' else 'the run model'} "
        f"(fingerprint {emb.fingerprint})"
    )


def _run_feature_dirs(plan: Plan, record: HeadRecord, finetuned: bool) -> list[str]:
    """The cached features a run is scored on: a given feature dir, the run's own, or features extracted
    from a given prepared dataset with the run's backbone (none when images are embedded directly)."""
    if plan.data_kind == "features":
        return [str(plan.data)]
    if plan.data_kind is None:
        return [str(d) for d in record.feature_dirs()]
    if plan.data_kind == "dataset" and not finetuned:
        from uniembed.features.extract import extract

        return [str(extract(plan.data, backbone=record.backbone, pooling=record.pooling))]
    return []


def embed_run(plan: Plan) -> Embedded:
    """A training run: its head on cached features, or its eager model on images (see the module doc)."""
    from uniembed.train import load_head

    head, record = load_head(plan.source)
    # A fine-tuned backbone makes the cached features stale for the head: its images are embedded by the
    # run's own model instead (the cached features still serve as raw/PCA baselines).
    finetuned = bool(record.backbone_state)
    model_route = finetuned or plan.data_kind == "labels_csv"
    feature_dirs = _run_feature_dirs(plan, record, finetuned)
    _require_features_for_compare(plan, feature_dirs)
    out = Embedded()
    if feature_dirs:
        out = cached_features(feature_dirs, plan.selection)
        want, have = record.fingerprint, out.info.get("fingerprint")
        if not finetuned and want and have and want != have:
            raise EvalError(
                f"features in {feature_dirs[0]} come from {out.info.get('backbone')} ({have}), "
                f"the head was trained on {want}"
            )
        if not model_route:
            out.methods["head"] = head_embeddings(head, out.feats)
            out.notes["head"] = (
                f"head of run {plan.source.name} on cached features {Path(feature_dirs[0]).name}"
            )
    if model_route:
        _embed_images(plan, out, "head")
    return out


def embed_saved_model(plan: Plan) -> Embedded:
    """An exported saved_model.pt: the TorchScript model on the images of the data."""
    feature_dirs = [str(plan.data)] if plan.data_kind == "features" else []
    _require_features_for_compare(plan, feature_dirs)
    if plan.data is None:
        raise EvalError("an exported model needs --data (prepared dataset dir, labels.csv or feature dir)")
    out = cached_features(feature_dirs, plan.selection) if feature_dirs else Embedded()
    _embed_images(plan, out, "saved_model")
    return out


def embed_features(plan: Plan) -> Embedded:
    """A feature dir: its own features, scored through the baselines only."""
    return cached_features([str(plan.source)], plan.selection)


#: The route for each source kind, and the name its own embeddings are scored under (None: baselines only).
ROUTES: dict[str, tuple[Callable[[Plan], Embedded], str | None]] = {
    "run": (embed_run, "head"),
    "saved_model": (embed_saved_model, "saved_model"),
    "features": (embed_features, None),
}
