"""The /duplicates/view page in headless Chromium: groups with thumbnails, the threshold slider, counts.

The service runs in a uvicorn thread of this process (the app built as `uniembed serve` builds it, plus the
duplicate routes); Playwright drives the system /usr/bin/chromium. Skips with a clear reason without it.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator

import pytest

from uniembed.serve.index import build_index
from uniembed_lab.scaffold.background import chromium_page, find_chromium, free_port
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

CHROMIUM = find_chromium()

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian chromium not installed (apt-get install chromium, or `make system-deps`); "
        "browser test skipped",
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("playwright.sync_api", reason="playwright Python package not installed")
    import httpx
    import uvicorn

    from uniembed.serve.app import create_app
    from uniembed.serve.dedup_routes import add_duplicate_routes

    root = tmp_path_factory.mktemp("dup_page")
    model = make_tiny_model(root / "saved_model.pt")
    imgs = make_synthetic_images(root / "imgs", labels=3, per_label=4)
    shutil.copy(imgs[0], root / "imgs" / "label0" / "copy.jpg")
    build_index(model, [root / "imgs"], root / "idx", progress=False)
    app = create_app(root / "idx", model)
    if not any(getattr(r, "path", "") == "/duplicates" for r in app.routes):  # until create_app adds them
        add_duplicate_routes(app)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


def test_duplicates_page_shows_groups_and_follows_the_threshold(server: str) -> None:
    from playwright.sync_api import expect

    with chromium_page(CHROMIUM, 1200, 800) as (page, errors):
        page.goto(server + "/duplicates/view")
        groups = page.locator("#groups .group")
        expect(page.locator("#status")).to_contain_text("groups at threshold", timeout=15_000)
        # Threshold 0: only the byte-identical copy and its original, shown as "identical".
        page.locator("#threshold").fill("0")
        expect(page.locator("#threshold-value")).to_have_text("0.00")
        expect(groups).to_have_count(1, timeout=15_000)
        expect(groups.first).to_contain_text("identical")
        expect(groups.first.locator(".member")).to_have_count(2)
        expect(page.locator("#counts")).to_contain_text("1 groups · 2 of 13 images in groups")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#groups img')]"
            ".every(i => i.complete && i.naturalWidth > 0)",
            timeout=15_000,
        )
        # A wide threshold links each synthetic label's images: 3 groups holding all 13 images.
        page.locator("#threshold").fill("0.2")
        expect(groups).to_have_count(3, timeout=15_000)
        expect(page.locator("#counts")).to_contain_text("13 of 13 images in groups")
        expect(page.locator("#status")).to_contain_text("3 groups at threshold 0.2")
        page.locator("#reset").click()
        expect(page.locator("#status")).not_to_contain_text("threshold 0.2", timeout=15_000)
        assert errors == []
