"""``uniembed --version`` prints the installed distribution's version and exits 0."""

from __future__ import annotations

from importlib.metadata import version

from typer.testing import CliRunner

from uniembed.cli import app


def test_version_flag() -> None:
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"uniembed {version('uniembed')}"


def test_version_does_not_need_a_command() -> None:
    r = CliRunner().invoke(app, ["--version", "search", "--help"])
    assert r.exit_code == 0 and r.output.startswith("uniembed ")
