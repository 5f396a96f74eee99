"""Fuzz of ``POST /search`` with mutated real JPEG/PNG/WebP/TIFF uploads (in-process app, tiny model): every
answer is 200, a 4xx with a reason, or 503 (busy), never another 5xx, an exception or a hang. Plus the soak's
own judgement and index check, and (slow) a half-minute run of the soak itself."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uniembed_lab import soak
from uniembed_lab.fuzz import (
    ALLOWED_OUTCOMES,
    UPLOAD_VARIANTS,
    classify_response,
    message_class,
    post_upload,
    upload_app,
    with_timeout,
)
from uniembed_lab.image_mutations import cases, mutate, seed_images, set_dimensions
from uniembed_lab.soak import judge

SEEDS = seed_images()

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's corrupt-EXIF chatter, by design


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_upload")


@pytest.fixture(scope="module")
def client(work: Path) -> TestClient:
    return upload_app(work)


def test_classification_separates_clean_answers_from_failures() -> None:
    assert classify_response(200, "{}").kind == "ok"
    assert classify_response(503, '{"detail": "busy"}').kind == "busy"
    clean = classify_response(422, '{"detail": "cannot decode image: truncated: 12 bytes not processed"}')
    assert (clean.kind, clean.cls) == ("clean", "422 cannot decode image: truncated")
    assert classify_response(413, "not json").kind == "clean"
    for status in (500, 502, 504):
        assert classify_response(status, '{"detail": "internal error: KeyError"}').kind == "failure"
    assert (
        message_class("image is 9000x9000 = 81.0 MP; at most 40.0 MP") == "image is NxN = N MP; at most N MP"
    )


def test_every_format_uploads_and_forged_sizes_get_a_4xx(client: TestClient) -> None:
    for s in SEEDS:
        assert post_upload(client, s.data, s.fmt, "multipart").kind == "ok", s.name
        for w, h in ((65535, 65535), (100_000, 100_000), (12000, 12000)):
            out = post_upload(client, set_dimensions(s.data, w, h), s.fmt, "multipart")
            assert out.kind == "clean" and out.cls[:1] == "4", (s.name, w, h, out)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases(SEEDS), variant=st.sampled_from(UPLOAD_VARIANTS))
def test_search_upload_never_fails(client: TestClient, case, variant: str) -> None:
    seed, ops = case
    data = mutate(seed.data, ops)
    outcome = with_timeout(lambda: post_upload(client, data, seed.fmt, variant))
    assert outcome.kind in ALLOWED_OUTCOMES, (seed.name, ops, variant, outcome)


def test_soak_judges_each_answer() -> None:
    assert judge("good", 200, "{}")[0] == "ok"
    assert judge("good", 503, '{"detail": "busy"}')[0] == "busy"
    assert judge("good", 422, '{"detail": "cannot decode image"}')[0] == "failure"  # a real photo refused
    assert judge("garbage", 200, "{}")[0] == "failure"  # noise must not be accepted as a picture
    assert judge("truncated", 200, "{}")[0] == "ok"  # a cut photo may still decode
    assert judge("empty", 400, '{"detail": "empty upload"}')[0] == "clean"
    assert judge("forged", 500, '{"detail": "internal error"}')[0] == "failure"
    assert soak.lost_answer("good", httpx.ReadError("reset"))[0] == "failure"
    # The server drains a refused body before its 413, so a lost 413 is a failure too.
    assert soak.lost_answer("oversized", httpx.ReadError("reset"))[:2] == ("failure", "lost 413: ReadError")


def test_soak_index_check_sees_a_wrong_index(
    work: Path, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_index accepts the index that holds exactly the expected images and flags one that does not
    (`uniembed search` answered in-process here: the slow soak test runs the real command)."""
    from uniembed.serve.index import ImageIndex, search_paths

    def search_cli(*args: str, timeout: float = 0) -> subprocess.CompletedProcess:
        assert args[0] == "search" and "--json" in args
        hits = search_paths(args[args.index("--index") + 1], [args[1]], k=1)[0]
        return subprocess.CompletedProcess(args, 0, json.dumps([{"query": args[1], "results": hits}]), "")

    monkeypatch.setattr(soak, "uniembed", search_cli)
    paths = [it["path"] for it in ImageIndex.load(work / "idx").items]
    ok = soak.check_index(work / "idx", paths)
    assert ok["consistent"] and ok["search_newest_finds_itself"], ok
    short = soak.check_index(work / "idx", paths[:-1])
    assert not short["consistent"] and short["unexpected"] and short["vectors"] == short["expected"] + 1


@pytest.mark.slow
def test_soak_quarter_minute(tmp_path: Path) -> None:
    """`make soak` in small: real server, mixed uploads, concurrent `index --add`, report and checks."""
    rc = soak.main(["--minutes", "0.25", "--clients", "2", "--interval", "4", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0 and rep["passed"], rep["checks"]
    assert rep["requests"] > 50 and rep["add_runs"]["ok"] >= 1 and rep["index"]["consistent"]
    assert {"good", "garbage", "empty"} <= {k.split(" ->")[0] for k in rep["by_kind_and_class"]}
    assert (tmp_path / "report.png").stat().st_size > 10_000
