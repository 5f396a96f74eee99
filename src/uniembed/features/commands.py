"""``uniembed extract``: cache frozen backbone features of a prepared dataset."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this stage's sub-commands to ``app``."""

    @app.command("extract")
    def extract_cmd(
        dataset_dir: str = typer.Argument(
            ...,
            help="Prepared dataset folder (manifest.json + shard-*.tar, from `uniembed prepare`), or an "
            "image source as `uniembed prepare` takes it (a labels.csv, imagefolder:DIR:domain=D, gldv2:DIR, "
            "...): its files are then read directly, with no shard pass.",
        ),
        backbone: str = typer.Option(
            "mobilenetv2",
            "--backbone",
            "-b",
            help="Backbone: mobilenetv2, efficientnet_lite0/1/2 (offline weights), timm:<model> or "
            "open_clip:<arch>/<pretrained tag> (downloaded by those libraries).",
        ),
        pooling: str = typer.Option(
            "avg",
            "--pooling",
            "-p",
            help="Global pooling of the last feature map: avg or gem (GeM, p=3; gem4 sets p=4). Add "
            "'+stages' (e.g. avg+stages) to concatenate pooled maps of several stages, or '+stages_l2' "
            "(avg+stages_l2) to L2-normalise each stage before joining (mobilenetv2, efficientnet_lite*). "
            "timm: also 'native' (the model's own pooling, e.g. a ViT's class token). End with '+colour' "
            "(e.g. avg+stages_l2+colour, the make model recipe) to append a 512-bin colour histogram block.",
        ),
        out: Path = typer.Option(
            Path("artifacts/features"),
            "--out",
            "-o",
            help="Root folder; features go to <out>/<backbone>-<fingerprint>-<dataset hash>/.",
        ),
        engine: str = typer.Option(
            "auto",
            "--engine",
            "-e",
            help="auto (ONNX Runtime on CPU, torch on GPU), torch, onnxruntime (threads sleep when idle: "
            "best beside decode workers and on shared machines) or onnxruntime-spin (ONNX Runtime's "
            "busy-waiting threads, for dedicated many-core machines).",
        ),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per model call."),
        threads: int | None = typer.Option(
            None, "--threads", min=1, help="Intra-op threads of the model (default: all available cores)."
        ),
        workers: int | None = typer.Option(
            None,
            "--workers",
            min=0,
            help="Decode worker processes, each taking whole shards (0 = decode in the main process; "
            "default: 1 on small CPUs, more on larger machines).",
        ),
        random_weights: bool = typer.Option(
            False, "--random-weights", help="Random (seeded) weights instead of pretrained ones, for tests."
        ),
        device: str | None = typer.Option(
            None, "--device", help="torch device for the torch engine (default: cuda if available, else cpu)."
        ),
        compile: bool = typer.Option(False, "--compile", help="torch.compile the model (torch engine only)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Extract pooled frozen-backbone features of every image of a prepared dataset (or of an image source
        read directly).

        Cached: a rerun with the same backbone, weights, pooling and dataset returns at once.

        Resumable: a killed run continues from the shards it had finished.
        """
        from pathlib import Path as _Path

        from uniembed.data.sources import DataError
        from uniembed.features import extract as ex

        # A prepared dataset (or any plain folder, which then gets extract's own "not prepared" error) goes
        # through the shards; a labels.csv, a folder holding one, or a KIND:PATH spec is read directly.
        arg = _Path(dataset_dir)
        direct = not arg.is_dir() or ((arg / "labels.csv").exists() and not (arg / "manifest.json").exists())
        try:
            common = dict(
                backbone=backbone,
                out_root=out,
                pooling=pooling,
                engine=engine,
                batch_size=batch_size,
                threads=threads,
                workers=workers,
                pretrained=not random_weights,
                device=device,
                progress=not quiet,
            )
            if direct:
                path = ex.extract_files([dataset_dir], **common)
            else:
                path = ex.extract(dataset_dir, compile=compile, **common)
        except (ex.ExtractError, DataError, KeyError, ValueError, FileNotFoundError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            typer.echo(f"extract failed: {msg}", err=True)
            raise typer.Exit(code=1) from None
        import json

        info = json.loads((path / "info.json").read_text())
        st = ex.LAST_STATS
        # Plain echo (not rich) so the path never wraps: scripts read it from the first line.
        typer.echo(str(path))
        if st.cached:
            speed = "cached (nothing to do)"
        else:
            speed = f"{st.images_per_s:.1f} images/s ({st.engine}"
            speed += f", {st.reused_shards} shard(s) reused)" if st.reused_shards else ")"
        skipped = info.get("skipped", [])
        typer.echo(
            f"count={info['count']} dim={info['dim']} backbone={info['backbone']} pooling={info['pooling']} "
            f"skipped={len(skipped)} speed={speed}"
        )
        if skipped:
            counts = ", ".join(f"{k}: {v}" for k, v in info.get("skipped_counts", {}).items())
            typer.echo(f"skipped images by reason: {counts}")
