"""``uniembed bench``: speed and memory of the project's stages, each beside its naive baseline."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add ``uniembed bench``."""

    @app.command("bench")
    def bench(
        quick: bool = typer.Option(
            False,
            "--quick",
            help="Tiny inputs (32 images, 20k vectors...): checks the code runs, in seconds.",
        ),
        out: Path = typer.Option(
            Path("artifacts/bench"), "--out", help="Folder for <measure>.json, extract_profile.json and logs."
        ),
        only: list[str] = typer.Option(
            None,
            "--only",
            help="Run only these measures (repeat the option or separate with commas): extract, "
            "extract_profile, extract_ray, head_epoch, search_exact, search_ann, sharded_index, dedup.",
        ),
        data: Path = typer.Option(
            None,
            "--data",
            help="Folder with grocery_store/ and/or coil100/ (labels.csv each); default ../shared/data.",
        ),
        threads: int = typer.Option(
            0,
            "--threads",
            help="Intra-op threads for every side (torch, ONNX Runtime, FAISS, BLAS); 0 = all cores.",
        ),
        images: int = typer.Option(
            0, "--images", help="Images in the extraction subset (0 = 1000, or 32 with --quick)."
        ),
        check_goals: bool = typer.Option(
            False, "--check-goals", help="Exit with code 2 when a full-size measure misses its goal."
        ),
    ) -> None:
        """Measure each stage against a baseline in the same run and print `RATIO <name> <project>
        <baseline> <ratio>` lines (ratio = times better than the baseline). Each side runs in its own
        process; peak memory (RSS) of each is reported. Results: <out>/<name>.json with the machine's
        description."""
        code = bench_command(quick, out, only, data, threads, images, check_goals)
        if code:
            raise typer.Exit(code)


def bench_command(
    quick: bool,
    out: Path,
    only: list[str] | None,
    data: Path | None,
    threads: int,
    images: int,
    check_goals: bool,
) -> int:
    """Run the measures; the exit code: 1 when a measure failed, 2 when ``check_goals`` and a full-size
    measure missed its goal, else 0. A bad ``--only`` raises ``typer.BadParameter``."""
    import time

    from rich.console import Console

    from uniembed_lab.bench.common import BenchConfig
    from uniembed_lab.bench.measures import BenchError, resolve_names
    from uniembed_lab.bench.report import print_report
    from uniembed_lab.bench.runner import run_bench

    console = Console(stderr=True)
    if not console.is_terminal:  # logs and CI: wide enough that the tables do not wrap
        console = Console(stderr=True, width=160)
    try:
        names = resolve_names(only)
    except BenchError as e:
        raise typer.BadParameter(str(e), param_hint="--only") from e
    overrides: dict = {"out": out, "data_dir": data, "threads": max(0, threads)}
    if images > 0:
        overrides["n_images"] = images
    cfg = BenchConfig.make(quick, **overrides)
    t0 = time.perf_counter()
    results = run_bench(cfg, names, console)
    failures = print_report(cfg, results, time.perf_counter() - t0, console)
    if failures:
        return 1
    if check_goals and any(r.get("goal_met") is False for r in results.values()):
        return 2
    return 0
