"""Extraction keeps its progress inside a shard (and in a files extraction): by time and on Ctrl-C.

A run that dies mid-shard (here: the engine raises on its n-th batch, like a kill arriving then) leaves
a partial checkpoint; the rerun continues from it and writes exactly the bytes of an uninterrupted run.
Ctrl-C saves a checkpoint on the way out, and the commands turn it into one line and exit status 130."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import uniembed.features.extract as E
import uniembed.features.files as files_mod
from uniembed.core.interrupt import EXIT_INTERRUPTED, RESUME_HINT, exit_on_interrupt
from uniembed.features.store import is_complete

BATCH = 8


@pytest.fixture(scope="module")
def prepared(small_labels_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 real photos in shards of 20 (20, 20, 8): 3 batches of 8 in each full shard."""
    from uniembed.data.prepare import prepare

    ds = tmp_path_factory.mktemp("ckpt") / "ds"
    prepare([str(small_labels_csv)], ds, shard_size=20, workers=1, progress=False)
    return ds


@pytest.fixture(scope="module")
def backbone():
    from uniembed.models import create_backbone

    return create_backbone("mobilenetv2")


def _opts(**kw: Any) -> dict[str, Any]:
    return dict(engine="onnxruntime", batch_size=BATCH, workers=0, progress=False, **kw)


