"""Fuzz of ``load_image`` with mutated real JPEG/PNG/WebP/TIFF bytes (uniembed_lab.fuzz): only
``BadImageError`` ever escapes, nothing hangs, and a forged header claiming a huge size is refused before it
is allocated."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from uniembed_lab.fuzz import ALLOWED_OUTCOMES, check_load_image, with_timeout
from uniembed_lab.image_mutations import apply_op, cases, mutate, seed_images, segments, set_dimensions

SEEDS = seed_images()

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's corrupt-EXIF chatter, by design


def test_seeds_cover_every_format_and_decode() -> None:
    assert {s.fmt for s in SEEDS} == {"JPEG", "PNG", "WEBP", "TIFF"}
    for s in SEEDS:
        assert Image.open(io.BytesIO(s.data)).format == s.fmt
        assert check_load_image(s.data).kind == "ok", s.name


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s.name)
def test_mutators_forge_the_header_of_each_format(seed) -> None:
    """The header mutation really changes what the decoder reads, so the fuzz reaches the size checks."""
    forged = set_dimensions(seed.data, 9000, 7000)
    assert len(forged) == len(seed.data)
    assert Image.open(io.BytesIO(forged)).size == (9000, 7000)
    assert Image.open(io.BytesIO(set_dimensions(seed.data, 33, 17))).size == (33, 17)


def test_segments_and_chunk_duplication_follow_the_container() -> None:
    by_fmt = {s.fmt: s.data for s in SEEDS}
    png = by_fmt["PNG"]
    kinds = [png[p + 4 : p + 8] for p, _ in segments(png)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    jpeg_markers = [by_fmt["JPEG"][p + 1] for p, _ in segments(by_fmt["JPEG"])]
    assert 0xDB in jpeg_markers and jpeg_markers[-1] == 0xDA  # quantisation tables ... start of scan
    assert by_fmt["WEBP"][12:16] in (b"VP8 ", b"VP8L", b"VP8X")
    doubled = apply_op(png, ("dup_chunk", 0, 1))  # a second IHDR right after the first
    assert doubled[33 + 4 : 33 + 8] == b"IHDR" and len(doubled) == len(png) + 25
    assert mutate(png, [("truncate", 100)]) == png[:100]
    assert apply_op(png, ("flip", 0, 0))[0] == png[0] ^ 1


@settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases(SEEDS))
def test_load_image_returns_rgb_or_raises_bad_image_error(case) -> None:
    seed, ops = case
    data = mutate(seed.data, ops)
    outcome = with_timeout(lambda: check_load_image(data))
    assert outcome.kind in ALLOWED_OUTCOMES, (seed.name, ops, outcome)


FORGED_SCRIPT = textwrap.dedent(
    """
    import json, resource, warnings
    warnings.simplefilter("ignore")
    from uniembed.data.images import BadImageError, load_image
    from uniembed_lab.image_mutations import seed_images, set_dimensions

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    seeds = seed_images()
    for s in seeds:
        load_image(s.data)  # warm every decoder once, so the baseline includes their code and tables
    before, reasons = peak(), {}
    # Over twice the limit Pillow refuses at open; 12000x12000 (144 MP) only load_image's own check stops.
    claims = [(65535, 65535), (100_000, 100_000), (2**32 - 1, 2**32 - 1), (16383, 16383), (12000, 12000)]
    for s in seeds:
        for w, h in claims:
            try:
                load_image(set_dimensions(s.data, w, h))
                reasons[f"{s.name} {w}x{h}"] = "decoded"
            except BadImageError as e:
                reasons[f"{s.name} {w}x{h}"] = e.reason
        try:  # a caller's smaller budget is honoured the same way
            load_image(set_dimensions(s.data, 4000, 4000), max_pixels=1_000_000)
            reasons[f"{s.name} 4000x4000 budget 1MP"] = "decoded"
        except BadImageError as e:
            reasons[f"{s.name} 4000x4000 budget 1MP"] = e.reason
    print(json.dumps({"reasons": reasons, "growth_mb": peak() - before}))
    """
)


def test_forged_huge_headers_are_refused_before_allocating() -> None:
    """Every format, every claim over the pixel limit: 'decompression bomb' from the header alone. A fresh
    process, so its peak RSS shows any allocation the claims caused (10^10 pixels would be 30 GB)."""
    p = subprocess.run([sys.executable, "-c", FORGED_SCRIPT], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(res["reasons"]) == len(SEEDS) * 6
    wrong = {k: v for k, v in res["reasons"].items() if v != "decompression bomb"}
    assert not wrong, wrong
    assert res["growth_mb"] < 32, res


def test_fuzz_command_counts_outcomes_and_bounds_memory(tmp_path: Path) -> None:
    """`python -m uniembed_lab.fuzz` (what `make fuzz` runs), small: counts by outcome, no failure, and the
    process peak stays under 1 GiB: room for a few full-size RGB copies of an image at Pillow's pixel limit
    (a header claiming more is refused), nowhere near what a forged 10^10-pixel header would take."""
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "uniembed_lab.fuzz",
        "--cases",
        "120",
        "--target",
        "load_image",
        "--out",
        str(out),
        "--failures",
        str(tmp_path / "failures"),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "load_image: 120 cases" in p.stdout and "process peak" in p.stdout
    (res,) = json.loads(out.read_text())["results"]
    assert res["cases"] == 120 and not res["failures"]
    assert set(res["by_kind"]) <= set(ALLOWED_OUTCOMES) and res["by_kind"].get("clean", 0) > 0
    assert set(res["by_format"]) == {"JPEG", "PNG", "WEBP", "TIFF"}
    assert res["peak_rss_mb"] < 1024, res["peak_case"]
    assert not (tmp_path / "failures").exists()
