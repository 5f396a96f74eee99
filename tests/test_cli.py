"""The CLI surface: every sub-command exists and documents every option; pipeline helpers."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from uniembed.cli import app
from uniembed_lab.pipeline import mp5_table, subset_labels_csv

EXPECTED = [
    "prepare",
    "extract",
    "train",
    "evaluate",
    "export",
    "index",
    "search",
    "serve",
    "demo",
    "model",
    "bench",
]


def _commands() -> dict:
    return typer.main.get_command(app).commands


def test_every_pipeline_command_is_registered() -> None:
    assert set(EXPECTED) <= set(_commands())


@pytest.mark.parametrize("name", EXPECTED)
def test_help_documents_every_option(name: str) -> None:
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    cmd = _commands()[name]
    assert (cmd.help or "").strip(), f"{name} has no description"
    for p in cmd.params:
        if p.name == "help":
            continue
        assert (getattr(p, "help", None) or "").strip(), f"`uniembed {name}`: parameter {p.name} has no help"


def test_lab_commands_come_from_the_entry_point() -> None:
    """demo, model and bench are the lab's: `uniembed --help` lists them through the ``uniembed.commands``
    entry point (pyproject.toml), and the shipped recipe they train resolves after installation."""
    from importlib.metadata import entry_points

    from uniembed.configs import config_path

    lab = {ep.name: ep.value for ep in entry_points(group="uniembed.commands")}
    assert lab.get("lab") == "uniembed_lab.commands:register"
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for name in ("demo", "model", "bench"):  # a command's row: its name first, after the box's border
        assert re.search(rf"^\W*{name}\s", result.output, re.M), result.output
    recipe = config_path("model")
    assert recipe.is_file() and recipe.name == "model.yaml"


def test_subset_is_domain_balanced_and_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "labels.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "domain"])
        for d in ("a", "b"):
            for lab in range(5):
                for i in range(4):
                    w.writerow([f"{d}/{lab}/{i}.jpg", f"{d}{lab}", d])
        w.writerow(["single.jpg", "lonely", "a"])  # a one-image label can never be scored: left out
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    counts = subset_labels_csv([src], a, labels_per_domain=3, images_per_label=2)
    subset_labels_csv([src], b, labels_per_domain=3, images_per_label=2)
    assert a.read_text() == b.read_text()
    rows = list(csv.DictReader(open(a)))
    assert counts == {"a": 3, "b": 3} and len(rows) == 12
    assert all(Path(r["path"]).is_absolute() for r in rows)
    assert "lonely" not in {r["label"] for r in rows}


def test_mp5_table_reads_evaluate_output() -> None:
    from rich.console import Console

    metrics = {
        "methods": {
            "head": {"overall": {"mP@5": 0.9}, "per_domain": {"x": {"mP@5": 0.8}, "y": {"mP@5": 1.0}}},
            "raw": {"overall": {"mP@5": 0.7}, "per_domain": {"x": {"mP@5": 0.6}}},
        }
    }
    table = mp5_table("t", metrics, Console(quiet=True))
    assert table == {"head": {"x": 0.8, "y": 1.0, "all": 0.9}, "raw": {"x": 0.6, "all": 0.7}}
