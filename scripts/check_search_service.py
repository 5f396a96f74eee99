"""Acceptance check of image search (issue #4), run after `make model`.

Holds out one photo of every packaged product, indexes all the other shared photos with `uniembed index`,
starts `uniembed serve` on loopback, POSTs each held-out photo to /search and counts how often its product is
among the top 5. With --screenshot it also uploads one query through the web page in headless Chromium and
saves the page (the README's picture).

    .venv/bin/python scripts/check_search_service.py --model artifacts/model/saved_model.pt \
        --out artifacts/search_check --screenshot docs/search_page.png
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import httpx

from uniembed.core.paths import shared_data_dir
from uniembed.data.sources import write_labels_csv
from uniembed_lab.scaffold.background import CHROMIUM_ARGS, ServerProcess, find_chromium


def split_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(index rows, query rows): one held-out photo per packaged product, from the test split when present."""
    shared = shared_data_dir()
    if shared is None:
        sys.exit("../shared/data not found: nothing to check")
    rows: list[dict] = []
    for sub in ("grocery_store", "coil100"):
        with open(shared / sub / "labels.csv", newline="") as f:
            for r in csv.DictReader(f):
                rows.append({**r, "path": str(shared / sub / r["path"])})
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        if r["domain"] == "packaged_goods":
            by_label.setdefault(r["label"], []).append(r)
    queries = []
    for label in sorted(by_label):
        cands = [r for r in by_label[label] if "/test/" in r["path"]] or by_label[label]
        queries.append(rng.choice(sorted(cands, key=lambda r: r["path"])))
    held = {q["path"] for q in queries}
    return [r for r in rows if r["path"] not in held], queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("artifacts/model/saved_model.pt"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/search_check"))
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    index_rows, queries = split_rows()
    index_csv = args.out / "index_labels.csv"
    write_labels_csv(index_csv, index_rows)
    uniembed = str(Path(sys.executable).parent / "uniembed")
    idx = args.out / "index"
    subprocess.run(
        [uniembed, "index", "--model", str(args.model), "--images", str(index_csv), "--out", str(idx)],
        check=True,
    )
    hits, results = 0, []
    with ServerProcess(idx, args.model) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        for q in queries:
            with open(q["path"], "rb") as f:
                r = client.post(
                    "/search", files={"image": (Path(q["path"]).name, f, "image/jpeg")}, data={"k": 5}
                )
            r.raise_for_status()
            labels = [x["label"] for x in r.json()["results"]]
            ok = q["label"] in labels
            hits += ok
            results.append({"query": q["path"], "label": q["label"], "top5": labels, "found": ok})
        if args.screenshot:
            screenshot(srv.url, Path(queries[0]["path"]), args.screenshot)
    summary = {
        "products": len(queries),
        "found_in_top5": hits,
        "fraction": hits / len(queries),
        "index_images": len(index_rows),
        "model": str(args.model),
        "results": results,
    }
    (args.out / "search_check.json").write_text(json.dumps(summary, indent=2))
    print(
        f"held-out packaged-product photos whose product is in the top 5: {hits}/{len(queries)} "
        f"({hits / len(queries):.1%}); index of {len(index_rows)} images; details in {args.out}"
    )


def screenshot(url: str, query: Path, out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.goto(url + "/")
        page.set_input_files("#file", str(query))
        expect(page.locator("#results .result").first).to_be_visible(timeout=30_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#results img')]"
            ".every(i => i.complete && i.naturalWidth > 0)",
            timeout=30_000,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
