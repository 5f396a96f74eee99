"""``model_card.md``: what the exported model is, what it was trained on, how well it does, how to call it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from uniembed.core.fsutil import atomic_write_text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def run_metrics(run_dir: Path) -> tuple[str, dict] | None:
    """The run's evaluation: ``<run>/eval/metrics.json`` (from ``uniembed evaluate RUN --out RUN/eval``) if
    present, else the training summary's validation scores. (source description, dict) or None."""
    ev = run_dir / "eval" / "metrics.json"
    if ev.exists():
        return f"`uniembed evaluate` ({ev})", json.loads(ev.read_text())
    summ = run_dir / "summary.json"
    if summ.exists():
        return f"training validation ({summ})", json.loads(summ.read_text())
    return None


def _metrics_section(run_dir: Path) -> list[str]:
    got = run_metrics(run_dir)
    if got is None:
        return ["No evaluation found in the run (run `uniembed evaluate RUN --out RUN/eval`)."]
    where, m = got
    lines = [f"Source: {where}. mP@5 is the GUIE metric (leave-one-out over held-out labels).", ""]
    if "methods" in m:  # evaluate's metrics.json
        lines.append(
            f"Split: {m.get('split')}, images: {m.get('n_images')}, domains: "
            f"{', '.join(m.get('domains', []))}."
        )
        lines.append("")
        rows = []
        for name, r in m["methods"].items():
            o = r["overall"]
            rows.append([name, o["mP@5"], o["recall@1"], o["recall@5"], o["mAP@100"], o["queries"]])
        lines += _table(["method", "mP@5", "recall@1", "recall@5", "mAP@100", "queries"], rows)
        doms = sorted({d for r in m["methods"].values() for d in r["per_domain"]})
        lines += ["", "mP@5 per query domain:", ""]
        lines += _table(
            ["method", *doms],
            [
                [n, *[r["per_domain"].get(d, {}).get("mP@5", float("nan")) for d in doms]]
                for n, r in m["methods"].items()
            ],
        )
        return lines
    val = m.get("val") or {}
    base = m.get("baselines") or {}
    rows = []
    if val:
        rows.append(["head", val.get("mP@5"), val.get("recall@1"), val.get("recall@5"), val.get("mAP@100")])
    for n, b in sorted(base.items()):
        rows.append([n, b.get("mP@5"), b.get("recall@1"), b.get("recall@5"), b.get("mAP@100")])
    lines += _table(["method", "mP@5", "recall@1", "recall@5", "mAP@100"], rows)
    if val.get("per_domain"):
        doms = sorted(val["per_domain"])
        lines += ["", "mP@5 per query domain:", ""]
        lines += _table(
            ["method", *doms],
            [["head", *[val["per_domain"][d] for d in doms]]]
            + [
                [n, *[b.get("per_domain", {}).get(d, float("nan")) for d in doms]]
                for n, b in sorted(base.items())
            ],
        )
    return lines


def _data_section(feature_info: dict, manifest: dict | None, summary: dict | None) -> list[str]:
    lines = [
        f"Features: `{feature_info.get('_dir', '?')}` ({feature_info.get('count', '?')} images, "
        f"dim {feature_info.get('dim', '?')}), prepared dataset "
        f"`{feature_info.get('dataset') or feature_info.get('dataset_dir') or '?'}` "
        f"(manifest hash {str(feature_info.get('manifest_hash', '?'))[:12]})."
    ]
    if manifest:
        lines += ["", "Sources:", ""]
        lines += _table(
            ["source", "kind", "images", "labels"],
            [
                [s.get("name"), s.get("kind"), s.get("n_images"), s.get("n_labels")]
                for s in manifest.get("sources", [])
            ],
        )
        lines += ["", "Domains:", ""]
        lines += _table(
            ["domain", "images", "classes"],
            [[d, v.get("images"), v.get("classes")] for d, v in sorted(manifest.get("domains", {}).items())],
        )
        if manifest.get("skipped_counts"):
            lines += [
                "",
                "Skipped while preparing: "
                + ", ".join(f"{k}: {v}" for k, v in manifest["skipped_counts"].items()),
            ]
    split = (summary or {}).get("split")
    if split:
        lines += ["", "Label split (train labels / held-out labels, per domain):", ""]
        lines += _table(
            ["domain", "train labels", "val labels"],
            [[d, v.get("train_labels"), v.get("val_labels")] for d, v in sorted(split.items())],
        )
    return lines


