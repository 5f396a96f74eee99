"""Damaged files: every file a stage writes and another reads back, truncated, filled with garbage or deleted,
gives one clear error (the stage's own error class, naming the file and what to do) and, through the CLI, one
line and exit code 2, never a traceback. Checksums recorded in index.json and a feature cache's info.json are
verified on load (``verify=False`` skips them); artefacts written before checksums still load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner, Result

from uniembed.cli import app
from uniembed.configs import config_path
from uniembed.core.integrity import CHECKSUMS_KEY, DamagedFileError
from uniembed.core.run_record import RunRecordError
from uniembed.data.shards import DamagedDataError, iter_samples, load_manifest
from uniembed.data.sources import DataError
from uniembed.export.embedder import DamagedModelError, ModelError, file_fingerprint, load_embedder
from uniembed.features.cache import cached_result
from uniembed.features.store import FeatureCacheError, load_feature_set
from uniembed.serve.index import DamagedIndexError, ImageIndex, ImageIndexError, build_index
from uniembed.train import TrainConfig, load_head, train
from uniembed.train.checkpoint import CheckpointError
from uniembed.train.synthetic import write_synthetic_features
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model

DAMAGES = ("truncate", "garbage", "delete")
WIDE = {"COLUMNS": "4000"}  # rich wraps at the terminal width; one message must stay one line


def damage(path: Path, how: str) -> None:
    """Cut the file to half its size, overwrite it with random bytes of the same size, or delete it."""
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    else:
        path.unlink()


def strip_checksums(manifest: Path) -> None:
    """Make a manifest look like one written before checksums existed."""
    info = json.loads(manifest.read_text())
    info.pop(CHECKSUMS_KEY)
    manifest.write_text(json.dumps(info))


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def assert_clean_exit(r: Result, file: str, code: int = 2) -> str:
    """A command that failed with ``code``, no exception escaping and one line about ``file`` (progress and
    summary lines the command prints before it fails may come first)."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [ln for ln in r.output.splitlines() if file in ln]
    assert r.exit_code == code and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


# --------------------------------------------------------------------------------------------- artefacts
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "saved_model.pt", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    make_synthetic_images(root, labels=3, per_label=4)
    return root


