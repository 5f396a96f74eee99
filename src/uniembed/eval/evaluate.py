"""``evaluate(source, data, out_dir)``: GUIE retrieval scores of a trained run, an exported model, or
raw-feature baselines, on the same images, with reports and figures.

Sources (one embedding route each, in :mod:`uniembed.eval.sources`):
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

from pathlib import Path
from typing import Any

import numpy as np

from uniembed.eval.inputs import SPLITS, EvalError, Items, data_kind, run_of, run_split, select, source_kind
from uniembed.eval.methods import (
    BASELINES,
    CNN_SUFFIX,
    baseline_embeddings,
    check_compare,
    compare_embeddings,
    head_embeddings,
)
from uniembed.eval.sources import ROUTES, Embedded, Plan

__all__ = [
    "BASELINES",
    "CNN_SUFFIX",
    "PROTOCOL",
    "SPLITS",
    "EvalError",
    "Items",
    "baseline_embeddings",
    "data_kind",
    "evaluate",
    "head_embeddings",
    "run_split",
    "source_kind",
]

PROTOCOL = (
    "leave-one-out: every selected image queries all other selected images; Euclidean k-NN on "
    "the embeddings; mP@5 = precision over the top min(n_q, 5); queries whose label has no other "
    "image are skipped and counted"
)


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
    plan = plan_evaluation(source, data, split, domains, compare, batch_size, progress)
    route, primary = ROUTES[plan.kind]
    got = route(plan)
    if got.feats is not None and got.fit_feats is not None:
        for name, (emb, note) in compare_embeddings(plan.compare, got.feats, got.fit_feats, got.info).items():
            got.methods[name], got.notes[name] = emb, note
    if len(got.items) == 0:
        raise EvalError("no images selected (check --split / --domains and the data)")
    if not got.methods:
        raise EvalError("nothing to evaluate")
    return _write_outputs(plan, got, primary or next(iter(got.methods)), Path(out_dir), grid_queries)


def plan_evaluation(
    source: str | Path,
    data: str | Path | None,
    split: str,
    domains: list[str] | None,
    compare: list[str] | tuple[str, ...],
    batch_size: int = 32,
    progress: bool = True,
) -> Plan:
    """Check the request (kinds of source and data, split, baselines) and settle which images are scored."""
    src = Path(source)
    kind = source_kind(src)
    dkind = data_kind(data)
    if split not in SPLITS:
        raise EvalError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    names = check_compare(compare)
    if kind == "features":
        if dkind not in (None, "features"):
            raise EvalError("a feature dir source is evaluated on its own features; drop --data")
        names = names or list(BASELINES)
    run = run_of(src, kind)
    selection = select(src, run, split, domains)
    return Plan(src, kind, data, dkind, run, selection, names, batch_size, progress)


def _score(got: Embedded) -> tuple[dict[str, dict], dict[str, Any]]:
    """(metrics.json entry per method, the raw retrieval results per method)."""
    from uniembed.core.metrics import per_domain_metrics, retrieval_metrics

    _, lab_ids = np.unique(np.asarray(got.items.labels), return_inverse=True)
    doms = np.asarray(got.items.domains)
    results: dict[str, dict] = {}
    raw_results = {}
    for name, e in got.methods.items():
        r = retrieval_metrics(e, lab_ids)
        raw_results[name] = r
        results[name] = {
            "overall": r.as_dict(),
            "per_domain": per_domain_metrics(r, doms),
            "dim": int(e.shape[1]),
            "notes": got.notes.get(name, ""),
        }
    return results, raw_results


def _result(plan: Plan, got: Embedded, results: dict[str, dict], first: str) -> dict:
    """The metrics.json record."""
    src, items, sel = plan.source, got.items, plan.selection
    feature_dirs = got.feature_dirs
    return {
        "version": 1,
        "source": str(src),
        "source_kind": plan.kind,
        "source_name": (src.name if src.is_dir() else src.parent.name + "/" + src.name),
        "run_dir": str(plan.run) if plan.run else None,
        "data": str(plan.data) if plan.data is not None else (feature_dirs[0] if feature_dirs else None),
        "feature_dirs": feature_dirs,
        "split": sel.split,
        "split_note": sel.note,
        "domains": sorted(set(items.domains)),
        "domain_filter": sorted(sel.domains) if sel.domains else None,
        "n_images": len(items),
        "n_labels": int(len(set(items.labels))),
        "skipped": dict(got.skipped),
        "protocol": PROTOCOL,
        "primary": first,
        "methods": results,
    }


def _write_outputs(plan: Plan, got: Embedded, first: str, out: Path, grid_queries: int) -> dict:
    """Score every method, then write per_domain.png, grid.png, metrics.json and report.md."""
    from uniembed.eval.report import plot_per_domain, write_metrics_json, write_report_md

    results, raw_results = _score(got)
    out.mkdir(parents=True, exist_ok=True)
    result = _result(plan, got, results, first)
    plot_per_domain(out, result)
    _write_grid(out, result, raw_results[first], got.items, grid_queries)
    write_metrics_json(out, result)
    write_report_md(out, result)
    return result


def _grid_queries(r0: Any, doms: np.ndarray, n: int) -> tuple[list[int], int]:
    """(query rows shown in grid.png, how many of them have a miss). Half the rows show queries with at least
    one miss (where the method fails is the informative part), the rest are spread over all scored queries;
    both spread over domains, deterministic."""
    from uniembed.core.splits import spread_rows

    missed = r0.scored & (r0.per_query_mp5 < 1.0)
    hard = spread_rows(doms, n // 2, allowed=missed)
    rest = spread_rows(doms, n, allowed=r0.scored & ~np.isin(np.arange(len(doms)), hard))
    return hard + [q for q in rest if q not in hard][: max(0, n - len(hard))], len(hard)


def _write_grid(out: Path, result: dict, r0: Any, items: Items, grid_queries: int) -> None:
    """grid.png of the primary method's top-5 (recorded in ``result["grid"]``); nothing without queries."""
    from uniembed.eval.report import load_thumbnails, plot_grid

    queries, n_hard = _grid_queries(r0, np.asarray(items.domains), grid_queries)
    if not queries:
        return
    first = result["primary"]
    need = sorted({*queries, *[int(i) for q in queries for i in r0.neighbors[q] if i >= 0]})
    thumbs, missing = load_thumbnails(need, items.paths, items.keys, items.dataset_dir)
    plot_grid(
        out,
        queries,
        r0.neighbors,
        np.asarray(items.labels),
        thumbs,
        f"{result['source_name']} ({first}): top-5 of {len(queries)} queries ({n_hard} with a miss, "
        "the rest evenly spread) — green right, red wrong",
        lambda i: _short(items.labels[i]),
    )
    result["grid"] = {"method": first, "queries": len(queries), "missing_thumbnails": missing}


def _short(label: str, n: int = 22) -> str:
    s = label.split(":", 1)[-1]
    return s if len(s) <= n else s[: n - 1] + "…"
