"""End-to-end in headless Debian Chromium: upload a real grocery photo through the web page, see the results.

Runs against a real ``uniembed serve`` process on a free loopback port. Uses the system's /usr/bin/chromium
via Playwright's Python driver; nothing downloads a browser. Skips with a clear reason without chromium.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from uniembed.core.paths import repo_root
from uniembed.serve.index import build_index
from uniembed_lab.scaffold.background import ServerProcess, chromium_page, find_chromium
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


EDIT_TOKEN = "page-test-token"


@pytest.fixture(scope="module")
def built(small_labels_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny model, its index of the small set), built once for every server here."""
    pytest.importorskip("playwright.sync_api", reason="playwright Python package not installed")
    root = tmp_path_factory.mktemp("browser")
    model = make_tiny_model(root / "saved_model.pt")
    build_index(model, [small_labels_csv], root / "idx", progress=False)
    return model, root / "idx"


@pytest.fixture(scope="module")
def server(built: tuple[Path, Path]):
    model, idx = built
    with ServerProcess(idx, model, extra_args=["--max-upload-mb", "2"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def edit_server(built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """A server with edits on, over its own copy of the index (edits rewrite the folder)."""
    model, idx = built
    copy = tmp_path_factory.mktemp("browser_edits") / "idx"
    shutil.copytree(idx, copy)
    args = ["--max-upload-mb", "2", "--allow-edits", "--edit-token", EDIT_TOKEN]
    with ServerProcess(copy, model, extra_args=args) as srv:
        yield srv


def grocery_query(small_labels_csv: Path) -> Path:
    import csv

    with open(small_labels_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["domain"] == "packaged_goods"]
    return Path(rows[1]["path"])


def test_upload_through_page_shows_results(
    server: ServerProcess, small_labels_csv: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    query = grocery_query(small_labels_csv)
    shot = repo_root() / "artifacts" / "screenshots" / "search_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with chromium_page(CHROMIUM, 1280, 820) as (page, errors):
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
    from playwright.sync_api import expect

    rows = _rows(small_labels_csv)
    produce = sum(r["domain"] == "produce" for r in rows)
    shot = repo_root() / "artifacts" / "screenshots" / "search_filters.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with chromium_page(CHROMIUM, 1280, 900) as (page, errors):
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


def _card_ids(cards) -> list[int]:
    srcs = cards.locator("img").evaluate_all("els => els.map(e => e.getAttribute('src'))")
    return [int(s.rsplit("/", 1)[-1]) for s in srcs]


def test_add_and_remove_through_the_page(edit_server: ServerProcess, small_labels_csv: Path) -> None:
    """With edits on: a wrong token shows the 403; the right one (kept in sessionStorage, not the URL) adds
    the query image, which the re-run search finds at distance 0; adding it again is a 409; removing a result
    (after confirm) drops it from the re-run search."""
    from playwright.sync_api import expect

    n = len(_rows(small_labels_csv))
    with chromium_page(CHROMIUM, 1280, 900) as (page, errors):
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
        page.goto(server_url := edit_server.url + "/")
        expect(page.locator("#health")).to_contain_text("edits on", timeout=15_000)
        expect(page.locator("#edits")).to_be_visible()
        status, cards = page.locator("#status"), page.locator("#results .result")

        page.select_option("#k", "5")
        page.set_input_files("#file", str(grocery_query(small_labels_csv)))
        expect(status).to_contain_text("5 results", timeout=20_000)
        page.fill("#token", "not-the-token")
        page.click("#add")
        expect(status).to_contain_text("error 403: wrong edit token (check the edit token)", timeout=10_000)
        expect(status).to_have_class("status error")

        page.fill("#token", EDIT_TOKEN)
        page.fill("#add-label", "added_from_page")
        page.click("#add")
        expect(page.locator("#edit-msg")).to_contain_text(
            f"added #{n} (added_from_page); {n + 1} images", timeout=30_000
        )
        expect(status).to_contain_text("5 results", timeout=20_000)
        assert n in _card_ids(cards)
        added = cards.nth(_card_ids(cards).index(n))
        expect(added.locator(".distance")).to_have_text("distance 0.000")
        expect(added.locator(".label")).to_contain_text("added_from_page")
        assert page.evaluate("sessionStorage.getItem('uniembed.editToken')") == EDIT_TOKEN
        assert EDIT_TOKEN not in page.url and page.url == server_url

        page.click("#add")
        expect(status).to_contain_text(f"error 409: already indexed as id {n}", timeout=20_000)

        page.click("#again")
        expect(status).to_contain_text("5 results", timeout=20_000)
        gone = _card_ids(cards)[1]
        cards.nth(1).locator("button.remove").click()
        expect(page.locator("#edit-msg")).to_contain_text(f"removed #{gone}; {n} images", timeout=30_000)
        expect(status).to_contain_text("5 results", timeout=20_000)
        expect(page.locator(f"#results img[src='/thumb/{gone}']")).to_have_count(0)
        assert gone not in _card_ids(cards) and len(dialogs) == 1 and f"#{gone}" in dialogs[0]
        assert not errors, errors


def test_expansion_checkbox_and_no_edit_controls_when_edits_are_off(
    server: ServerProcess, small_labels_csv: Path
) -> None:
    """Unchecking "query expansion" sends expand=false on uploads and on "more like this"; checked, it sends
    nothing. Edits are off on this server: no edit fieldset, no remove buttons."""
    from playwright.sync_api import expect

    with chromium_page(CHROMIUM, 1280, 900) as (page, errors):
        # Chromium hands Playwright no body for a multipart upload: record the page's fetch calls instead.
        page.add_init_script(
            "window.sent = []; const f0 = window.fetch; window.fetch = (url, init = {}) => {"
            " const b = init.body instanceof FormData ? [...init.body.entries()]"
            ".filter(([, v]) => typeof v === 'string') : null;"
            " if (String(url).startsWith('/search')) sent.push([init.method || 'GET', String(url), b]);"
            " return f0(url, init); };"
        )
        page.goto(server.url + "/")
        expect(page.locator("#health")).to_contain_text("images", timeout=15_000)
        assert page.evaluate("fetch('/health').then(r => r.json()).then(h => h.edits)") is False
        expect(page.locator("#edits")).to_be_hidden()
        expect(page.locator("#expand")).to_be_checked()
        status, cards = page.locator("#status"), page.locator("#results .result")

        page.set_input_files("#file", str(grocery_query(small_labels_csv)))
        expect(status).to_contain_text("10 results", timeout=20_000)
        expect(cards.locator("button.remove")).to_have_count(10)
        expect(cards.locator("button.remove").first).to_be_hidden()
        searched = {"url_or_predicate": lambda r: "/search" in r.url, "timeout": 20_000}
        with page.expect_response(**searched):
            page.locator("#expand").uncheck()  # re-runs the upload search
        expect(status).to_contain_text("10 results", timeout=20_000)
        with page.expect_response(**searched):
            cards.first.locator("button.more").click()
        expect(status).to_contain_text("10 results", timeout=20_000)
        expect(page.locator("#drop-text")).to_contain_text("more like #")
        with page.expect_response(**searched):
            page.locator("#expand").check()
        expect(status).to_contain_text("10 results", timeout=20_000)

        sent = page.evaluate("window.sent")
        posts = [dict(body) for method, _, body in sent if method == "POST"]
        gets = [url for method, url, _ in sent if method == "GET"]
        assert len(posts) == 2 and len(gets) == 2, sent
        assert "expand" not in posts[0] and posts[1]["expand"] == "false"
        assert "expand=false" in gets[0] and "expand" not in gets[1]
        assert not errors, errors
