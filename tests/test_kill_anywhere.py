"""Kill-anywhere safety of the long commands, run as a user runs them (the CLI in a subprocess).

For prepare, extract, train, index --add and export: the command is killed with SIGKILL (its whole process
group, as ``kill -9`` of a job would) at seeded random points, several times, then run again (train with
``--resume`` once a checkpoint exists) until it finishes. Meanwhile its output folder is polled: every file
under a final name (not a hidden temporary) must load with the reader of its kind, whenever it is looked at,
and after each kill the folder must be a consistent whole (or absent). The finished result must then equal an
uninterrupted run's:

- prepare: shard tars byte for byte, manifest.json but its timestamps;
- extract: features.npy and meta.csv byte for byte, info.json but timings and resume counters;
- train: head.pt's tensors and selected epoch, the checkpoint's model and optimiser state, the validation;
- index --add: index.faiss, items.csv and every thumbnail byte for byte;
- export (TorchScript only: the ONNX export alone takes a minute here): saved_model.pt byte for byte (with a
  fixed PYTHONHASHSEED: TorchScript orders a module's constants by hash) and its outputs on fixed inputs.

Plus Ctrl-C: SIGINT to a running extract prints one line, exits 130, and the rerun resumes.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from uniembed.data.sources import write_labels_csv

pytestmark = [pytest.mark.slow, pytest.mark.shared_data, pytest.mark.filterwarnings("ignore::FutureWarning")]

SEED = 13
#: Kill attempts per stage, each at a seeded random point of the time an uninterrupted run spends writing.
KILLS = 3
ENV = {**os.environ, "PYTHONHASHSEED": "0"}
EXTRACT_ARGS = ["--batch-size", "4", "--workers", "1", "-q", "--checkpoint-seconds", "0.3"]
#: What each stage's kills did, printed at the end (pytest -s) for the record.
LOG: list[str] = []


def _cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "uniembed.cli", *map(str, args)]


def _run(*args: object) -> tuple[str, float]:
    """Run the CLI to completion; (stdout, wall seconds)."""
    t0 = time.monotonic()
    r = subprocess.run(_cmd(*args), env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    return r.stdout, time.monotonic() - t0


# ------------------------------------------------------------------------------------- what is visible


def check_file(p: Path) -> None:
    """Raise unless ``p`` is complete: it must load with the reader of its kind."""
    import torch
    import yaml
    from PIL import Image

    suffix = p.suffix
    if suffix == ".json":
        json.loads(p.read_text())
    elif suffix == ".jsonl":
        [json.loads(line) for line in p.read_text().splitlines()]
    elif suffix == ".yaml":
        assert isinstance(yaml.safe_load(p.read_text()), dict), p
    elif suffix == ".csv":
        with open(p, newline="") as f:
            rows = list(csv.reader(f))
        assert rows and all(len(r) == len(rows[0]) for r in rows), f"{p}: ragged rows"
    elif suffix == ".npy":
        np.load(p, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(p) as z:
            [z[k] for k in z.files]
    elif suffix == ".tar":
        with tarfile.open(p) as t:
            for m in t:
                if m.isfile():
                    assert len(t.extractfile(m).read()) == m.size  # type: ignore[union-attr]
    elif p.name in ("saved_model.pt", "query_model.pt"):
        torch.jit.load(str(p))
    elif suffix == ".pt":
        torch.load(p, map_location="cpu", weights_only=False)
    elif suffix in (".png", ".jpg"):
        with Image.open(p) as im:
            im.load()
    elif suffix == ".faiss":
        import faiss

        faiss.read_index(str(p))
    elif suffix == ".md":
        assert p.read_text().strip(), p
    else:
        raise AssertionError(f"unexpected output file {p}")


class Watcher:
    """Looks at every file under a final name below ``root`` (a path part starting with '.' is a temporary
    one) and checks each version of it (inode, size, mtime) once."""

    def __init__(self, root: Path):
        self.root = root
        self.seen: dict[Path, tuple[int, int, int]] = {}
        self.checked = 0

    def poll(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith("."):
                    self._check(Path(dirpath) / name)

    def _check(self, p: Path) -> None:
        try:
            st = p.stat()
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self.seen.get(p) == key:
                return
            check_file(p)
        except FileNotFoundError:
            # Removed while looked at (the checkpoints of a finished extraction), or its folder was between
            # the two renames of swap_dir_into_place. Not marked seen: if it is back, the next poll checks it.
            return
        self.seen[p] = key
        self.checked += 1


def _launch(
    args: list[object], watch: Watcher, started: Callable[[float], bool], kill_after: float | None
) -> tuple[int | None, str, float, float]:
    """Run the CLI in its own process group, polling ``watch`` all along; ``kill_after`` seconds after
    ``started(launch time)`` first holds (the command began writing), SIGKILL the group (None: never).

    Returns (exit status, or None when killed; stdout; seconds until it began writing; seconds in all)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        launched = time.time()
        proc = subprocess.Popen(_cmd(*args), env=ENV, stdout=out, stderr=err, start_new_session=True)
        t0 = time.monotonic()
        began: float | None = None
        try:
            while proc.poll() is None:
                assert time.monotonic() - t0 < 400, f"{args}: still running after 400 s"
                watch.poll()
                if began is None and started(launched):
                    began = time.monotonic()
                if began is not None and kill_after is not None and time.monotonic() - began >= kill_after:
                    break
                time.sleep(0.01)
        finally:
            killed = proc.poll() is None
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        total = time.monotonic() - t0
        watch.poll()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode()
        if not killed and proc.returncode != 0:
            raise AssertionError(f"{args}: exit {proc.returncode}\n{stdout}\n{err.read().decode()[-3000:]}")
    return (None if killed else 0), stdout, (began or time.monotonic()) - t0, total


