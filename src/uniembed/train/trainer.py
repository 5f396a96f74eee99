"""Train a projection head on cached features: ``train(config) -> run_dir``.

- Features live in memory as one float32 tensor (on the training device); batches are index permutations.
- Seeded and deterministic; an atomic checkpoint each epoch (model, loss centres, optimizer, scheduler, epoch,
  RNG states of every rank) lets ``resume=True`` continue exactly where it stopped.
- Validation each epoch on held-out ("unseen") labels: GUIE mP@5 leave-one-out, overall and per domain, next
  to two baselines computed once on the same split: raw (L2-normalised) features and PCA-64.
- DDP: launched with ``torchrun --nproc_per_node N``; each rank takes a contiguous shard of every global
  batch; gradients are averaged by DDP and the per-rank loss is rescaled so the update equals that of one
  process on the whole batch (exactly, up to float summation order, when the head has no BatchNorm/dropout:
  BatchNorm statistics are per shard unless SyncBatchNorm, which needs CUDA, and dropout masks come from
  per-rank RNGs). The distillation term all-gathers the batch so its similarity matrix is the global one.
  Rank 0 validates and writes every output.

Run directory: ``config.yaml``, ``head.pt``, ``checkpoint.pt``, ``metrics.jsonl``, ``curve.png``,
``summary.json``, ``split.json`` (train / held-out labels), and ``backbone_finetuned.pt`` after the optional
fine-tune stage.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from uniembed.core.run_record import HEAD_FILE, HeadRecord
from uniembed.models.heads import build_head, head_config, init_head_from_features, pca_fit
from uniembed.models.losses import EmbeddingLoss, build_loss
from uniembed.train.config import TrainConfig
from uniembed.train.data import TrainData, epoch_order, nearest_rows, prepare_data

CHECKPOINT_FILE = "checkpoint.pt"
#: Config keys that may differ between a checkpoint and a resumed run.
RESUMABLE_CHANGES = {"epochs", "progress", "out", "finetune", "val_every", "select", "device"}


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # we called init_process_group (so we tear it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _resolve_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {pref!r} requested but CUDA is not available")
    return dev


def setup_distributed(device_pref: str) -> DistInfo:
    """Read torchrun's environment (WORLD_SIZE/RANK/LOCAL_RANK); one process when absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_pref, local_rank)
    info = DistInfo(rank=rank, world=world, device=device)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            info.started_here = True
    return info


