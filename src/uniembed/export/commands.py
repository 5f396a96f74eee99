"""``uniembed export``: a training run -> GUIE saved_model.pt + model.onnx + model_card.md + export.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunDirArg = Annotated[
    Path,
    typer.Argument(
        help="Training run directory (holds head.pt and config.yaml, written by `uniembed train`)."
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Output directory for saved_model.pt, model.onnx, model_card.md and export.json "
        "(default: RUN_DIR/export).",
    ),
]
OnnxOption = Annotated[
    bool,
    typer.Option(
        "--onnx/--no-onnx",
        help="Also write model.onnx (same uint8 [B,3,H,W] -> float32 [B,64] contract, verified in "
        "onnxruntime).",
    ),
]
ParityImagesOption = Annotated[
    int,
    typer.Option(
        "--parity-images",
        min=1,
        help="How many real images (spread over domains) the parity check compares, per image group "
        "(shard images with cached features, and original photos at their own sizes).",
    ),
]
PhotoOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--photo",
        help="Original photo(s) to use in the parity check instead of the ones listed in the feature "
        "cache (repeatable).",
    ),
]
SkipParityOption = Annotated[
    bool,
    typer.Option("--skip-parity", help="Skip the parity check (not recommended; the card then says so)."),
]


def register(app: typer.Typer) -> None:
    """Add ``export`` to the CLI."""

    @app.command("export")
    def export_cmd(
        run_dir: RunDirArg,
        out: OutOption = None,
        onnx: OnnxOption = True,
        parity_images: ParityImagesOption = 8,
        photos: PhotoOption = None,
        no_parity: SkipParityOption = False,
    ) -> None:
        """Export a run as a GUIE model: TorchScript saved_model.pt (uint8 [B,3,H,W], any H and W -> float32
        [B,64]), model.onnx, a model card and a parity check (cosine >= 0.999 against the Python pipeline and
        the cached-feature path, or the command fails)."""
        run_export(run_dir, out, onnx, parity_images, photos, no_parity)


def run_export(
    run_dir: Path,
    out: Path | None,
    onnx: bool,
    parity_images: int,
    photos: list[Path] | None,
    no_parity: bool,
) -> None:
    """``uniembed export``: exit 2 on bad input, 1 when the export fails or parity does not hold."""
    from rich.console import Console

    from uniembed.core.interrupt import RESTART_HINT, exit_on_interrupt
    from uniembed.export.guie import export_guie
    from uniembed.export.parity import ParityError

    console = Console(stderr=True)
    if not (run_dir / "head.pt").exists():
        console.print(f"[red]error:[/] {run_dir} is not a training run (no head.pt); run `uniembed train`")
        raise typer.Exit(2)
    dest = out or run_dir / "export"
    try:
        with exit_on_interrupt(RESTART_HINT):
            rec = export_guie(
                run_dir,
                dest,
                onnx=onnx,
                parity_images=parity_images,
                photos=[str(p) for p in photos] if photos else None,
                check_parity=not no_parity,
            )
    except ParityError as e:
        console.print(f"[red]PARITY FAILED:[/] {e}\n(files and export.json are in {dest} for inspection)")
        raise typer.Exit(1) from None
    except (FileNotFoundError, ValueError, KeyError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    except RuntimeError as e:
        console.print(f"[red]export failed:[/] {e}")
        raise typer.Exit(1) from None
    console.print(
        f"[bold green]exported[/] {dest}/saved_model.pt (fingerprint {rec['fingerprint']}), "
        f"model card {dest}/model_card.md"
    )