def written_since(paths: list[Path], since: float) -> bool:
    """Whether one of ``paths`` was created or changed at or after ``since`` (a launch time)."""
    for p in paths:
        try:
            if p.stat().st_mtime >= since:
                return True
        except FileNotFoundError:
            continue
    return False


def kill_and_finish(
    stage: str,
    args: Callable[[Path], list[object]],
    ref: Path,
    out: Path,
    started: Callable[[Path, float], bool],
    whole: Callable[[Path], None],
    resumes: bool = False,
) -> tuple[str, str]:
    """Run ``args(ref)`` uninterrupted, then ``args(out)`` killed up to KILLS times at seeded random points
    of the time the uninterrupted run spent writing (``started(dir, launch)`` says it began), checking
    ``whole(out)`` after each kill, and once more to the end. Returns both finished runs' stdout.

    Kill points fall in the first 3/4 of that time, and for a command that ``resumes`` (less left to do
    after each kill) in its first 1/KILLS, so that most kills land before the command could finish."""
    _, ref_stdout, began, total = _launch(args(ref), Watcher(ref), lambda t: started(ref, t), None)
    window = max(0.2, total - began)
    rng = random.Random(f"{SEED}-{stage}")
    watch = Watcher(out)
    attempts = []
    for _ in range(KILLS):
        after = rng.uniform(0.05, 0.95) / KILLS if resumes else rng.uniform(0.05, 0.75)
        rc, _, _, seconds = _launch(args(out), watch, lambda t: started(out, t), after * window)
        if rc == 0:  # it finished first: that is the rerun, and there is nothing left to kill
            attempts.append(f"finished in {seconds:.1f} s")
            break
        attempts.append(f"killed {after * window:.2f} s after it began writing")
        whole(out)
    _, stdout, _, seconds = _launch(args(out), watch, lambda t: False, None)
    whole(out)
    LOG.append(
        f"{stage}: uninterrupted {total:.1f} s ({window:.1f} s writing); {'; '.join(attempts)}; "
        f"rerun {seconds:.1f} s; {watch.checked} file versions checked"
    )
    assert any(a.startswith("killed") for a in attempts), f"{stage}: the command always finished first"
    return ref_stdout, stdout


