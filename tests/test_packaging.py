"""The built wheel works away from the checkout: configs ship as package data, the lab's commands arrive
through the ``uniembed.commands`` entry point, and the library never needs the source tree.

The wheel is installed with ``--no-deps`` into a fresh virtual environment whose only other path is this
venv's site-packages (torch & co., ~2 GB a test should not reinstall). The checkout's editable install
is inert there (a ``.pth`` finder is not processed on a plain path entry), and the test asserts
that the wheel's copy is the one that runs."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from uniembed.core.paths import repo_root

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(python of a fresh venv with only the wheel installed, a working directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build would leave build/ and egg-info behind in the checkout.
    source = tmp / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(repo_root() / "src", source / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo_root() / name, source / name)
    dist = tmp / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)]
        + [str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (whl,) = dist.glob("uniembed-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(purelib), str(whl)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    deps = [p for p in site.getsitepackages() + [sysconfig.get_path("purelib")] if Path(p).is_dir()]
    (purelib / "zz_dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    work = tmp / "elsewhere"
    work.mkdir()
    return py, work


def _run(py: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(py), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_wheel_has_configs_and_lab_commands(wheel_env: tuple[Path, Path]) -> None:
    py, cwd = wheel_env
    probe = _run(
        py,
        cwd,
        "-c",
        "import uniembed, uniembed_lab; from uniembed.configs import config_path, config_names;"
        "from uniembed.train import TrainConfig;"
        "print(uniembed.__file__); print(uniembed_lab.__file__); print(','.join(config_names()));"
        "cfg = TrainConfig.from_yaml(config_path('model')); print(cfg.epochs, cfg.loss['type'])",
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    lib, lab, names, recipe = probe.stdout.strip().splitlines()
    venv_dir = py.parent.parent
    assert Path(lib).is_relative_to(venv_dir) and Path(lab).is_relative_to(venv_dir), (lib, lab)
    assert {"default", "smoke", "demo", "model"} <= set(names.split(","))
    assert recipe.split()[1] == "arcface"
    helped = _run(py, cwd, "-m", "uniembed.cli", "model", "--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--config" in helped.stdout and "--lodo" in helped.stdout
    listed = _run(py, cwd, "-m", "uniembed.cli", "--help")
    for command in ("prepare", "extract", "train", "index", "serve", "demo", "model", "bench"):
        assert command in listed.stdout, command
