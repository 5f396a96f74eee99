"""Optional second stage: fine-tune the last backbone blocks end-to-end, at a low lr, on the prepared images.

Stage 1 trains the head on cached features; here the same head, the same margin loss (its class centres are
restored from stage 1's checkpoint) and the backbone's last ``finetune.blocks`` blocks are trained together
on decoded images from the prepared shards (``uniembed.data.shards``). Backbone BatchNorm layers stay in eval
mode (their running statistics are frozen): the batches here are small, and re-estimating ImageNet statistics
from a few dozen images would hurt more than help.

Outputs in the run dir:
- ``backbone_finetuned.pt``: ``state_dict`` of ``create_backbone(backbone, pooling=pooling).module``.
- ``head.pt`` is rewritten with the fine-tuned head and ``"backbone_state": "backbone_finetuned.pt"`` (a path
  relative to the run dir; export loads it onto the freshly created backbone module) plus a ``"finetune"``
  record (blocks, lr, steps, images, skipped).
- a ``{"kind": "finetune", ...}`` line in metrics.jsonl and a ``finetune`` entry in summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from uniembed.core.run_record import HEAD_FILE, HeadRecord
from uniembed.models.losses import EmbeddingLoss, build_loss
from uniembed.train.checkpoint import CHECKPOINT_FILE, load_head, load_loss_state, save_torch
from uniembed.train.config import TrainConfig
from uniembed.train.data import TrainData
from uniembed.train.distributed import resolve_device
from uniembed.train.optim import build_optimizer
from uniembed.train.report import METRICS_FILE, add_to_summary, step_progress
from uniembed.train.validate import score

if TYPE_CHECKING:
    from uniembed.models.registry import Backbone

BACKBONE_STATE_FILE = "backbone_finetuned.pt"


def backbone_blocks(module: nn.Module) -> list[nn.Module]:
    """The trunk's blocks in order, so "the last N blocks" is well defined.

    Our CNN backbones (``CNNFeatureNet``) keep the trunk in ``.body`` (for MobileNetV2: the 19 children of
    torchvision's ``features``); timm models expose ``blocks`` (ViT), ``stages`` or ``layers``; a plain
    ``nn.Sequential`` uses its children. A ``+colour`` backbone's CNN is its ``.net`` (the colour block has no
    weights).
    """
    from uniembed.models.colour import WithColour

    if isinstance(module, WithColour):
        module = module.net
    for path in (
        "body",
        "model.blocks",
        "model.stages",
        "model.layers",
        "model.features",
        "blocks",
        "stages",
    ):
        m: Any = module
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if isinstance(m, nn.Sequential | nn.ModuleList) and len(m) > 0:
            return list(m.children())
    kids = list(module.children())
    if len(kids) == 1 and isinstance(kids[0], nn.Sequential | nn.ModuleList):
        return list(kids[0].children())
    return kids


def unfreeze_last_blocks(module: nn.Module, n: int) -> list[nn.Parameter]:
    """Freeze everything, then make the last ``n`` trunk blocks trainable; returns their parameters."""
    blocks = backbone_blocks(module)
    if not 1 <= n <= len(blocks):
        raise ValueError(f"finetune.blocks must be in 1..{len(blocks)} for this backbone, got {n}")
    for p in module.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for b in blocks[-n:]:
        for p in b.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def _load_images(
    ds_dir: str, wanted: dict[str, int], console: Any
) -> tuple[list[bytes], list[int], list[str], dict[str, int]]:
    """JPEG bytes (kept encoded: ~40 kB each) and class ids of the wanted sample keys, in key order."""
    from uniembed.data.shards import iter_samples

    data, ys, keys = [], [], []
    skipped: dict[str, int] = {}
    for s in iter_samples(ds_dir):
        y = wanted.get(s.key)
        if y is None:
            continue
        data.append(s.image_bytes)
        ys.append(y)
        keys.append(s.key)
    missing = len(wanted) - len(keys)
    if missing:
        skipped["key_not_in_dataset"] = missing
        console.print(f"[yellow]finetune: {missing} sample key(s) of the features are not in {ds_dir}[/]")
    return data, ys, keys, skipped


def _decode_batch(
    blobs: list[bytes], pre: nn.Module, augment: bool, skipped: dict[str, int]
) -> tuple[torch.Tensor | None, list[int]]:
    """Decode + preprocess; undecodable images are skipped and counted (by reason)."""
    from torchvision.transforms.functional import pil_to_tensor

    from uniembed.data.images import BadImageError, load_image

    out, ok = [], []
    for i, b in enumerate(blobs):
        try:
            t = pil_to_tensor(load_image(b))
        except BadImageError as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        if augment:
            if torch.rand(()) < 0.5:
                t = t.flip(-1)
            h, w = t.shape[-2:]
            s = float(torch.empty(()).uniform_(0.8, 1.0))
            ch, cw = max(1, int(h * s)), max(1, int(w * s))
            y0 = int(torch.randint(0, h - ch + 1, ()))
            x0 = int(torch.randint(0, w - cw + 1, ()))
            t = t[:, y0 : y0 + ch, x0 : x0 + cw]
        out.append(pre(t[None])[0])
        ok.append(i)
    return (torch.stack(out) if out else None), ok


def _embed_images(
    bb_module: nn.Module,
    head: nn.Module,
    pre: nn.Module,
    blobs: list[bytes],
    batch: int,
    skipped: dict[str, int],
) -> tuple[torch.Tensor, list[int]]:
    embs, kept = [], []
    bb_module.eval()
    head.eval()
    with torch.no_grad():
        for s in range(0, len(blobs), batch):
            x, ok = _decode_batch(blobs[s : s + batch], pre, False, skipped)
            if x is None:
                continue
            dev = next(head.parameters()).device
            embs.append(head(bb_module(x.to(dev))).cpu())
            kept += [s + i for i in ok]
    return (torch.cat(embs) if embs else torch.zeros(0, 1)), kept


@dataclass
class _Stage:
    """The fine-tune stage's models and optimiser: backbone (last blocks trainable), head, loss on ``dev``."""

    backbone_name: str | None
    backbone: Backbone
    bb_params: list[nn.Parameter]
    pre: nn.Module
    head: nn.Module
    rec: HeadRecord
    loss: EmbeddingLoss
    dev: torch.device
    opt: torch.optim.Optimizer