def _same(a: object, b: object) -> bool:
    """Nested dicts / lists / tensors equal exactly."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _no_temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


# ------------------------------------------------------------------------------------------ the stages


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    yield tmp_path_factory.mktemp("kill")
    print("\n" + "\n".join(LOG))


@pytest.fixture(scope="module")
def prepared(small_labels_csv: Path, work: Path) -> Path:
    """prepare: killed, rerun, compared with an uninterrupted run. Returns the uninterrupted dataset."""
    from uniembed.data.shards import iter_shard, load_manifest

    def whole(ds: Path) -> None:  # the dataset is there complete, or not at all
        if ds.exists():
            m = load_manifest(ds)
            assert sum(1 for s in m["shards"] for _ in iter_shard(ds / s)) == m["count"]

    ref, ds = work / "ref" / "ds", work / "kill" / "ds"
    kill_and_finish(
        "prepare",
        lambda d: ["prepare", small_labels_csv, "--shard-size", "16", "-j", "1", "-q", "-o", d],
        ref,
        ds,
        lambda d, t: written_since(list(d.parent.glob(f".{d.name}.tmp-*")), t),
        whole,
    )
    shards = sorted(p.name for p in ref.glob("shard-*.tar"))
    assert shards and sorted(p.name for p in ds.glob("shard-*.tar")) == shards
    for name in shards:
        assert (ds / name).read_bytes() == (ref / name).read_bytes(), name
    volatile = ("created", "build_seconds")
    got, want = ({k: v for k, v in load_manifest(d).items() if k not in volatile} for d in (ds, ref))
    assert got == want
    assert _no_temporaries(ds) == [] and not list(ds.parent.glob(".ds.tmp-*"))  # builds of killed runs: gone
    return ref


def test_prepare_survives_kills(prepared: Path) -> None:
    assert (prepared / "manifest.json").is_file()


@pytest.fixture(scope="module")
def features(prepared: Path, work: Path) -> Path:
    """extract: killed (partial checkpoints every 0.3 s), rerun, compared. Returns the uninterrupted one."""
    from uniembed.features.store import is_complete, load_feature_set

    def whole(root: Path) -> None:  # once complete, the cache loads (checksums, shapes and rows agree)
        for d in root.glob("*"):
            if is_complete(d):
                load_feature_set(d)

    ref_out, out = kill_and_finish(
        "extract",
        lambda d: ["extract", prepared, "-o", d, *EXTRACT_ARGS],
        work / "ref" / "feats",
        work / "kill" / "feats",
        lambda d, t: written_since(list(d.glob("*/parts/*")) + list(d.glob("*/features.npy")), t),
        whole,
        resumes=True,
    )
    ref, got = Path(ref_out.splitlines()[0]), Path(out.splitlines()[0])
    LOG.append(f"extract, the last rerun: {out.splitlines()[1]}")
    for name in ("features.npy", "meta.csv"):
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name
    volatile = ("created", "images_per_s", "reused_shards", "resumed_images")
    info = [
        {k: v for k, v in json.loads((d / "info.json").read_text()).items() if k not in volatile}
        for d in (got, ref)
    ]
    assert info[0] == info[1]
    assert not (got / "parts").exists() and _no_temporaries(got) == []
    return ref


def test_extract_survives_kills(features: Path) -> None:
    assert (features / "features.npy").is_file()


def test_ctrl_c_in_extract_says_how_to_resume(prepared: Path, features: Path, work: Path) -> None:
    """SIGINT to the process group (what Ctrl-C in a terminal does, decode workers included) once the first
    checkpoint is on disk: one line, exit 130, no traceback; the rerun continues to the same bytes."""
    root = work / "sigint"
    args = ["extract", prepared, "-o", root, *EXTRACT_ARGS[:-1], "0"]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            _cmd(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        try:
            while proc.poll() is None and not list(root.glob("*/parts/*.npz")):
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        err.seek(0)
        stderr = err.read().decode()
    assert rc == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted; rerun the same command to resume", stderr
    assert "Traceback" not in stderr, stderr
    out, _ = _run(*args)
    assert "reused" in out or "resumed from a checkpoint" in out, out
    got = Path(out.splitlines()[0])
    assert (got / "features.npy").read_bytes() == (features / "features.npy").read_bytes()


@pytest.fixture(scope="module")
def run_dir(features: Path, work: Path) -> Path:
    """train: killed, resumed with --resume (once a checkpoint exists), compared. Returns the reference."""
    import torch

    from uniembed.core.run_record import HeadRecord

    def args(run: Path) -> list[object]:
        resume = ["--resume"] if (run / "checkpoint.pt").exists() else []
        return ["train", "-c", "smoke", "-f", features, "--epochs", "150", "-o", run, *resume]

    ref, run = work / "ref" / "run", work / "kill" / "run"
    kill_and_finish(
        "train", args, ref, run, lambda d, t: written_since([d / "config.yaml"], t), lambda d: None
    )
    got, want = HeadRecord.load(run), HeadRecord.load(ref)
    assert got.selected_epoch == want.selected_epoch and _same(got.state_dict, want.state_dict)
    ck = [torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=False) for d in (run, ref)]
    assert ck[0]["epoch"] == ck[1]["epoch"] == 150
    assert _same(ck[0]["model"], ck[1]["model"]) and _same(ck[0]["optimizer"], ck[1]["optimizer"])
    summaries = [json.loads((d / "summary.json").read_text()) for d in (run, ref)]
    assert (
        summaries[0]["val"] == summaries[1]["val"]
        and summaries[0]["best_epoch"] == summaries[1]["best_epoch"]
    )
    return ref


def test_train_resumes_after_kills(run_dir: Path) -> None:
    assert (run_dir / "head.pt").is_file()


def test_export_survives_kills(run_dir: Path, work: Path, small_labels_csv: Path) -> None:
    """export: killed, rerun, compared; a killed export never leaves a saved_model.pt that export.json does
    not describe, and the rerun clears the staging folders of the killed ones."""
    import torch
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from uniembed.export.model_files import file_fingerprint

    def whole(out: Path) -> None:
        if (out / "export.json").exists():
            recorded = json.loads((out / "export.json").read_text())["fingerprint"]
            assert recorded == file_fingerprint(out / "saved_model.pt")

    ref, out = work / "ref" / "model", work / "kill" / "model"
    kill_and_finish(
        "export",
        lambda d: ["export", run_dir, "--no-onnx", "--skip-parity", "-o", d],
        ref,
        out,
        lambda d, t: written_since(list(d.glob(".export-*")), t),
        whole,
    )
    assert (out / "saved_model.pt").read_bytes() == (ref / "saved_model.pt").read_bytes()
    assert _no_temporaries(out) == []
    with open(small_labels_csv, newline="") as f:
        photo = next(csv.DictReader(f))["path"]
    inputs = [
        torch.randint(0, 256, (2, 3, 97, 131), generator=torch.Generator().manual_seed(0), dtype=torch.uint8),
        pil_to_tensor(Image.open(photo).convert("RGB"))[None],
    ]
    models = [torch.jit.load(str(d / "saved_model.pt")).eval() for d in (out, ref)]
    with torch.no_grad():
        for x in inputs:
            assert torch.equal(models[0](x), models[1](x))


def test_index_add_survives_kills(small_labels_csv: Path, work: Path) -> None:
    """index --add: after every kill the index is the old one or the extended one, whole; the rerun gives
    exactly the uninterrupted result."""
    from uniembed.serve.store import ImageIndex
    from uniembed_lab.scaffold.tiny_model import make_tiny_model

    with open(small_labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    root = work / "index"
    a = write_labels_csv(root / "a.csv", rows[: len(rows) // 2])
    b = write_labels_csv(root / "b.csv", rows[len(rows) // 2 :])
    model = make_tiny_model(root / "tiny.pt")
    base, ref, out = root / "base", root / "ref", root / "kill"
    _run("index", "-i", a, "-m", model, "-o", base)
    shutil.copytree(base, ref)
    shutil.copytree(base, out)

    def paths(d: Path) -> list[str]:
        return [it["path"] for it in ImageIndex.load(d).items]

    def whole(d: Path) -> None:  # the old index or the extended one (ref: run first), whole
        assert paths(d) in (paths(base), paths(ref))

    kill_and_finish(
        "index --add",
        lambda d: ["index", "--add", "-i", b, "-m", model, "-o", d],
        ref,
        out,
        lambda d, t: written_since(list(d.parent.glob(f".{d.name}.tmp-*")), t),
        whole,
    )
    assert len(paths(out)) == len(rows) > len(paths(base))
    assert not list(root.glob(".kill.tmp-*"))  # the rerun removed the build folders of the killed runs
    for name in ("index.faiss", "items.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    thumbs = sorted(p.name for p in (ref / "thumbs").iterdir())
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == thumbs
    for name in thumbs:
        assert (out / "thumbs" / name).read_bytes() == (ref / "thumbs" / name).read_bytes(), name