def _gather_rows(t: torch.Tensor, sizes: list[int], differentiable: bool) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (= the global batch order). all_gather needs equal shapes,
    so shards are zero-padded to the largest and trimmed after."""
    m = max(sizes)
    padded = torch.cat([t, t.new_zeros((m - t.shape[0], *t.shape[1:]))]) if t.shape[0] < m else t
    if differentiable:
        import torch.distributed.nn.functional as dist_nn

        parts = dist_nn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


class TrainModule(nn.Module):
    """Head + loss in one module so DDP averages the gradients of both (the class centres are parameters)."""

    def __init__(self, head: nn.Module, loss: EmbeddingLoss):
        super().__init__()
        self.head = head
        self.loss = loss

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        margin_scale: float = 1.0,
        shard_sizes: list[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        emb = self.head(x)
        out: dict[str, torch.Tensor] = {}
        total = emb.new_zeros(())
        if self.loss.margin is not None:
            m = self.loss.margin(emb, y)
            out["margin"] = m.detach()
            # Per-rank mean x (n_rank * world / n_global): DDP's average over ranks = the global-batch mean.
            total = total + self.loss.margin_weight * m * margin_scale
        pairwise = [
            (name, term, w)
            for name, term, w in (
                ("distill", self.loss.distill, self.loss.distill_weight),
                ("rank", self.loss.rank, self.loss.rank_weight),
            )
            if term is not None
        ]
        if pairwise:  # in-batch similarity terms: over the whole global batch, as in one process
            if shard_sizes is not None:
                e_all = _gather_rows(emb, shard_sizes, differentiable=True)
                x_all = _gather_rows(x, shard_sizes, differentiable=False)
            else:
                e_all, x_all = emb, x
            for name, term, w in pairwise:
                v = term(e_all, x_all)
                out[name] = v.detach()
                total = total + w * v
        out["loss"] = total
        return out


# ---------------------------------------------------------------------------------------------- evaluation
def embed(head: nn.Module, feats: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """Head outputs for many rows, in eval mode, on CPU."""
    was = head.training
    head.eval()
    with torch.no_grad():
        out = torch.cat([head(feats[i : i + batch]).float().cpu() for i in range(0, feats.shape[0], batch)])
    head.train(was)
    return out


def score(emb: torch.Tensor | np.ndarray, names: np.ndarray, domains: np.ndarray) -> dict[str, Any]:
    """GUIE mP@5 (leave-one-out) over all held-out images, plus per query domain."""
    from uniembed.core.metrics import per_domain_mp5, retrieval_metrics

    _, lab = np.unique(np.asarray(names, dtype=str), return_inverse=True)
    res = retrieval_metrics(np.asarray(emb, dtype=np.float32), lab)
    d = res.as_dict()
    d["per_domain"] = per_domain_mp5(res, domains)
    return d


def baselines(data: TrainData, out_dim: int) -> dict[str, dict]:
    """Raw L2-normalised features and PCA-``out_dim`` (fitted on the training rows) on the val split."""
    raw = F.normalize(data.feats.cpu(), dim=1)
    val = raw[data.val_idx]
    out = {"raw": score(val, data.label_names[data.val_idx], data.domains[data.val_idx])}
    k = min(out_dim, data.dim, len(data.train_idx))
    mean, comps, _ = pca_fit(raw[data.train_idx], k)
    pca = F.normalize((val - mean) @ comps.T, dim=1)
    out[f"pca{k}"] = score(pca, data.label_names[data.val_idx], data.domains[data.val_idx])
    return out


# ---------------------------------------------------------------------------------------------- helpers
def _set_determinism(cfg: TrainConfig, device: torch.device) -> None:
    if not cfg.deterministic:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def step_progress(what: str, console: Any, enabled: bool) -> Any:
    """The per-step bar of head training and fine-tuning: '<what> <epoch>', steps done, running loss."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{what} {{task.fields[ep]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )


def _rng_state() -> dict:
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp name in the same folder, then os.replace (a crash never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.schedule.warmup_epochs * steps_per_epoch))
    floor = cfg.schedule.min_lr_ratio

    def f(step: int) -> float:
        if cfg.schedule.name == "none":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * prog))

    return f


def build_optimizer(
    cfg: TrainConfig,
    head: nn.Module,
    loss: nn.Module,
    head_lr: float | None = None,
    extra_groups: list[dict] | None = None,
) -> torch.optim.Optimizer:
    """Head params at (lr, weight_decay); the loss's class centres in their own group (x centers_lr_mult)."""
    o = cfg.optim
    lr = o.lr if head_lr is None else head_lr
    groups = [
        {
            "params": [p for p in head.parameters() if p.requires_grad],
            "lr": lr,
            "weight_decay": o.weight_decay,
            "name": "head",
        }
    ]
    centres = [p for p in loss.parameters() if p.requires_grad]
    if centres:
        groups.append(
            {
                "params": centres,
                "lr": lr * o.centers_lr_mult,
                "weight_decay": o.centers_weight_decay,
                "name": "centers",
            }
        )
    groups += extra_groups or []
    if o.name == "adam":
        return torch.optim.Adam(groups)
    if o.name == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=o.momentum)


