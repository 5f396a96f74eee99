"""``export_guie(run_dir, out_dir)``: a run -> saved_model.pt, model.onnx, model_card.md, export.json."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from uniembed.core.fsutil import atomic_path, atomic_write_text
from uniembed.export.embedder import SAVED_MODEL, file_fingerprint


def export_guie(
    run_dir: str | Path,
    out_dir: str | Path,
    onnx: bool = True,
    parity_images: int = 8,
    photos: list[str] | None = None,
    check_parity: bool = True,
    progress: bool = True,
) -> dict:
    """Build the GUIE model of a run, write the exported files, check parity and write the card.

    Returns the export record (also written to ``export.json``). Raises ``ParityError`` *after* writing
    export.json and the card when an exported file disagrees with the Python pipeline (cosine < 0.999)."""
    from rich.console import Console

    from uniembed.export.card import write_card
    from uniembed.export.model import build_run_model, feature_info, quiet_jit, script_model
    from uniembed.export.parity import check_parity as _check_parity
    from uniembed.export.parity import require_parity

    console = Console(stderr=True, quiet=not progress)
    run = Path(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with console.status("building the model from the run"):
        rm = build_run_model(run)
    bb, pre = rm.backbone, rm.preprocess

    with console.status("TorchScript: scripting the GUIE model"):
        ts, how = script_model(rm.model, pre.input_size)
        with quiet_jit():
            with atomic_path(out / SAVED_MODEL) as tmp:
                torch.jit.save(ts, str(tmp))
            # Round trip: what was saved is what loads, and it honours the contract on an odd size.
            loaded = torch.jit.load(str(out / SAVED_MODEL))
        with torch.no_grad():
            y = loaded(torch.randint(0, 256, (2, 3, 97, 301), dtype=torch.uint8))
        if y.dtype != torch.float32 or tuple(y.shape) != (
            2,
            int(rm.record.embedding_dim or y.shape[1]),
        ):
            raise RuntimeError(f"saved_model.pt returned {y.dtype} {tuple(y.shape)}; expected float32 [2, D]")
    console.print(f"[green]saved_model.pt[/] written (backbone {how}), output {tuple(y.shape)}")

    onnx_rec = None
    if onnx:
        from uniembed.export.onnx_export import export_onnx

        with console.status("ONNX: exporting and verifying in onnxruntime (takes a few seconds)"):
            try:
                onnx_rec = export_onnx(rm.model, out / "model.onnx", pre.input_size)
            except Exception as e:  # both the dynamic and the fixed-size export failed
                raise RuntimeError(
                    f"ONNX export failed ({type(e).__name__}: {str(e)[:500]}); saved_model.pt is written, "
                    "rerun with --no-onnx to finish the export without model.onnx"
                ) from e
        console.print(
            f"[green]model.onnx[/] written (dynamic H/W: {onnx_rec['dynamic_hw']}, "
            f"max |diff| on random inputs {onnx_rec['verify_max_abs_diff']:.2e})"
        )

    parity = None
    if check_parity:
        with console.status(f"parity check on up to {parity_images} real images"):
            parity = _check_parity(
                rm,
                out / SAVED_MODEL,
                out / "model.onnx" if onnx_rec else None,
                n_images=parity_images,
                photos=photos,
            )
        color = "green" if parity["passed"] else "red"
        console.print(
            f"[{color}]parity[/] min cosine {parity['min_cosine']:.6f}, max |diff| "
            f"{parity['max_abs_diff']:.2e} ({'passed' if parity['passed'] else 'FAILED'})"
        )

    fdirs = rm.record.feature_dirs()
    finfo = feature_info(fdirs[0]) if fdirs else {}
    if fdirs:
        finfo["_dir"] = str(fdirs[0])
    manifest = None
    ds = finfo.get("dataset") or finfo.get("dataset_dir")
    if ds and (Path(ds) / "manifest.json").exists():
        manifest = json.loads((Path(ds) / "manifest.json").read_text())
    fingerprint = file_fingerprint(out / SAVED_MODEL)
    record = {
        "version": 1,
        "run_dir": str(run.resolve()),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "fingerprint": fingerprint,
        "saved_model": {
            "path": SAVED_MODEL,
            "fingerprint": fingerprint,
            "bytes": (out / SAVED_MODEL).stat().st_size,
            "backbone_compiled": how,
        },
        "onnx": onnx_rec,
        "embedding_dim": int(y.shape[1]),
        "backbone": {
            "name": bb.name,
            "pooling": bb.pooling,
            "dim": bb.dim,
            "weights": bb.weights,
            "weights_hash": bb.weights_hash,
            "fingerprint": bb.fingerprint(),
            "finetuned": rm.finetuned,
            "members": bb.info.get("members"),  # an ensemble's members (None for a single backbone)
        },
        "preprocess": pre.to_dict(),
        "head": rm.record.head_config,
        "selected_epoch": rm.record.selected_epoch,
        "feature_dirs": [str(d) for d in fdirs],
        "parity": parity,
    }
    atomic_write_text(out / "export.json", json.dumps(record, indent=2))
    write_card(out, record, run, finfo, manifest)
    if parity is not None:
        require_parity(parity)
    return record
