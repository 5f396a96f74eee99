"""Measure alpha-QE and DBA (uniembed.serve.expansion) per domain: `python -m uniembed_lab.expansion_eval`.

Protocol (the merged leave-one-domain-out index of `uniembed model`): every shared image is in one index;
each domain's images query it, never retrieving themselves; GUIE mP@5 (k=5). Two embeddings:

- ``adapted``: the default index embedding (`uniembed index` without --model): pcaw256 fitted on all
  images' cached ensemble features, no labels;
- ``model``: the trained 64-d head in its leave-one-domain-out form: domain d is scored with the run
  trained without d (artifacts/work/runs/lodo-d), which embeds every row.

Queries are scored two ways once DBA is on:

- ``new image`` (the figure that picks defaults): the query is a fresh upload. Its raw embedding searches a
  database augmented *without it*: a stored vector whose top-n neighbours included the query is rebuilt
  from its next neighbour instead (exact, per query), so the query never leaks into the database;
- ``more like this``: the query is an indexed item; its stored (augmented) vector searches the database.

QE always takes the query's top-n neighbours among the other rows, in the database it searches.
Writes artifacts/expansion/report.md, report.json, per_domain.png; embeddings are cached there.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uniembed.serve.expansion import knn_ip, l2n, neighbour_weights, weighted_average
from uniembed_lab.expansion_pick import MIN_GAIN, Pick, choose, write_outputs

__all__ = ["MIN_GAIN", "Pick", "choose", "main", "measure", "write_outputs"]

NS = (1, 2, 3, 5, 10)
ALPHAS = (0.0, 1.0, 3.0)
K = 5
BLOCK = 1024
FEATURES = Path("artifacts/work/features")
RUNS = Path("artifacts/work/runs")
OUT = Path("artifacts/expansion")


@dataclass
class Patches:
    """Per query row q, the DBA vectors rebuilt without q: ``keys`` = q * N + j (sorted), ``vecs`` [P, D]."""

    keys: np.ndarray
    vecs: np.ndarray
    n_rows: int

    def select(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(local query index, database row, vector) of the patches of ``rows`` (rows sorted ascending)."""
        q = self.keys // self.n_rows
        sel = np.flatnonzero(np.isin(q, rows))
        local = np.searchsorted(rows, q[sel])
        return local, self.keys[sel] % self.n_rows, self.vecs[sel]


def dba_with_patches(x: np.ndarray, sims: np.ndarray, ids: np.ndarray, n: int, alpha: float):
    """DBA vectors of every row, and each (query q, row j) vector of j rebuilt as if q were not indexed."""
    w = neighbour_weights(sims[:, : n + 1], alpha)
    u = x + np.einsum("jm,jmd->jd", w[:, :n], x[ids[:, :n]])
    db = l2n(u)
    j = np.repeat(np.arange(len(x)), n)
    m = np.tile(np.arange(n), len(x))
    q = ids[j, m]
    rebuilt = l2n(u[j] - w[j, m, None] * x[q] + w[j, n, None] * x[ids[j, n]])
    keys = q.astype(np.int64) * len(x) + j
    order = np.argsort(keys, kind="stable")
    return db, Patches(keys[order], rebuilt[order], len(x))


