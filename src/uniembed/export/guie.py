"""``export_guie(run_dir, out_dir)``: a run -> saved_model.pt, model.onnx, model_card.md, export.json.

The files are written into a hidden staging folder inside ``out_dir`` and moved into place together at the
end, export.json last: a killed export leaves the previous export whole (never a new saved_model.pt beside
the old export.json), and the next export removes the staging folders of dead ones.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from uniembed.core.fsutil import atomic_path, atomic_write_text
from uniembed.export.model_files import SAVED_MODEL, file_fingerprint

if TYPE_CHECKING:
    from rich.console import Console

    from uniembed.export.model import RunModel

#: The export's files in the order they are moved into place: export.json, which ties them together, last.
EXPORT_FILES = ("model.onnx", SAVED_MODEL, "model_card.md", "export.json")
_STAGE_PREFIX = ".export-"


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

    from uniembed.export.model import build_run_model
    from uniembed.export.parity import require_parity

    console = Console(stderr=True, quiet=not progress)
    run = Path(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _drop_dead_stages(out)
    with console.status("building the model from the run"):
        rm = build_run_model(run)
    stage = Path(tempfile.mkdtemp(prefix=f"{_STAGE_PREFIX}{os.getpid()}-", dir=out))
    try:
        record = _export_into(rm, run, stage, onnx, parity_images, photos, check_parity, console)
        for name in EXPORT_FILES:
            if (stage / name).exists():
                os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if record["parity"] is not None:
        require_parity(record["parity"])
    return record


def _export_into(
    rm: RunModel,
    run: Path,
    stage: Path,
    onnx: bool,
    parity_images: int,
    photos: list[str] | None,
    check_parity: bool,
    console: Console,
) -> dict:
    """Write every file of the export into ``stage``; returns the export record."""
    from uniembed.export.card import write_card
    from uniembed.export.model import feature_info

    how, dim = _write_saved_model(rm, stage, console)
    onnx_rec = _write_onnx(rm, stage, console) if onnx else None
    parity = None
    if check_parity:
        parity = _check_parity(rm, stage, onnx_rec is not None, parity_images, photos, console)

    fdirs = rm.record.feature_dirs()
    finfo = feature_info(fdirs[0]) if fdirs else {}
    if fdirs:
        finfo["_dir"] = str(fdirs[0])
    manifest = None
    ds = finfo.get("dataset") or finfo.get("dataset_dir")
    if ds and (Path(ds) / "manifest.json").exists():
        manifest = json.loads((Path(ds) / "manifest.json").read_text())
    record = _export_record(rm, run, stage, how, dim, onnx_rec, parity)
    atomic_write_text(stage / "export.json", json.dumps(record, indent=2))
    write_card(stage, record, run, finfo, manifest)
    return record


def _drop_dead_stages(out: Path) -> None:
    """Remove staging folders that exports killed before they finished left in ``out`` (their process is
    gone); a live export's folder is kept."""
    for d in out.glob(f"{_STAGE_PREFIX}*"):
        pid = d.name[len(_STAGE_PREFIX) :].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def _write_saved_model(rm: RunModel, out: Path, console: Console) -> tuple[str, int]:
    """Script and save ``saved_model.pt``, then load it back and check the contract on an odd size.
    Returns (how the backbone was compiled, embedding width)."""
    from uniembed.export.model import quiet_jit, script_model

    with console.status("TorchScript: scripting the GUIE model"):
        ts, how = script_model(rm.model, rm.preprocess.input_size)
        with quiet_jit():
            # Through a file object: given a path, TorchScript names the archive's root folder after the
            # (random, temporary) file name, so two exports of one run would differ in bytes and fingerprint.
            with atomic_path(out / SAVED_MODEL) as tmp, open(tmp, "wb") as f:
                torch.jit.save(ts, f)
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
