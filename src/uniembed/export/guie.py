"""``export_guie(run_dir, out_dir)``: a run -> saved_model.pt, model.onnx, model_card.md, export.json."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from uniembed.core.fsutil import atomic_path, atomic_write_text
from uniembed.export.model_files import SAVED_MODEL, file_fingerprint

if TYPE_CHECKING:
    from rich.console import Console

    from uniembed.export.model import RunModel


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
    from uniembed.export.model import build_run_model, feature_info
    from uniembed.export.parity import require_parity

    console = Console(stderr=True, quiet=not progress)
    run = Path(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with console.status("building the model from the run"):
        rm = build_run_model(run)
    how, dim = _write_saved_model(rm, out, console)
    onnx_rec = _write_onnx(rm, out, console) if onnx else None
    parity = None
    if check_parity:
        parity = _check_parity(rm, out, onnx_rec is not None, parity_images, photos, console)

    fdirs = rm.record.feature_dirs()
    finfo = feature_info(fdirs[0]) if fdirs else {}
    if fdirs:
        finfo["_dir"] = str(fdirs[0])
    manifest = None
    ds = finfo.get("dataset") or finfo.get("dataset_dir")
    if ds and (Path(ds) / "manifest.json").exists():
        manifest = json.loads((Path(ds) / "manifest.json").read_text())
    record = _export_record(rm, run, out, how, dim, onnx_rec, parity)
    atomic_write_text(out / "export.json", json.dumps(record, indent=2))
    write_card(out, record, run, finfo, manifest)
    if parity is not None:
        require_parity(parity)
    return record


def _write_saved_model(rm: RunModel, out: Path, console: Console) -> tuple[str, int]:
    """Script and save ``saved_model.pt``, then load it back and check the contract on an odd size.
    Returns (how the backbone was compiled, embedding width)."""
    from uniembed.export.model import quiet_jit, script_model

    with console.status("TorchScript: scripting the GUIE model"):
        ts, how = script_model(rm.model, rm.preprocess.input_size)
        with quiet_jit():
            with atomic_path(out / SAVED_MODEL) as tmp:
                torch.jit.save(ts, str(tmp))
            # Round trip: what was saved is what loads, and it honours the contract on an odd size.
            loaded = torch.jit.load(str(out / SAVED_MODEL))
        with torch.no_grad():
            y = loaded(torch.randint(0, 256, (2, 3, 97, 301), dtype=torch.uint8))
        if y.dtype != torch.float32 or tuple(y.shape) != (2, int(rm.record.embedding_dim or y.shape[1])):
            raise RuntimeError(f"saved_model.pt returned {y.dtype} {tuple(y.shape)}; expected float32 [2, D]")
    console.print(f"[green]saved_model.pt[/] written (backbone {how}), output {tuple(y.shape)}")
    return how, int(y.shape[1])


def _write_onnx(rm: RunModel, out: Path, console: Console) -> dict:
    """``model.onnx`` (verified in onnxruntime); its export.json entry."""
    from uniembed.export.onnx_export import export_onnx

    with console.status("ONNX: exporting and verifying in onnxruntime (takes a few seconds)"):
        try:
            onnx_rec = export_onnx(rm.model, out / "model.onnx", rm.preprocess.input_size)
        except Exception as e:  # both the dynamic and the fixed-size export failed
            raise RuntimeError(
                f"ONNX export failed ({type(e).__name__}: {str(e)[:500]}); saved_model.pt is written, "
                "rerun with --no-onnx to finish the export without model.onnx"
            ) from e
    console.print(
        f"[green]model.onnx[/] written (dynamic H/W: {onnx_rec['dynamic_hw']}, "
        f"max |diff| on random inputs {onnx_rec['verify_max_abs_diff']:.2e})"
    )
    return onnx_rec


def _check_parity(
    rm: RunModel, out: Path, with_onnx: bool, n_images: int, photos: list[str] | None, console: Console
) -> dict:
    """The parity report of the written files against the Python pipeline (printed, not raised)."""
    from uniembed.export.parity import check_parity

    with console.status(f"parity check on up to {n_images} real images"):
        parity = check_parity(
            rm,
            out / SAVED_MODEL,
            out / "model.onnx" if with_onnx else None,
            n_images=n_images,
            photos=photos,
        )
    color = "green" if parity["passed"] else "red"
    console.print(
        f"[{color}]parity[/] min cosine {parity['min_cosine']:.6f}, max |diff| "
        f"{parity['max_abs_diff']:.2e} ({'passed' if parity['passed'] else 'FAILED'})"
    )
    return parity


def _export_record(
    rm: RunModel, run: Path, out: Path, how: str, dim: int, onnx_rec: dict | None, parity: dict | None
) -> dict:
    """export.json: what was exported, from which run and backbone, and how it was checked."""
    bb = rm.backbone
    fingerprint = file_fingerprint(out / SAVED_MODEL)
    return {
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
        "embedding_dim": dim,
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
        "preprocess": rm.preprocess.to_dict(),
        "head": rm.record.head_config,
        "selected_epoch": rm.record.selected_epoch,
        "feature_dirs": [str(d) for d in rm.record.feature_dirs()],
        "parity": parity,
    }
