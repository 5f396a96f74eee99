"""Property-based fuzz of image decoding and of the upload endpoint with mutated real image bytes.

Why: damaged files and hostile uploads must end as one clean, countable answer (``BadImageError`` from
``load_image``; a 4xx, or 503 when the service is busy, from ``POST /search``), never as a crash, a 500, a
hang or an allocation the size a forged header claims. hypothesis draws the cases (a seed photo plus a few
mutations, see ``uniembed_lab.image_mutations``), so a run is reproducible from its seed.

``python -m uniembed_lab.fuzz --cases 2000`` runs both targets and prints the outcome counts and peak RSS;
the tests (tests/data/test_fuzz_images.py, tests/serve/test_fuzz_upload.py) run a few hundred cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniembed_lab.image_mutations import Seed, cases, mutate, seed_images

FAILURES_DIR = Path("/tmp/fuzz_failures")
#: Seconds one case may take before it counts as a hang.
CASE_TIMEOUT = 20.0
#: Outcomes that are fine: decoded, rejected with a reason (BadImageError / 4xx), or busy (503).
ALLOWED_OUTCOMES = ("ok", "clean", "busy")


@dataclass
class Outcome:
    """What one case did: ``kind`` ok / clean (a reasoned rejection) / busy (503) / failure; ``cls`` groups
    it for the counts; ``detail`` says what happened."""

    kind: str
    cls: str
    detail: str = ""


# --------------------------------------------------------------------------------------------- the targets
def with_timeout(fn: Callable[[], Outcome], seconds: float = CASE_TIMEOUT) -> Outcome:
    """Run one case in a daemon thread: a decoder that never returns becomes a ``hang`` failure, not a stuck
    run (the thread is left behind; the process ends anyway)."""
    box: list[Outcome] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # noqa: BLE001 - anything escaping the target is the finding itself
            box.append(Outcome("failure", f"crash {type(e).__name__}", str(e)[:300]))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return box[0] if box else Outcome("failure", "hang", f"no answer in {seconds:g} s")


def check_load_image(data: bytes) -> Outcome:
    """``load_image`` must return an RGB image or raise ``BadImageError``; anything else is a failure."""
    from uniembed.data.images import BadImageError, load_image

    try:
        im = load_image(data)
    except BadImageError as e:
        return Outcome("clean", e.reason, str(e)[:200])
    except Exception as e:  # noqa: BLE001 - an escaping exception type is what the fuzz looks for
        return Outcome("failure", f"unhandled {type(e).__name__}", str(e)[:300])
    if im.mode != "RGB" or min(im.size) < 1:
        return Outcome("failure", "bad result", f"mode {im.mode} size {im.size}")
    return Outcome("ok", "decoded")


def message_class(detail: str) -> str:
    """A countable class of a 4xx message: its first two ``:``-separated parts, without numbers."""
    import re

    head = ":".join(detail.split(":")[:2]).strip()
    return re.sub(r"\d+(\.\d+)?", "N", head)[:90]


def classify_response(status: int, body: str) -> Outcome:
    """200 ok; 503 busy; any other 4xx clean (by message class); 5xx or anything else a failure."""
    if status == 200:
        return Outcome("ok", "200")
    if status == 503:
        return Outcome("busy", "503")
    try:
        detail = str(json.loads(body).get("detail", ""))
    except (ValueError, AttributeError):
        detail = body[:200]
    if 400 <= status < 500:
        return Outcome("clean", f"{status} {message_class(detail)}", detail[:200])
    return Outcome("failure", f"http {status}", detail[:300])


#: How the bytes are sent, weighted by repetition: mostly the browser's multipart form, so most cases reach
#: the decoder (a second ``image`` field is refused before decoding).
UPLOAD_VARIANTS = ("multipart",) * 5 + ("multipart-octet", "raw", "two-fields")
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff"}


def post_upload(client: Any, data: bytes, fmt: str, variant: str) -> Outcome:
    """One ``POST /search`` of ``data`` as the ``variant`` says (``client``: an httpx-compatible client)."""
    mime = MIME.get(fmt, "application/octet-stream")
    if variant == "raw":
        r = client.post("/search", content=data, headers={"content-type": mime})
    elif variant == "two-fields":
        r = client.post("/search", files=[("image", ("a", data, mime)), ("image", ("b", data, mime))])
    else:
        mime = "application/octet-stream" if variant == "multipart-octet" else mime
        r = client.post("/search", files={"image": ("upload", data, mime)}, data={"k": "3"})
    return classify_response(r.status_code, r.text)


def upload_app(work: Path) -> Any:
    """An in-process TestClient over the real app with the tiny model and a small synthetic index (app
    defaults otherwise); server-side exceptions come back as responses, not raised here."""
    from fastapi.testclient import TestClient

    from uniembed.serve.app import create_app
    from uniembed.serve.index import build_index
    from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

    model = make_tiny_model(work / "saved_model.pt")
    make_synthetic_images(work / "imgs", labels=3, per_label=4)
    build_index(model, [work / "imgs"], work / "idx", progress=False)
    return TestClient(create_app(work / "idx", model), raise_server_exceptions=False)


# ------------------------------------------------------------------------------------------ report / CLI
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's own peak resident set so far: VmHWM, which starts afresh at exec. ``ru_maxrss`` (the
    fallback where /proc is missing; Linux reports KiB) keeps the peak of the process that forked this one,
    so a fuzz run started from a big pytest process reported pytest's size, not its own."""
    from uniembed_lab.bench.sysinfo import peak_rss_since_reset_mb

    own = peak_rss_since_reset_mb()
    return own if own is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_failure(target: str, data: bytes, outcome: Outcome, note: dict, out: Path = FAILURES_DIR) -> Path:
    """Write the failing bytes and what happened, named by content hash, for a one-line reproducer."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{target}-{hashlib.sha256(data).hexdigest()[:12]}.bin"
    path.write_bytes(data)
    meta = {"target": target, "kind": outcome.kind, "class": outcome.cls, "detail": outcome.detail, **note}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=repr))
    return path


@dataclass
class Tally:
    """Outcome counts of one target, plus what the cases covered."""

    target: str
    failures_dir: Path = FAILURES_DIR
    outcomes: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    peak_case: dict[str, Any] = field(default_factory=dict)

    def add(self, seed: Seed, ops: list[tuple], data: bytes, outcome: Outcome, extra: str = "") -> None:
        peak = peak_rss_mb()
        if peak > self.peak_case.get("peak_rss_mb", 0.0):  # the case that raised the process peak last
            self.peak_case = {
                "peak_rss_mb": round(peak),
                "seed": seed.name,
                "ops": repr(ops)[:300],
                "outcome": f"{outcome.kind}: {outcome.cls}",
            }
        self.outcomes[f"{outcome.kind}: {outcome.cls}"] += 1
        self.formats[seed.fmt] += 1
        self.ops.update(o[0] for o in ops)
        if outcome.kind not in ALLOWED_OUTCOMES:
            note = {"seed": seed.name, "ops": ops, "variant": extra}
            self.failures.append(str(save_failure(self.target, data, outcome, note, self.failures_dir)))

    def summary(self) -> dict[str, Any]:
        kinds = Counter(k.split(":")[0] for k in self.outcomes.elements())
        return {
            "target": self.target,
            "cases": sum(self.outcomes.values()),
            "by_kind": dict(kinds),
            "by_outcome": dict(self.outcomes.most_common()),
            "by_format": dict(self.formats),
            "by_op": dict(self.ops),
            "failures": self.failures,
            "peak_case": self.peak_case,
        }


def run_target(
    target: str, n_cases: int, seeds: list[Seed], seed: int, work: Path, failures_dir: Path = FAILURES_DIR
) -> dict[str, Any]:
    """Drive ``n_cases`` hypothesis cases through one target (``load_image`` or ``upload``); never stops
    at a failure: every one is counted and its bytes saved under ``failures_dir``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed
    from hypothesis import strategies as st

    tally = Tally(target, failures_dir)
    client = upload_app(work) if target == "upload" else None

    @hyp_seed(seed)
    @settings(
        max_examples=n_cases,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(seeds), variant=st.sampled_from(UPLOAD_VARIANTS))
    def one(case: tuple[Seed, list[tuple]], variant: str) -> None:
        s, ops = case
        data = mutate(s.data, ops)
        if client is None:
            tally.add(s, ops, data, with_timeout(lambda: check_load_image(data)))
        else:
            tally.add(s, ops, data, with_timeout(lambda: post_upload(client, data, s.fmt, variant)), variant)

    rss0, t0 = rss_mb(), time.perf_counter()
    one()
    res = tally.summary()
    res.update(
        seconds=round(time.perf_counter() - t0, 1), rss_start_mb=round(rss0), rss_end_mb=round(rss_mb())
    )
    res["peak_rss_mb"] = round(peak_rss_mb())
    return res