def write_card(out: Path, export: dict, run_dir: Path, feature_info: dict, manifest: dict | None) -> Path:
    """Write ``model_card.md`` from the export record, the run's config/summary and the data manifest."""
    cfg: dict = {}
    if (run_dir / "config.yaml").exists():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    summary = (
        json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else None
    )
    lines = [f"# Model card: `{run_dir.name}` GUIE embedder", ""]
    lines += _contract_section(export)
    lines += _backbone_section(export)
    lines += ["## Data", "", *_data_section(feature_info, manifest, summary), ""]
    lines += _recipe_section(export, cfg)
    lines += ["## Metrics", "", *_metrics_section(run_dir), ""]
    lines += ["## Parity", "", *_parity_lines(export.get("parity") or {})]
    lines += ["", f"Exported {export['created']} with torch {export['torch']}.", ""]
    path = out / "model_card.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _contract_section(export: dict) -> list[str]:
    """How to call the exported files: input/output contract, fingerprint, a usage snippet."""
    sm, onnx, pre = export["saved_model"], export.get("onnx"), export["preprocess"]
    lines = [
        "## Contract",
        "",
        f"- `saved_model.pt` (TorchScript, `torch.jit.load`): input **uint8 [B,3,H,W]** RGB, any H and W "
        f"(e.g. `PILToTensor()(img).unsqueeze(0)`); output **float32 [B,{export['embedding_dim']}]**, "
        "L2-normalised. Preprocessing (squash resize to "
        f"{pre['input_size']}x{pre['input_size']}, antialiased "
        f"{pre['interpolation']}, scale, mean/std), backbone, pooling and head are inside.",
        "- Compare embeddings with Euclidean distance (or cosine: they are unit vectors).",
        f"- Model fingerprint (sha256 of saved_model.pt, first 16 hex): `{sm['fingerprint']}`; "
        f"backbone {sm['backbone_compiled']} into TorchScript.",
    ]
    if onnx:
        lines.append(
            f"- `model.onnx` (opset {onnx['opset']}): input {onnx['input']}, output {onnx['output']}; "
            + (
                "dynamic batch, height and width."
                if onnx["dynamic_hw"]
                else "**fixed-size variant**: dynamic H/W export failed, resize to S x S first. "
                + onnx.get("notes", "")
            )
        )
    else:
        lines.append("- `model.onnx`: not exported (--no-onnx).")
    return lines + [
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from torchvision.transforms import PILToTensor",
        "model = torch.jit.load('saved_model.pt')",
        "emb = model(PILToTensor()(Image.open('photo.jpg').convert('RGB')).unsqueeze(0))  # [1, 64]",
        "```",
        "",
    ]


def _backbone_section(export: dict) -> list[str]:
    bb, pre = export["backbone"], export["preprocess"]
    return [
        "## Backbone",
        "",
        f"- `{bb['name']}`, pooling `{bb['pooling']}`, feature width {bb['dim']}, input "
        f"{pre['input_size']} px (mean {pre['mean']}, "
        f"std {pre['std']}, scale {pre['scale']:.6g}).",
        f"- Weights: `{bb['weights']}`",
        f"- Weights sha256: `{bb['weights_hash']}`",
        f"- Feature fingerprint: `{bb['fingerprint']}`"
        + (" (fine-tuned by the run's second stage)" if bb.get("finetuned") else " (frozen)"),
        *_colour_lines(str(bb.get("pooling") or "")),
        *_member_lines(bb.get("members") or []),
        "",
    ]


def _recipe_section(export: dict, cfg: dict) -> list[str]:
    """The training recipe from the run's config.yaml (``?`` for what it does not say)."""
    return [
        "## Recipe",
        "",
        f"- Head: `{json.dumps(export['head'])}`",
        f"- Loss: `{json.dumps(cfg.get('loss', '?'))}`",
        f"- Optimizer: `{json.dumps(cfg.get('optim', '?'))}`",
        f"- Schedule: `{json.dumps(cfg.get('schedule', '?'))}`",
        f"- Epochs {cfg.get('epochs', '?')}, batch {cfg.get('batch_size', '?')}, sampler "
        f"{cfg.get('sampler', '?')}, seed {cfg.get('seed', '?')}, train domains "
        f"{cfg.get('train_domains') or 'all'}, head selection {cfg.get('select', '?')}"
        + (f" (epoch {export['selected_epoch']})" if export.get("selected_epoch") is not None else ""),
        f"- Fine-tuning: {json.dumps(cfg.get('finetune', {}).get('enabled', False))}",
        "",
    ]


def _parity_lines(par: dict) -> list[str]:
    """The parity check's verdict and its comparisons ("not checked" without a report)."""
    if not par:
        return ["Parity not checked."]
    lines = [
        f"Required: cosine >= {par['threshold_cosine']} for every image. Result: "
        f"**{'passed' if par['passed'] else 'FAILED'}** (min cosine {par['min_cosine']:.6f}, "
        f"max |diff| {par['max_abs_diff']:.2e}; {par['images']['shard_samples']} shard images, "
        f"{par['images']['photos']} original photos of sizes {', '.join(par['photo_sizes'])}).",
        "",
        *_table(
            ["comparison", "images", "max abs diff", "min cosine"],
            [
                [c["name"], c["n"], f"{c['max_abs_diff']:.2e}", f"{c['min_cosine']:.6f}"]
                for c in par["comparisons"]
            ],
        ),
    ]
    return lines + [f"- note: {n}" for n in par.get("notes", [])]


def _member_lines(members: list[dict]) -> list[str]:
    """An ensemble backbone: each member's own input (the pixels above are only scaled to [0, 1])."""
    if not members:
        return []
    out = [
        "- Ensemble: each member resizes to its own side and normalises its own way; its pooled features "
        "are L2-normalised, then the members are joined (scaled by 1/sqrt(n)):"
    ]
    for m in members:
        p = m.get("preprocess", {})
        out.append(
            f"  - `{m['name']}` ({m['dim']}-d, pooling `{m.get('pooling', '')}`): {p.get('input_size')} px, "
            f"mean {p.get('mean')}, std {p.get('std')}, scale {float(p.get('scale', 0)):.6g}"
        )
    return out


def _colour_lines(pooling: str) -> list[str]:
    """What a ``+colour`` pooling adds, in words (the block has no weights, so nothing else names it)."""
    from uniembed.models.colour import COLOUR_BINS, COLOUR_WEIGHT, split_colour

    if not split_colour(pooling)[1]:
        return []
    return [
        f"- Colour block (`+colour`): joint RGB histogram of the resized input, {COLOUR_BINS} bins a channel "
        f"({COLOUR_BINS**3} features), square-rooted, L2-normalised, weight {COLOUR_WEIGHT:.4g}; computed "
        "inside the model after the CNN features (uniembed/models/colour.py)."
    ]
