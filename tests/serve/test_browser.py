"""End-to-end in headless Debian Chromium: upload a real grocery photo through the web page, see the results.

Runs against a real ``uniembed serve`` process on a free loopback port. Uses the system's /usr/bin/chromium
via Playwright's Python driver; nothing downloads a browser. Skips with a clear reason without chromium.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from uniembed.core.paths import repo_root
from uniembed.serve.index import build_index
from uniembed_lab.scaffold.background import CHROMIUM_ARGS, ServerProcess, find_chromium
from uniembed_lab.scaffold.tiny_model import make_tiny_model

CHROMIUM = find_chromium()

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian chromium not installed (apt-get install chromium, or "
        "`make system-deps`); browser test skipped",
    ),
]


@pytest.fixture(scope="module")
def server(small_labels_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("playwright.sync_api", reason="playwright Python package not installed")
    root = tmp_path_factory.mktemp("browser")
    model = make_tiny_model(root / "saved_model.pt")
    build_index(model, [small_labels_csv], root / "idx", progress=False)
    with ServerProcess(root / "idx", model, extra_args=["--max-upload-mb", "2"]) as srv:
        yield srv


def grocery_query(small_labels_csv: Path) -> Path:
    import csv

    with open(small_labels_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["domain"] == "packaged_goods"]
    return Path(rows[1]["path"])


def test_upload_through_page_shows_results(
    server: ServerProcess, small_labels_csv: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    query = grocery_query(small_labels_csv)
    shot = repo_root() / "artifacts" / "screenshots" / "search_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            n = len(_rows(small_labels_csv))
            expect(page.locator("#health")).to_contain_text(f"{n} images", timeout=15_000)

            page.select_option("#k", "10")
            page.set_input_files("#file", str(query))
            cards = page.locator("#results .result")
            expect(cards).to_have_count(10, timeout=20_000)
            expect(page.locator("#status")).to_contain_text("10 results")
            # The query itself is indexed: it must come first, at distance 0, with its label.
            label = next(r for r in _rows(small_labels_csv) if r["path"] == str(query))["label"]
            expect(cards.first.locator(".label")).to_contain_text(label)
            expect(cards.first.locator(".distance")).to_contain_text("distance 0.000")
            # Every thumbnail actually loaded (naturalWidth > 0), served from /thumb/<id>.
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')]"
                ".every(i => i.complete && i.naturalWidth > 0)",
                timeout=15_000,
            )
            srcs = cards.locator("img").evaluate_all("els => els.map(e => e.getAttribute('src'))")
            assert all(s.startswith("/thumb/") for s in srcs)
            page.screenshot(path=str(shot), full_page=True)

            # A non-image upload shows the service's error instead of results.
            bad = tmp_path / "notes.txt"
            bad.write_text("not an image")
            page.set_input_files("#file", str(bad))
            expect(page.locator("#status")).to_contain_text("Error 415", timeout=10_000)
            expect(cards).to_have_count(0)
            assert not errors, errors
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


def _rows(csv_path: Path) -> list[dict]:
    import csv

    with open(csv_path) as f:
        return list(csv.DictReader(f))


def test_filters_threshold_and_more_like_this_on_the_page(
    server: ServerProcess, small_labels_csv: Path
) -> None:
    """Domain filter + result counts, "more like this" from a card, the threshold slider, a bad filter's
    422 shown on the page, and the link to the duplicates view."""
    from playwright.sync_api import expect, sync_playwright

    rows = _rows(small_labels_csv)
    produce = sum(r["domain"] == "produce" for r in rows)
    shot = repo_root() / "artifacts" / "screenshots" / "search_filters.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            domains = {r["domain"] for r in rows}
            expect(page.locator("#domain option")).to_have_count(len(domains) + 1, timeout=15_000)
            assert page.locator("#dup-link").get_attribute("href") == "/duplicates/view"

            page.select_option("#domain", "produce")
            page.select_option("#k", "10")
            page.set_input_files("#file", str(grocery_query(small_labels_csv)))
            cards = page.locator("#results .result")
            status = page.locator("#status")
            expect(status).to_contain_text(f"10 results of {produce} matching", timeout=20_000)
            assert set(cards.locator(".domain").all_inner_texts()) == {"produce"}

            cards.first.locator("button.more").click()
            expect(page.locator("#status")).to_contain_text(f"of {produce - 1} matching", timeout=20_000)
            expect(page.locator("#drop-text")).to_contain_text("more like #")
            item = page.locator("#preview").get_attribute("src")
            assert item and item.startswith("/thumb/")
            srcs = cards.locator("img").evaluate_all("els => els.map(e => e.getAttribute('src'))")
            assert len(srcs) == 10 and item not in srcs
            assert set(cards.locator(".domain").all_inner_texts()) == {"produce"}
            dists = [float(t.split()[-1]) for t in cards.locator(".distance").all_inner_texts()]

            # A slider stop (0.01 steps) that keeps some of them but not all, clear of any shown distance.
            cut = next(
                c / 100
                for c in range(1, 200)
                if 0 < sum(d <= c / 100 for d in dists) < 10 and min(abs(d - c / 100) for d in dists) > 0.002
            )
            page.locator("#maxdist").evaluate(
                "(el, v) => { el.value = v; el.dispatchEvent(new Event('input'));"
                " el.dispatchEvent(new Event('change')); }",
                str(cut),
            )
            expect(page.locator("#maxdist-value")).to_have_text(f"{cut:.2f}")
            expect(page.locator("#status")).to_contain_text(f"within {cut}", timeout=20_000)
            kept = [float(t.split()[-1]) for t in cards.locator(".distance").all_inner_texts()]
            assert kept == [d for d in dists if d <= cut] and 0 < len(kept) < 10
            page.screenshot(path=str(shot), full_page=True)

            page.fill("#more-filters", "shape=round")
            page.locator("#more-filters").dispatch_event("change")
            expect(page.locator("#status")).to_contain_text("Error 422: unknown filter column 'shape'")
            expect(cards).to_have_count(0)
            assert not errors, errors
        finally:
            browser.close()