def run_dir_for(cfg: TrainConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path("artifacts") / "runs" / cfg.name


def resolve_feature_dirs(cfg: TrainConfig, di: DistInfo) -> list[str]:
    """The configured feature dirs, or extract (or reuse) features of ``dataset`` with ``backbone``."""
    if cfg.features:
        return [str(f) for f in cfg.features]
    from uniembed.features.extract import extract

    d = None
    if di.is_main:
        d = extract(cfg.dataset, backbone=cfg.backbone, out_root=cfg.features_root, pooling=cfg.pooling)
    di.barrier()
    if not di.is_main:  # complete by now: returns at once
        d = extract(cfg.dataset, backbone=cfg.backbone, out_root=cfg.features_root, pooling=cfg.pooling)
    return [str(d)]


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if not prefix and k in RESUMABLE_CHANGES:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k not in ("head", "loss"):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def head_record(
    cfg_head: dict, head: nn.Module, data: TrainData, selected_epoch: int | None = None
) -> HeadRecord:
    """The run record (``head.pt``, docs/design.md): everything export needs to rebuild the embedder."""
    info = data.info
    return HeadRecord(
        head_config=cfg_head,
        state_dict={k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        backbone=info.get("backbone"),
        pooling=info.get("pooling", "avg"),
        preprocess=info.get("preprocess"),
        fingerprint=info.get("fingerprint"),
        weights_hash=info.get("weights_hash"),
        feature_dir=data.feature_dirs[0] if len(data.feature_dirs) == 1 else list(data.feature_dirs),
        embedding_dim=int(cfg_head["out_dim"]),
        selected_epoch=selected_epoch,
    )


def load_head(run_dir: str | Path) -> tuple[nn.Module, HeadRecord]:
    """``(head in eval mode, run record)`` from a run dir (or a head.pt path)."""
    rec = HeadRecord.load(run_dir)
    head = build_head(rec.head_config)
    head.load_state_dict(rec.state_dict)
    return head.eval(), rec


# ---------------------------------------------------------------------------------------------- outputs
def plot_curve(history: list[dict], base: dict[str, dict], path: Path) -> None:
    """Loss and val mP@5 per epoch; baselines as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history if h.get("loss") is not None]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if ep:
        a1.plot(ep, [h["loss"] for h in history if h.get("loss") is not None], "o-", label="train loss")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.set_title("training loss")
    a1.grid(alpha=0.3)
    a1.legend()
    vals = [h for h in history if h.get("val")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if vals:
        x = [h["epoch"] for h in vals]
        a2.plot(x, [h["val"]["mP@5"] for h in vals], "o-", color="black", label="head (all)")
        doms = sorted(vals[-1]["val"]["per_domain"])
        for i, d in enumerate(doms):
            a2.plot(
                x,
                [h["val"]["per_domain"].get(d, float("nan")) for h in vals],
                "-",
                lw=1,
                color=colors[i % len(colors)],
                label=f"head: {d}",
            )
    for j, (name, b) in enumerate(sorted(base.items())):
        a2.axhline(
            b["mP@5"], ls="--", color=("dimgray", "darkgoldenrod", "purple")[j % 3], label=f"{name} (all)"
        )
    a2.set_xlabel("epoch")
    a2.set_ylabel("val mP@5 (unseen labels)")
    a2.set_title("validation mP@5")
    a2.grid(alpha=0.3)
    if a2.get_legend_handles_labels()[0]:
        a2.legend(fontsize=7)
    else:  # every label trained (split.val_fraction 0): nothing held out to validate on
        a2.text(0.5, 0.5, "no held-out labels", ha="center", va="center", transform=a2.transAxes)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_metrics(run: Path, base: dict, history: list[dict], meta: dict) -> None:
    lines = [json.dumps({"kind": "baseline", "name": k, **v}) for k, v in sorted(base.items())]
    lines = [json.dumps({"kind": "setup", **meta})] + lines
    lines += [json.dumps({"kind": "epoch", **h}) for h in history]
    _atomic_write_text(run / "metrics.jsonl", "\n".join(lines) + "\n")


def _pick(r: dict, d: str) -> float:
    return r["mP@5"] if d == "ALL" else r["per_domain"].get(d, float("nan"))


def _summary_table(base: dict, final: dict | None, console: Any) -> None:
    from rich.table import Table

    if not final:
        return
    t = Table(title="val mP@5 on unseen labels (leave-one-out)")
    t.add_column("domain")
    t.add_column("head", justify="right")
    for name in sorted(base):
        t.add_column(name, justify="right")
    doms = sorted(final["per_domain"])
    for d in ["ALL", *doms]:
        t.add_row(d, *[f"{_pick(r, d):.4f}" for r in (final, *(base[n] for n in sorted(base)))])
    console.print(t)


# ---------------------------------------------------------------------------------------------- train
def train(
    config: TrainConfig, resume: bool = False, stop_after: int | None = None, overwrite: bool = False
) -> Path:
    """Train a head (then optionally fine-tune the backbone); returns the run dir.

    ``resume``: continue from ``<run>/checkpoint.pt`` (exactly: same batches, RNG, optimizer state).
    ``stop_after``: stop after this many epochs in total (e.g. to split a long run into sessions), keeping the
    schedule of the full ``epochs``. ``overwrite``: start over in a run dir that already has a checkpoint.
    """
    from rich.console import Console

    cfg = config.validate()
    di = setup_distributed(cfg.device)
    console = Console(stderr=True, quiet=not di.is_main)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, di, console, resume, stop_after, overwrite)
    finally:
        torch.set_num_threads(threads)  # the head-training thread count is ours, not the caller's
        if di.started_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, di: DistInfo, console: Any, resume: bool, stop_after: int | None, overwrite: bool
) -> Path:

    run = run_dir_for(cfg)
    ckpt_path = run / CHECKPOINT_FILE
    # Every rank checks (same filesystem), so a refusal never leaves other ranks waiting at a barrier.
    if ckpt_path.exists() and not (resume or overwrite):
        raise FileExistsError(
            f"{run} already holds a training run; pass --resume to continue it or --overwrite to start over"
        )
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no {ckpt_path}")
    di.barrier()
    dev = di.device
    _set_determinism(cfg, dev)
    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    # --- data
    dirs = resolve_feature_dirs(cfg, di)
    t0 = time.perf_counter()
    data = prepare_data(
        dirs,
        cfg.split.val_fraction,
        cfg.split.seed,
        cfg.train_domains,
        cfg.split.unseen_domains_all_labels,
        cfg.split.photo_fraction,
    )
    load_s = time.perf_counter() - t0
    if di.is_main:  # only now: bad input leaves no empty run dir behind
        run.mkdir(parents=True, exist_ok=True)
    n_train, n_cls = len(data.train_idx), len(data.classes)
    console.print(
        f"[bold]train[/] {n_train} rows / {n_cls} classes, val {len(data.val_idx)} rows / "
        f"{len(data.split.val_labels)} labels"
        + (f", {len(data.photo_idx)} photos of training labels held out" if len(data.photo_idx) else "")
        + f", dim {data.dim}, world {di.world} on {dev} "
        f"(loaded in {load_s:.1f}s)"
    )
    x_train = data.feats[data.train_idx].to(dev)
    y_train = data.y_train.to(dev)
    dom_train = data.domains[data.train_idx]
    val_feats = data.feats[data.val_idx].to(dev)

    # --- model (seeded identically on every rank; DDP also broadcasts rank 0's parameters)
    hcfg = head_config(dict(cfg.head, in_dim=data.dim))
    torch.manual_seed(cfg.seed)
    head = build_head(hcfg)
    init_head_from_features(head, data.feats[data.train_idx], hcfg["init"])
    loss = build_loss(cfg.loss, n_cls, hcfg["out_dim"], data.class_counts())
    model = TrainModule(head, loss).to(dev)
    if di.world > 1 and dev.type == "cuda" and hcfg["batchnorm"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    head = model.head
    opt = build_optimizer(cfg, head, model.loss)
    B = cfg.batch_size
    min_batch = di.world * (2 if hcfg["batchnorm"] else 1)  # BatchNorm needs >= 2 rows per rank
    n_full, rem = divmod(n_train, B)
    steps = n_full + (1 if rem >= min_batch else 0)
    if steps == 0:
        raise ValueError(f"{n_train} training rows: too few for one batch on {di.world} rank(s)")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
    ddp = (
        nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if di.world > 1
        else model
    )
    torch.manual_seed(cfg.seed + 7919 * (di.rank + 1))  # per-rank stream for dropout

    # --- baselines, state
    history: list[dict] = []
    start_epoch = 0
    best: dict | None = None
    has_val = len(data.val_idx) >= 2
    if not has_val:
        console.print("[yellow]no held-out labels with 2+ images: validation skipped[/]")
    base = baselines(data, hcfg["out_dim"]) if di.is_main and has_val else {}
    if resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = _config_diff(ck["config"], cfg.to_dict())
        if diff:
            raise ValueError("--resume with a different config: " + "; ".join(diff))
        if ck["world"] != di.world:
            raise ValueError(f"checkpoint was written by {ck['world']} process(es), this run has {di.world}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"][di.rank])
        start_epoch, history, best = ck["epoch"], ck["history"], ck.get("best")
        console.print(f"resumed from epoch {start_epoch}")
    meta = {
        "train_rows": n_train,
        "classes": n_cls,
        "val_rows": int(len(data.val_idx)),
        "val_labels": len(data.split.val_labels),
        "heldout_photos": int(len(data.photo_idx)),
        "split": data.split.summary(),
        "world": di.world,
        "device": str(dev),
        "steps_per_epoch": steps,
        "feature_dirs": data.feature_dirs,
    }
    if di.is_main:
        cfg.to_yaml(run / "config.yaml")
        # The label split itself, so evaluation can use the held-out labels without recomputing it.
        split = {
            "train_labels": data.split.train_labels,
            "val_labels": data.split.val_labels,
            "label_domain": data.split.label_domain,
            "per_domain": data.split.summary(),
            "heldout_photos": [data.paths[i] for i in data.photo_idx.tolist()],
        }
        _atomic_write_text(run / "split.json", json.dumps(split, indent=1))
        if not history and has_val:  # epoch 0: the untrained (e.g. PCA-initialised) head
            history.append(
                {
                    "epoch": 0,
                    "loss": None,
                    "val": score(
                        embed(head, val_feats), data.label_names[data.val_idx], data.domains[data.val_idx]
                    ),
                }
            )

    # Nearest training rows by full-width cosine, once per run (the ``neighbours`` sampler's table).
    nbrs = nearest_rows(data.feats[data.train_idx]) if cfg.sampler == "neighbours" else None
    last = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    progress = step_progress("epoch", console, enabled=cfg.progress and di.is_main)
    with progress:
        task = progress.add_task("train", total=steps, ep="-", loss="-")
        for epoch in range(start_epoch + 1, last + 1):
            t_ep = time.perf_counter()
            model.train()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            order = epoch_order(n_train, cfg.sampler, gen, data.y_train, dom_train, nbrs).to(dev)
            # Running sums stay on the device (no host sync per step): margin*n, distill*n, n, rank*n.
            sums = torch.zeros(4, dtype=torch.float64, device=dev)
            progress.reset(task, total=steps, ep=f"{epoch}/{cfg.epochs}", loss="-")
            for s in range(steps):
                pos = order[s * B : (s + 1) * B]
                if di.world > 1:
                    sizes = [len(c) for c in np.array_split(np.arange(len(pos)), di.world)]
                    lo = sum(sizes[: di.rank])
                    pos = pos[lo : lo + sizes[di.rank]]
                    scale, shard = sizes[di.rank] * di.world / sum(sizes), sizes
                else:
                    scale, shard = 1.0, None
                out = ddp(x_train[pos], y_train[pos], scale, shard)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                if cfg.optim.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                opt.step()
                sched.step()
                n = len(pos)
                if "margin" in out:
                    sums[0] += out["margin"].double() * n
                if "distill" in out:
                    sums[1] += out["distill"].double() * n
                if "rank" in out:
                    sums[3] += out["rank"].double() * n
                sums[2] += n
                show = s % 25 == 0 or s == steps - 1
                progress.update(
                    task, advance=1, **({"loss": f"{float(out['loss'].detach()):.4f}"} if show else {})
                )
            if di.world > 1:
                dist.all_reduce(sums)
            sums = sums.cpu()
            train_s = time.perf_counter() - t_ep
            w = loss.cfg
            rec: dict[str, Any] = {
                "epoch": epoch,
                "lr": opt.param_groups[0]["lr"],
                "train_s": round(train_s, 3),
            }
            parts = {}
            if loss.margin is not None:
                parts["margin"] = float(sums[0] / sums[2])
            if loss.distill is not None:
                parts["distill"] = float(sums[1] / sums[2])
            if loss.rank is not None:
                parts["rank"] = float(sums[3] / sums[2])
            rec["loss"] = (
                w["margin_weight"] * parts.get("margin", 0.0)
                + w["distill_weight"] * parts.get("distill", 0.0)
                + w["rank_weight"] * parts.get("rank", 0.0)
            )
            rec.update({f"loss_{k}": v for k, v in parts.items()})
            rngs = [_rng_state()]
            if di.world > 1:
                rngs = [None] * di.world
                dist.all_gather_object(rngs, _rng_state())
            if di.is_main:
                if has_val and (epoch % cfg.val_every == 0 or epoch == last):
                    t_v = time.perf_counter()
                    rec["val"] = score(
                        embed(head, val_feats), data.label_names[data.val_idx], data.domains[data.val_idx]
                    )
                    rec["val_s"] = round(time.perf_counter() - t_v, 3)
                    if best is None or rec["val"]["mP@5"] > best["mP@5"]:
                        best = {
                            "epoch": epoch,
                            "mP@5": rec["val"]["mP@5"],
                            "state_dict": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
                        }
                history.append(rec)
                ck = {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rngs,
                    "history": history,
                    "best": best,
                    "config": cfg.to_dict(),
                    "world": di.world,
                }
                atomic_save(ck, run / CHECKPOINT_FILE)
                head_record(hcfg, head, data).save(run / HEAD_FILE)
                _write_metrics(run, base, history, meta)
                v = rec.get("val", {})
                console.print(
                    f"epoch {epoch}/{cfg.epochs}  loss {rec['loss']:.4f}  train {train_s:.2f}s"
                    + (
                        f"  val mP@5 {v['mP@5']:.4f} ("
                        + ", ".join(f"{d} {x:.3f}" for d, x in v["per_domain"].items())
                        + ")"
                        if v
                        else ""
                    )
                )
            di.barrier()

    if di.is_main:
        _write_metrics(run, base, history, meta)
        plot_curve(history, base, run / "curve.png")
        final_head = head
        if cfg.select == "best" and best is not None:
            final_head = build_head(hcfg)
            final_head.load_state_dict(best["state_dict"])
        selected = best["epoch"] if cfg.select == "best" and best else last
        head_record(hcfg, final_head, data, selected).save(run / HEAD_FILE)
        final = next((h["val"] for h in reversed(history) if h.get("val")), None)
        if cfg.select == "best" and best is not None:
            final = next(h["val"] for h in history if h["epoch"] == best["epoch"] and h.get("val"))
        epochs_s = [h["train_s"] for h in history if "train_s" in h]
        summary = {
            "run_dir": str(run),
            "epochs_done": history[-1]["epoch"] if history else 0,
            "seconds_per_epoch": float(np.mean(epochs_s)) if epochs_s else None,
            "val": final,
            "baselines": base,
            "best_epoch": best["epoch"] if best else None,
            **meta,
        }
        _atomic_write_text(run / "summary.json", json.dumps(summary, indent=2))
        _summary_table(base, final, console)

    if cfg.finetune.enabled and last == cfg.epochs:
        if di.is_main:
            torch.set_num_threads(threads_before)  # convolutions do benefit from every core
            from uniembed.train.finetune import finetune

            finetune(cfg, run, data, console)
        di.barrier()
    return run