@pytest.fixture(scope="module")
def clean_shards(prepared: Path, backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return E.extract(prepared, backbone, out_root=tmp_path_factory.mktemp("clean"), **_opts())


@pytest.fixture(scope="module")
def clean_files(small_labels_csv: Path, backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return E.extract_files(
        [str(small_labels_csv)], backbone, out_root=tmp_path_factory.mktemp("cf"), **_opts()
    )


class _Dies:
    """``make_runner`` whose runner raises ``exc`` on its ``at``-th batch (a kill or Ctrl-C arriving then)."""

    def __init__(self, real: Any, at: int, exc: BaseException):
        self.real, self.at, self.exc, self.calls = real, at, exc, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        runner = self.real(*args, **kwargs)
        dies = self

        class Runner:
            engine = runner.engine

            def __call__(self, x: Any) -> Any:
                dies.calls += 1
                if dies.calls == dies.at:
                    raise dies.exc
                return runner(x)

        return Runner()


def _same_bytes(a: Path, b: Path) -> None:
    for name in ("features.npy", "meta.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize(
    ("exc", "seconds"),
    [(RuntimeError("killed"), 0.0), (KeyboardInterrupt(), 1e9)],
    ids=["by-time", "on-ctrl-c"],
)
def test_shard_progress_survives_mid_shard(
    prepared: Path,
    backbone,
    clean_shards: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
    seconds: float,
) -> None:
    """Dies on the 3rd batch of the 1st shard: 2 batches (16 images) were checkpointed, by time (every
    batch with checkpoint_seconds=0, nothing saved on the way out) or by the Ctrl-C handler (no time
    checkpoint due)."""
    monkeypatch.setattr(E, "make_runner", _Dies(E.make_runner, 3, exc))
    with pytest.raises(type(exc)):
        E.extract(prepared, backbone, out_root=tmp_path, checkpoint_seconds=seconds, **_opts())
    monkeypatch.undo()
    out = tmp_path / clean_shards.name
    assert not is_complete(out)
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["shard-000000.partial.npz"]

    res = E.extract_with_stats(prepared, backbone, out_root=tmp_path, **_opts())
    assert res.path == out and res.stats.images == 48 - 2 * BATCH
    _same_bytes(out, clean_shards)
    info = (out / "info.json").read_text()
    assert '"resumed_images": 16' in info and not (out / "parts").exists()


def test_partial_of_another_batch_size_is_redone(
    prepared: Path, backbone, clean_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resuming inside a shard needs the same batches: a checkpoint made with another batch size is not
    used, the shard is embedded again, and the result is still the uninterrupted one."""
    monkeypatch.setattr(E, "make_runner", _Dies(E.make_runner, 3, RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        E.extract(prepared, backbone, out_root=tmp_path, checkpoint_seconds=0, **_opts())
    monkeypatch.undo()
    opts = _opts()
    opts["batch_size"] = 4
    res = E.extract_with_stats(prepared, backbone, out_root=tmp_path, **opts)
    assert res.stats.images == 48 and '"resumed_images": 0' in (res.path / "info.json").read_text()
    a = np.load(res.path / "features.npy").astype(np.float32)
    b = np.load(clean_shards / "features.npy").astype(np.float32)
    assert np.abs(a - b).max() < 2e-2


@pytest.mark.parametrize(
    ("exc", "seconds"),
    [(RuntimeError("killed"), 0.0), (KeyboardInterrupt(), 1e9)],
    ids=["by-time", "on-ctrl-c"],
)
def test_files_progress_survives(
    small_labels_csv: Path,
    backbone,
    clean_files: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
    seconds: float,
) -> None:
    """`extract labels.csv` (no shards) kept nothing of an interrupted run; now it continues from whole
    batches and writes the same bytes."""
    monkeypatch.setattr(files_mod, "make_runner", _Dies(files_mod.make_runner, 4, exc))
    with pytest.raises(type(exc)):
        E.extract_files(
            [str(small_labels_csv)], backbone, out_root=tmp_path, checkpoint_seconds=seconds, **_opts()
        )
    monkeypatch.undo()
    out = tmp_path / clean_files.name
    assert (out / "parts" / "files.partial.npz").is_file() and not is_complete(out)
    res = E.extract_files_with_stats([str(small_labels_csv)], backbone, out_root=tmp_path, **_opts())
    assert res.path == out and res.stats.images == 48 - 3 * BATCH
    _same_bytes(out, clean_files)
    assert '"resumed_images": 24' in (out / "info.json").read_text() and not (out / "parts").exists()


def test_exit_on_interrupt_says_how_to_continue(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e, exit_on_interrupt():
        raise KeyboardInterrupt
    assert e.value.code == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == RESUME_HINT + "\n"
    with pytest.raises(SystemExit), exit_on_interrupt(lambda: "computed late"):
        raise KeyboardInterrupt
    assert capsys.readouterr().err == "computed late\n"
    with exit_on_interrupt():  # anything else passes through untouched
        pass
    with pytest.raises(ValueError), exit_on_interrupt():
        raise ValueError("not an interrupt")


def _interrupt(*args: Any, **kwargs: Any) -> None:
    raise KeyboardInterrupt


def test_long_commands_exit_130_with_one_line(
    prepared: Path, small_labels_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare, extract, train and export: Ctrl-C -> one line (train: --resume once it has a checkpoint)."""
    from typer.testing import CliRunner

    import uniembed.data.prepare as prep
    import uniembed.export.guie as guie
    import uniembed.train as train_mod
    from uniembed.cli import app
    from uniembed.train.synthetic import write_synthetic_features

    runner = CliRunner()
    monkeypatch.setattr(E, "extract_with_stats", _interrupt)
    monkeypatch.setattr(prep, "prepare", _interrupt)
    monkeypatch.setattr(guie, "export_guie", _interrupt)
    run = tmp_path / "run"
    run.mkdir()
    (run / "head.pt").write_bytes(b"")
    resume, again = (
        "interrupted; rerun the same command to resume",
        "interrupted; rerun the same command to start again",
    )
    for args, want in [
        (["extract", str(prepared), "-o", str(tmp_path / "f")], resume),
        (["prepare", str(small_labels_csv), "-o", str(tmp_path / "d")], again),
        (["export", str(run), "-o", str(tmp_path / "m")], again),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 130 and r.stderr.strip() == want, (args, r.output)

    feats = write_synthetic_features(tmp_path / "syn")
    train_args = ["train", "-c", "smoke", "-f", str(feats), "-o", str(tmp_path / "t")]
    monkeypatch.setattr(train_mod, "train", _interrupt)
    r = runner.invoke(app, train_args)
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted; rerun the same command to start again"

    def after_a_checkpoint(cfg: Any, **kwargs: Any) -> None:
        Path(cfg.out).mkdir(exist_ok=True)
        (Path(cfg.out) / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", after_a_checkpoint)
    r = runner.invoke(app, train_args)
    assert r.exit_code == 130
    assert r.stderr.strip() == "interrupted; rerun the same command with --resume to resume"
    r = runner.invoke(app, [*train_args, "--resume"])
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted; rerun the same command to resume"