@pytest.fixture(scope="module")
def index(tiny: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(tiny, [images], out, progress=False)
    return out


@pytest.fixture(scope="module")
def feats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("feats") / "f"
    return write_synthetic_features(out, dim=32, classes_per_domain=6, per_class=5, signal_dim=8)


def _cfg(feats: Path, out: Path, epochs: int) -> TrainConfig:
    cfg = TrainConfig.from_yaml(config_path("smoke"))
    cfg.features, cfg.out, cfg.epochs = [str(feats)], str(out), epochs
    return cfg


@pytest.fixture(scope="module")
def run(feats: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(_cfg(feats, tmp_path_factory.mktemp("run") / "r", epochs=1))


@pytest.fixture(scope="module")
def dataset(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uniembed.data.prepare import prepare

    ds = tmp_path_factory.mktemp("ds") / "ds"
    prepare([f"imagefolder:{images}"], ds, size=64, shard_size=5, progress=False, default_domain="syn")
    return ds


class _Pool(nn.Module):
    """A GUIE-contract model small enough to export to ONNX in a second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.float() / 255.0).mean(dim=(2, 3))
        return torch.nn.functional.normalize(y, dim=1)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """saved_model.pt + its model.onnx twin tied together by export.json, as `uniembed export` leaves them."""
    from uniembed.export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("export") / "export"
    d.mkdir()
    torch.manual_seed(0)
    model = _Pool().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(d / "saved_model.pt"))
    rec = export_onnx(model, d / "model.onnx", 24)
    fp = file_fingerprint(d / "saved_model.pt")
    (d / "export.json").write_text(
        json.dumps({"fingerprint": fp, "saved_model": {"fingerprint": fp}, "onnx": rec})
    )
    assert load_embedder(d, engine="onnxruntime").engine == "onnxruntime"
    return d


# --------------------------------------------------------------------------------------------- loaders
def _resume(feats: Path) -> Callable[[Path], Any]:
    return lambda run: train(_cfg(feats, run, epochs=2), resume=True)


@dataclass(frozen=True)
class Case:
    """One file of one artefact, how its stage loads it, what it raises and what the message must advise."""

    artefact: str  # fixture name
    file: str  # path inside the artefact folder
    load: Callable[[Path, dict[str, Path]], Any]
    errors: tuple[type[BaseException], ...]
    hint: str
    intact_loads: bool = True  # False: the intact artefact needs more than the test has (a real backbone)


CASES = [
    Case("index", "index.faiss", lambda d, a: ImageIndex.load(d), (DamagedIndexError,), "uniembed index"),
    Case("index", "index.json", lambda d, a: ImageIndex.load(d), (ImageIndexError,), "uniembed index"),
    Case("index", "items.csv", lambda d, a: ImageIndex.load(d), (DamagedIndexError,), "uniembed index"),
    Case("feats", "features.npy", lambda d, a: load_feature_set(d), (FeatureCacheError,), "uniembed extract"),
    Case("feats", "meta.csv", lambda d, a: load_feature_set(d), (FeatureCacheError,), "uniembed extract"),
    Case("feats", "info.json", lambda d, a: load_feature_set(d), (FeatureCacheError,), "uniembed extract"),
    Case("run", "head.pt", lambda d, a: load_head(d), (RunRecordError,), "uniembed train"),
    Case("run", "head.pt", lambda d, a: load_embedder(d), (DamagedModelError,), "uniembed train", False),
    Case("run", "checkpoint.pt", lambda d, a: _resume(a["feats"])(d), (CheckpointError,), "--overwrite"),
    Case("dataset", "manifest.json", lambda d, a: load_manifest(d), (DamagedDataError,), "uniembed prepare"),
    Case("dataset", "shard-000001.tar", lambda d, a: list(iter_samples(d)), (DamagedDataError,), "prepare"),
    Case(
        "export",
        "saved_model.pt",
        lambda d, a: load_embedder(d / "saved_model.pt"),
        (DamagedModelError,),
        "export",
    ),
    Case(
        "export",
        "model.onnx",
        lambda d, a: load_embedder(d, engine="onnxruntime"),
        (DamagedModelError,),
        "uniembed export",
    ),
]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.artefact}-{c.file}-{c.load.__code__.co_names[-1]}")
def test_loader_names_the_damaged_file_in_one_line(
    case: Case, how: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    src: Path = request.getfixturevalue(case.artefact)
    artefacts = {"feats": request.getfixturevalue("feats")} if case.artefact == "run" else {}
    d = tmp_path / src.name
    shutil.copytree(src, d)
    if case.intact_loads:
        case.load(d, artefacts)
    damage(d / case.file, how)
    # A deleted file is "not found" / "not a ... directory" (FileNotFoundError, DataError, ModelError ...).
    expected = (
        (*case.errors, FileNotFoundError, DataError, ModelError, ImageIndexError)
        if how == "delete"
        else case.errors
    )
    with pytest.raises(expected) as err:
        case.load(d, artefacts)
    msg = one_line(err.value)
    assert case.file in msg or (how == "delete" and str(d) in msg), msg
    if how != "delete":
        assert isinstance(err.value, DamagedFileError) and case.hint in msg, msg


@pytest.mark.parametrize("how", ("truncate", "garbage"))
@pytest.mark.parametrize(
    "artefact,manifest,file,load,error",
    [
        ("index", "index.json", "index.faiss", ImageIndex.load, DamagedIndexError),
        ("index", "index.json", "items.csv", ImageIndex.load, DamagedIndexError),
        ("feats", "info.json", "features.npy", load_feature_set, FeatureCacheError),
        ("feats", "info.json", "meta.csv", load_feature_set, FeatureCacheError),
    ],
)
def test_without_checksums_the_parsers_still_fail_in_one_line(
    artefact: str, manifest: str, file: str, load: Callable, error: type, how: str, request, tmp_path: Path
) -> None:
    """An artefact written before checksums (or loaded with verify=False) loads as before when intact, and a
    damaged file is still caught by the parser checks (FAISS, NumPy, CSV columns, row counts)."""
    d = tmp_path / "a"
    shutil.copytree(request.getfixturevalue(artefact), d)
    strip_checksums(d / manifest)
    load(d)
    damage(d / file, how)
    with pytest.raises(error) as err:
        load(d)
    assert file in one_line(err.value) or str(d) in str(err.value)


def test_checksums_catch_what_parsers_cannot_and_verify_false_skips_them(
    index: Path, feats: Path, tmp_path: Path
) -> None:
    """Same-size damage that still parses (a changed label, a changed feature value) is caught only by the
    checksum; verify=False loads it."""
    ix = tmp_path / "idx"
    shutil.copytree(index, ix)
    items = (ix / "items.csv").read_bytes()
    (ix / "items.csv").write_bytes(items.replace(b",label1,", b",labelX,", 1))
    with pytest.raises(DamagedIndexError, match="items.csv is damaged .*sha256"):
        ImageIndex.load(ix)
    assert "labelX" in {it["label"] for it in ImageIndex.load(ix, verify=False).items}

    f = tmp_path / "f"
    shutil.copytree(feats, f)
    raw = bytearray((f / "features.npy").read_bytes())
    raw[-1] ^= 0x40
    (f / "features.npy").write_bytes(bytes(raw))
    with pytest.raises(FeatureCacheError, match="features.npy is damaged"):
        load_feature_set(f)
    assert len(load_feature_set(f, verify=False)) == len(load_feature_set(feats))


def test_manifests_record_checksums_and_old_ones_load(index: Path, feats: Path, tmp_path: Path) -> None:
    info = json.loads((index / "index.json").read_text())
    assert set(info[CHECKSUMS_KEY]) == {"index.faiss", "items.csv"}
    assert info[CHECKSUMS_KEY]["items.csv"]["size"] == (index / "items.csv").stat().st_size
    assert set(json.loads((feats / "info.json").read_text())[CHECKSUMS_KEY]) == {"features.npy", "meta.csv"}
    old = tmp_path / "old"
    shutil.copytree(index, old)
    strip_checksums(old / "index.json")
    assert len(ImageIndex.load(old)) == len(ImageIndex.load(index))


def test_extract_recomputes_a_damaged_cache(feats: Path, tmp_path: Path, caplog) -> None:
    """The cache check of extract treats a damaged cache as absent, so rerunning extract repairs it."""
    d = tmp_path / "f"
    shutil.copytree(feats, d)
    info = json.loads((d / "info.json").read_text())
    key = (d, info["fingerprint"], info["manifest_hash"], info.get("draft"), 0.0)
    assert cached_result(*key) is not None
    damage(d / "features.npy", "truncate")
    assert cached_result(*key) is None
    assert "computing the features again" in caplog.text


def test_damaged_onnx_twin_falls_back_to_torchscript_with_auto(export: Path, tmp_path: Path, caplog) -> None:
    d = tmp_path / "e"
    shutil.copytree(export, d)
    damage(d / "model.onnx", "truncate")
    emb = load_embedder(d, engine="auto")
    assert emb.engine == "torch" and any("model.onnx" in n and "damaged" in n for n in emb.notes)
    assert "model.onnx" in caplog.text


# --------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(
    "file,how,legacy",
    [
        ("index.faiss", "truncate", False),
        ("index.faiss", "garbage", True),  # no checksums: FAISS's own reader fails, in one line
        ("index.json", "garbage", False),
        ("index.json", "truncate", False),
        ("items.csv", "truncate", False),
        ("items.csv", "garbage", True),
        ("index.faiss", "delete", False),
    ],
)
def test_search_and_index_add_on_a_damaged_index(
    index: Path, images: Path, tiny: Path, file: str, how: str, legacy: bool, tmp_path: Path
) -> None:
    ix = tmp_path / "idx"
    shutil.copytree(index, ix)
    if legacy:
        strip_checksums(ix / "index.json")
    damage(ix / file, how)
    runner = CliRunner()
    query = str(images / "label0" / "0.png")
    line = assert_clean_exit(runner.invoke(app, ["search", "--index", str(ix), query]), file)
    assert "uniembed index" in line
    r = runner.invoke(
        app, ["index", "--model", str(tiny), "--images", str(images), "--out", str(ix), "--add"]
    )
    assert_clean_exit(r, file)


def test_search_when_the_recorded_model_is_damaged(
    index: Path, images: Path, tiny: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m" / "saved_model.pt"
    model.parent.mkdir()
    shutil.copy(tiny, model)
    out = tmp_path / "idx"
    build_index(model, [images / "label0"], out, progress=False)
    damage(model, "truncate")
    r = CliRunner().invoke(app, ["search", "--index", str(out), str(images / "label0" / "0.png")])
    assert "damaged" in assert_clean_exit(r, str(model))


@pytest.mark.parametrize("file", ["manifest.json", "shard-000001.tar"])
def test_index_from_a_damaged_prepared_dataset(dataset: Path, tiny: Path, file: str, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    damage(ds / file, "truncate")
    r = CliRunner().invoke(
        app, ["index", "--model", str(tiny), "--images", str(ds), "--out", str(tmp_path / "i")]
    )
    assert "uniembed prepare" in assert_clean_exit(r, file)
    assert not (tmp_path / "i").exists()


def test_export_of_a_run_with_a_damaged_head(run: Path, tmp_path: Path) -> None:
    r_dir = tmp_path / "run"
    shutil.copytree(run, r_dir)
    damage(r_dir / "head.pt", "garbage")
    r = CliRunner().invoke(app, ["export", str(r_dir), "--out", str(tmp_path / "e")], env=WIDE)
    assert_clean_exit(r, "head.pt")


@pytest.mark.parametrize("file", ["head.pt", "features.npy"])
def test_evaluate_with_a_damaged_run_or_cache(run: Path, feats: Path, file: str, tmp_path: Path) -> None:
    r_dir, f_dir = tmp_path / "run", tmp_path / "feats"
    shutil.copytree(run, r_dir)
    shutil.copytree(feats, f_dir)
    damage((r_dir if file == "head.pt" else f_dir) / file, "truncate")
    args = ["evaluate", str(r_dir if file == "head.pt" else f_dir), "--out", str(tmp_path / "ev"), "-q"]
    assert_clean_exit(CliRunner().invoke(app, args, env=WIDE), file)


def test_train_resume_from_a_damaged_checkpoint(run: Path, feats: Path, tmp_path: Path) -> None:
    r_dir = tmp_path / "run"
    shutil.copytree(run, r_dir)
    damage(r_dir / "checkpoint.pt", "truncate")
    args = ["train", "-c", str(config_path("smoke")), "-f", str(feats), "-o", str(r_dir), "--resume"]
    assert_clean_exit(CliRunner().invoke(app, args, env=WIDE), "checkpoint.pt")


def test_a_real_process_prints_one_line_and_exits_2(index: Path, images: Path, tmp_path: Path) -> None:
    """The installed entry point as a user runs it: no traceback on stderr, exit status 2."""
    ix = tmp_path / "idx"
    shutil.copytree(index, ix)
    damage(ix / "index.faiss", "truncate")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "uniembed.cli",
            "search",
            "--index",
            str(ix),
            str(images / "label0" / "0.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **WIDE},
    )
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "index.faiss is damaged (truncated" in lines[0]