def _create_backbone(data: TrainData) -> Backbone:
    """The pretrained backbone the features came from; refuses one whose feature function differs."""
    from uniembed.models.registry import create_backbone

    name, pooling = data.info.get("backbone"), data.info.get("pooling", "avg")
    bb = create_backbone(name, pretrained=True, pooling=pooling)
    if data.info.get("fingerprint") and bb.fingerprint() != data.info["fingerprint"]:
        raise ValueError(
            f"backbone {name}/{pooling} here has fingerprint {bb.fingerprint()}, but the features "
            f"were extracted with {data.info['fingerprint']}: fine-tuning would start from a "
            "different feature function than the head was trained on"
        )
    return bb


def _build_stage(cfg: TrainConfig, run: Path, data: TrainData) -> _Stage:
    """Backbone, stage 1's head and loss (its class centres from the checkpoint), one optimiser over all."""
    ft = cfg.finetune
    bb = _create_backbone(data)
    torch.manual_seed(cfg.seed + 17)
    bb_params = unfreeze_last_blocks(bb.module, ft.blocks)
    pre = bb.preprocessor()
    head, rec = load_head(run)
    loss = build_loss(cfg.loss, len(data.classes), int(rec.embedding_dim), data.class_counts())
    dev = resolve_device(cfg.device, 0)
    load_loss_state(run / CHECKPOINT_FILE, loss)
    bb.module.to(dev)
    head.to(dev)
    loss.to(dev)
    opt = build_optimizer(
        cfg,
        head,
        loss,
        head_lr=ft.head_lr,
        extra_groups=[
            {"params": bb_params, "lr": ft.lr, "weight_decay": cfg.optim.weight_decay, "name": "backbone"}
        ],
    )
    return _Stage(data.info.get("backbone"), bb, bb_params, pre, head, rec, loss, dev, opt)


def _val_before(cfg: TrainConfig, ds: str, data: TrainData, st: _Stage, console: Any) -> tuple | None:
    """Val images, embedded before fine-tuning through the same decode path as after (a fair comparison):
    ``(blobs, feature rows, skipped counts, embeddings)``, or None when not evaluating."""
    ft = cfg.finetune
    if not (ft.evaluate and len(data.val_idx) > 1):
        return None
    vi = data.val_idx
    if ft.max_val_images and ft.max_val_images < len(vi):
        vi = np.sort(np.random.default_rng(cfg.seed + 1).choice(vi, ft.max_val_images, replace=False))
    row_of = {data.keys[i]: int(i) for i in vi}
    vblobs, _, vkeys, vskip = _load_images(ds, dict.fromkeys(row_of, 0), console)
    before, kept = _embed_images(st.backbone.module, st.head, st.pre, vblobs, 64, vskip)
    vblobs = [vblobs[i] for i in kept]  # undecodable ones are counted in vskip and left out
    vrows = np.array([row_of[vkeys[i]] for i in kept], dtype=np.int64)
    return vblobs, vrows, vskip, before


def _training_images(
    cfg: TrainConfig, ds: str, data: TrainData, console: Any
) -> tuple[list[bytes], torch.Tensor, dict[str, int]]:
    """The training rows' images (class ids from stage 1), optionally a seeded subset; skipped counts."""
    ft = cfg.finetune
    tr_keys = [data.keys[i] for i in data.train_idx]
    tr_y = data.y_train.tolist()
    sel = np.arange(len(tr_keys))
    if ft.max_images and ft.max_images < len(sel):
        sel = np.sort(np.random.default_rng(cfg.seed).choice(len(sel), ft.max_images, replace=False))
    wanted = {tr_keys[i]: tr_y[i] for i in sel}
    blobs, ys, _, skipped = _load_images(ds, wanted, console)
    if not blobs:
        raise ValueError(f"finetune: none of the training images were found in {ds}")
    return blobs, torch.tensor(ys, dtype=torch.long), skipped