def print_summary(res: dict[str, Any]) -> None:
    print(f"\n{res['target']}: {res['cases']} cases in {res['seconds']} s  {res['by_kind']}")
    for name, n in res["by_outcome"].items():
        print(f"  {n:6d}  {name}")
    print(f"  formats {res['by_format']}  ops {res['by_op']}")
    print(f"  RSS {res['rss_start_mb']} -> {res['rss_end_mb']} MiB, process peak {res['peak_rss_mb']} MiB")
    if res["peak_case"]:
        pc = res["peak_case"]
        print(f"  peak set by {pc['seed']} {pc['ops'][:120]} -> {pc['outcome']}")
    for f in res["failures"][:20]:
        print(f"  FAILURE saved: {f}")


def main(argv: list[str] | None = None) -> int:
    """``python -m uniembed_lab.fuzz``: exit 1 if any case failed."""
    import tempfile

    p = argparse.ArgumentParser(prog="python -m uniembed_lab.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=2000, help="cases per target (default 2000)")
    p.add_argument("--target", choices=("all", "load_image", "upload"), default="all")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (same seed, same cases)")
    p.add_argument("--out", type=Path, default=Path("artifacts/fuzz/report.json"))
    p.add_argument("--failures", type=Path, default=FAILURES_DIR, help="failing inputs are saved here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # corrupt-EXIF chatter by design
    seeds = seed_images()
    print(f"seeds: {', '.join(f'{s.name} ({s.fmt}, {len(s.data)} B)' for s in seeds)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="uniembed-fuzz-") as work:
        for target in ("load_image", "upload") if args.target == "all" else (args.target,):
            results.append(run_target(target, args.cases, seeds, args.seed, Path(work), args.failures))
            print_summary(results[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seed": args.seed, "results": results}, indent=2))
    failed = sum(len(r["failures"]) for r in results)
    print(f"\nreport: {args.out}; {failed} failure(s)" + (f", bytes under {args.failures}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