def search(
    qv: np.ndarray, rows: np.ndarray, db: np.ndarray, k: int, patches: Patches | None = None
) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    """Exact top-k by cosine of queries ``qv`` (rows ``rows`` of the database, each excluded from its own
    results), with the patched vectors scored in place of the stored ones. Returns sims, ids, selection."""
    s = qv @ db.T
    local = np.arange(len(rows))
    s[local, rows] = -np.inf
    sel = None
    if patches is not None:
        sel = patches.select(rows)
        li, j, v = sel
        s[li, j] = np.einsum("pd,pd->p", qv[li], v)
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(s, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(ps, order, 1), np.take_along_axis(part, order, 1), sel


def neighbour_vectors(db: np.ndarray, ids: np.ndarray, sel: tuple | None, n_rows: int) -> np.ndarray:
    """Vectors of the found neighbours [Q, n, D], patched ones in place of the stored ones."""
    vecs = db[ids]
    if sel is not None:
        li, j, v = sel
        key = li.astype(np.int64) * n_rows + j
        order = np.argsort(key)
        key, v = key[order], v[order]
        want = (np.arange(len(ids))[:, None] * n_rows + ids).reshape(-1)
        pos = np.clip(np.searchsorted(key, want), 0, max(len(key) - 1, 0))
        hit = (key[pos] == want) if len(key) else np.zeros(len(want), bool)
        flat = vecs.reshape(-1, db.shape[1])
        flat[hit] = v[pos[hit]]
    return vecs


def p_at_5(ids: np.ndarray, rows: np.ndarray, codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """GUIE precision per query over the top min(n_q, 5), n_q = the query's other images of its label."""
    n_q = counts[codes[rows]] - 1
    top = np.minimum(n_q, K)
    rel = codes[ids[:, :K]] == codes[rows][:, None]
    hits = (rel & (np.arange(K)[None, :] < top[:, None])).sum(1)
    return np.where(n_q > 0, hits / np.maximum(top, 1), np.nan)


def grid() -> list[tuple[str, int, float]]:
    return [("off", 0, 0.0)] + [(m, n, a) for m in ("qe", "dba", "both") for n in NS for a in ALPHAS]


def key(mode: str, n: int, a: float) -> str:
    return "off" if mode == "off" else f"{mode} n={n} a={a:g}"


def score_rows(
    x: np.ndarray,
    rows: np.ndarray,
    codes: np.ndarray,
    counts: np.ndarray,
    on_database: Callable[[], None] | None = None,
) -> dict[str, dict]:
    """{setting: {"new": p@5 per query row, "mlt": ...}} for the queries ``rows`` of embedding ``x``;
    ``on_database`` is called after each of the 16 databases (plain, then each DBA setting)."""
    nmax = max(NS)
    sims, ids = knn_ip(x, x, nmax + 1, exclude_self=True)
    out: dict[str, dict] = {}
    dbs = [("off", 0, 0.0)] + [("dba", n, a) for n in NS for a in ALPHAS]
    for _, n, a in dbs:
        db, patches = dba_with_patches(x, sims, ids, n, a) if n else (x, None)
        res: dict[str, dict[str, list]] = {}
        for b in range(0, len(rows), BLOCK):
            r = rows[b : b + BLOCK]
            variants = [("new", x[r], patches)] + ([("mlt", db[r], None)] if n else [])
            for var, qv, pt in variants:
                s1, i1, sel = search(qv, r, db, nmax if not n else max(n, K), pt)
                qe_runs = [(qn, qa) for qn in NS for qa in ALPHAS] if not n else [(n, a)]
                base = "off" if not n else key("dba", n, a)
                res.setdefault(base, {}).setdefault(var, []).append(p_at_5(i1, r, codes, counts))
                for qn, qa in qe_runs:
                    nv = neighbour_vectors(db, i1[:, :qn], sel, len(x))
                    q2 = weighted_average(qv, nv, s1[:, :qn], qa)
                    _, i2, _ = search(q2, r, db, K, pt)
                    name = key("qe", qn, qa) if not n else key("both", n, a)
                    res.setdefault(name, {}).setdefault(var, []).append(p_at_5(i2, r, codes, counts))
        for name, by_var in res.items():
            out[name] = {v: np.concatenate(p) for v, p in by_var.items()}
            out[name].setdefault("mlt", out[name]["new"])
        if on_database is not None:
            on_database()
    return out


def _feature_dir(root: Path) -> Path:
    dirs = sorted(p for p in root.iterdir() if (p / "info.json").is_file()) if root.is_dir() else []
    if len(dirs) != 1:
        raise SystemExit(
            f"expected one feature cache under {root} (`make model` makes it), found {len(dirs)}"
        )
    return dirs[0]


def load_embeddings(features: Path, runs: Path, out: Path) -> dict[str, np.ndarray]:
    """The two embeddings of every row (cached in ``out``): adapted pcaw256, and one head per left-out
    domain (``head:<domain>``), plus label names and domains."""
    fdir = _feature_dir(features)
    heads = sorted(runs.glob("lodo-*/head.pt"))
    stamp = {"features": str(fdir.resolve()), "heads": {str(h): h.stat().st_mtime for h in heads}}
    cache, stamp_file = out / "embeddings.npz", out / "embeddings.json"
    if cache.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    from uniembed.core.fsutil import atomic_path, atomic_write_text
    from uniembed.eval.methods import head_embeddings
    from uniembed.features.store import load_features
    from uniembed.models.projection import fit_projection
    from uniembed.train import load_head

    fs, names, _ = load_features([str(fdir)])
    feats = np.asarray(fs.features, np.float32)
    emb = {"labels": np.asarray(names).astype(str), "domains": np.asarray(fs.domains).astype(str)}
    emb["adapted"] = fit_projection(feats, "pcaw256").apply(feats)
    for d in sorted(set(emb["domains"].tolist())):
        run = runs / f"lodo-{d}"
        if not (run / "head.pt").is_file():
            raise SystemExit(f"no leave-one-domain-out run for {d} at {run} (run `make model` first)")
        emb[f"head:{d}"] = l2n(head_embeddings(load_head(run)[0], feats))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, **emb)
    atomic_write_text(stamp_file, json.dumps(stamp, indent=1))
    return emb


def measure(emb: dict[str, np.ndarray], console) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{embedding: {setting: {variant: {domain: mP@5}}}} over the whole grid."""
    from rich.progress import Progress, TimeElapsedColumn

    labels, domains = emb["labels"], emb["domains"]
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    doms = sorted(set(domains.tolist()))
    jobs = [("adapted", "adapted", None)] + [("model", f"head:{d}", d) for d in doms]
    per_query: dict[str, dict[str, dict[str, np.ndarray]]] = {"adapted": {}, "model": {}}
    progress = Progress(*Progress.get_default_columns(), TimeElapsedColumn(), console=console)
    task = progress.add_task("databases scored", total=len(jobs) * (1 + len(NS) * len(ALPHAS)))
    with progress:
        for name, col, dom in jobs:
            t0 = time.perf_counter()
            x = np.ascontiguousarray(emb[col], np.float32)
            rows = np.arange(len(x)) if dom is None else np.flatnonzero(domains == dom)
            scores = score_rows(x, rows, codes, counts, lambda: progress.advance(task))
            for s, by_var in scores.items():
                for v, p in by_var.items():
                    per_query[name].setdefault(s, {}).setdefault(v, np.full(len(x), np.nan))[rows] = p
            what = "all domains" if dom is None else f"left-out {dom}"
            console.print(f"  {name} ({what}): {len(rows)} queries, {time.perf_counter() - t0:.0f}s")
    return {
        name: {
            s: {v: {d: float(np.nanmean(p[domains == d])) for d in doms} for v, p in by_var.items()}
            for s, by_var in settings.items()
        }
        for name, settings in per_query.items()
    }


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, default=FEATURES)
    ap.add_argument("--runs", type=Path, default=RUNS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from report.json")
    args = ap.parse_args(argv)
    console = Console()
    t0 = time.perf_counter()
    if args.report_only:
        saved = json.loads((args.out / "report.json").read_text())
        results, t0 = saved["results"], t0 - saved["seconds"]
    else:
        emb = load_embeddings(args.features, args.runs, args.out)
        console.print(f"embeddings of {len(emb['labels'])} images ready ({time.perf_counter() - t0:.0f}s)")
        results = measure(emb, console)
    write_outputs(results, {e: choose(r) for e, r in results.items()}, args.out, time.perf_counter() - t0)
    console.print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