def _train_stage(
    cfg: TrainConfig,
    st: _Stage,
    blobs: list[bytes],
    y_all: torch.Tensor,
    skipped: dict[str, int],
    console: Any,
) -> list[float]:
    """The fine-tune epochs; returns the loss of every step."""
    ft, B = cfg.finetune, cfg.finetune.batch_size
    steps_per_epoch = (len(blobs) + B - 1) // B
    if ft.max_steps:
        steps_per_epoch = min(steps_per_epoch, ft.max_steps)
    console.print(
        f"[bold]finetune[/] {st.backbone_name}: last {ft.blocks} block(s) "
        f"({sum(p.numel() for p in st.bb_params):,} params), {len(blobs)} images, {ft.epochs} epoch(s) x "
        f"{steps_per_epoch} steps"
    )
    losses: list[float] = []
    progress = step_progress("finetune", console, enabled=cfg.progress)
    with progress:
        task = progress.add_task("ft", total=steps_per_epoch * ft.epochs, ep="-", loss="-")
        for epoch in range(1, ft.epochs + 1):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 500_000 + epoch)
            order = torch.randperm(len(blobs), generator=g)
            st.backbone.module.eval()  # frozen BN statistics (see module docstring); dropout-free trunk
            st.head.train()
            for s in range(steps_per_epoch):
                idx = order[s * B : (s + 1) * B].tolist()
                x, ok = _decode_batch([blobs[i] for i in idx], st.pre, ft.augment, skipped)
                if x is None or (st.head.use_bn and len(ok) < 2):
                    continue
                y = y_all[[idx[i] for i in ok]].to(st.dev)
                feats = st.backbone.module(x.to(st.dev))
                out = st.loss(st.head(feats), y, feats.detach() if st.loss.distill is not None else None)
                st.opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                st.opt.step()
                losses.append(float(out["loss"].detach()))
                progress.update(task, advance=1, ep=f"{epoch}/{ft.epochs}", loss=f"{losses[-1]:.4f}")
    return losses


def _score_after(st: _Stage, val: tuple, data: TrainData, record: dict[str, Any], console: Any) -> None:
    """Val mP@5 before and after fine-tuning into ``record`` (when every val image decoded both times)."""
    vblobs, vrows, vskip, before = val
    emb, kept = _embed_images(st.backbone.module, st.head, st.pre, vblobs, 64, vskip)
    if kept == list(range(len(vblobs))) and len(vrows) > 1:
        record["val_images"] = len(vrows)
        record["val_skipped"] = vskip
        record["val_before"] = score(before, data.label_names[vrows], data.domains[vrows])
        record["val"] = score(emb, data.label_names[vrows], data.domains[vrows])
        console.print(
            f"finetune: val mP@5 {record['val_before']['mP@5']:.4f} (before) -> "
            f"{record['val']['mP@5']:.4f} (fine-tuned) on {len(vrows)} val images"
        )


def _write_outputs(run: Path, st: _Stage, record: dict[str, Any]) -> None:
    """head.pt with the fine-tuned head and backbone, a metrics.jsonl line, summary.json's entry."""
    dataclasses.replace(
        st.rec,
        state_dict={k: v.detach().cpu().clone() for k, v in st.head.state_dict().items()},
        backbone_state=BACKBONE_STATE_FILE,
        finetune=record,
    ).save(run / HEAD_FILE)
    with open(run / METRICS_FILE, "a") as f:
        f.write(json.dumps({"kind": "finetune", **record}) + "\n")
    add_to_summary(run, "finetune", record)


def finetune(cfg: TrainConfig, run: Path, data: TrainData, console: Any) -> dict:
    """Run the fine-tune stage after head training; returns its record (also written to the run dir)."""
    ft = cfg.finetune
    ds = ft.dataset or data.info.get("dataset_dir")
    if not ds:
        raise ValueError(
            "finetune needs the prepared dataset: set finetune.dataset (the features' info.json "
            "has no dataset_dir)"
        )
    st = _build_stage(cfg, run, data)
    val = _val_before(cfg, ds, data, st, console)
    t0 = time.perf_counter()
    blobs, y_all, skipped = _training_images(cfg, ds, data, console)
    losses = _train_stage(cfg, st, blobs, y_all, skipped, console)
    train_s = time.perf_counter() - t0

    bb_state = {k: v.detach().cpu() for k, v in st.backbone.module.state_dict().items()}
    save_torch(bb_state, run / BACKBONE_STATE_FILE)
    record: dict[str, Any] = {
        "blocks": ft.blocks,
        "lr": ft.lr,
        "head_lr": ft.head_lr,
        "epochs": ft.epochs,
        "steps": len(losses),
        "images": len(blobs),
        "skipped": skipped,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "train_s": round(train_s, 2),
        "dataset": str(ds),
    }
    if val is not None:
        _score_after(st, val, data, record, console)
    _write_outputs(run, st, record)
    return record
