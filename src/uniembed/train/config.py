"""The training config: one dataclass tree, loaded from / saved to YAML, overridable with ``key=value``.

A run directory's ``config.yaml`` is the complete, resolved config (every default written out), so a run can
be reproduced from it alone.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SAMPLERS = ("random", "domain_balanced", "class_balanced", "neighbours")
SCHEDULES = ("none", "cosine")
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class SplitConfig:
    """Which labels are held out for validation ("unseen labels"), and optionally which photos of the
    training labels are held out too ("new photos of known products")."""

    val_fraction: float = 0.5  # fraction of each domain's labels held out (deterministic by seed)
    seed: int = 0
    # Fraction of each *training* label's photos kept out of training (at least 2 of a label, and only labels
    # with 3+ photos), scored by `uniembed evaluate --split photos`: does the head still know the products it
    # was trained on when it sees new photos of them? 0 = off (every photo of a training label is trained on).
    photo_fraction: float = 0.0
    # Domains not in train_domains: hold out ALL their labels (more val data) instead of the same fraction as
    # in-domain runs. Off by default so a domain's val set is identical whether or not it was trained on.
    unseen_domains_all_labels: bool = False


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-4
    weight_decay: float = 1e-4
    # The margin loss's class centres start random and must move much further than the head's weights,
    # so they get their own param group: lr * centers_lr_mult, and no weight decay (decay would shrink the
    # centres, which only changes their norm - irrelevant for cosine logits - but slows Adam down).
    centers_lr_mult: float = 10.0
    centers_weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    grad_clip: float = 0.0  # max grad norm (0 = off)


@dataclass
class ScheduleConfig:
    name: str = "none"  # none | cosine (linear warmup, then cosine decay per step)
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr


@dataclass
class FinetuneConfig:
    """Optional second stage: unfreeze the backbone's last blocks and train end-to-end on images."""

    enabled: bool = False
    dataset: str | None = None  # prepared dataset dir (default: the one the features were extracted from)
    blocks: int = 2  # unfreeze the last N blocks of the backbone trunk
    epochs: int = 1
    lr: float = 1e-5  # backbone lr
    head_lr: float = 1e-5  # head (and centres x centers_lr_mult)
    batch_size: int = 32
    max_images: int = 0  # cap on training images (0 = all)
    max_steps: int = 0  # cap on optimizer steps per epoch (0 = no cap)
    evaluate: bool = True  # re-embed the val images with the fine-tuned backbone and log mP@5
    max_val_images: int = 0  # cap on val images for that evaluation (0 = all)
    augment: bool = True  # random horizontal flip + small random-resized crop


@dataclass
class TrainConfig:
    # Inputs: cached feature dir(s) ...
    features: list[str] = field(default_factory=list)
    # ... or a prepared dataset + backbone (features are extracted / reused from features_root).
    dataset: str | None = None
    backbone: str = "mobilenetv2"
    pooling: str = "avg"
    features_root: str = "artifacts/features"

    out: str | None = None  # run dir (default artifacts/runs/<name>)
    name: str = "run"

    train_domains: list[str] | None = None  # None = all domains (leave-one-domain-out: list the others)
    split: SplitConfig = field(default_factory=SplitConfig)

    head: dict[str, Any] = field(default_factory=lambda: {"out_dim": 64, "dropout": 0.2, "init": "random"})
    loss: dict[str, Any] = field(default_factory=lambda: {"type": "arcface", "scale": 30.0, "margin": 0.5})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    epochs: int = 20
    batch_size: int = 256  # global batch (split across DDP ranks)
    seed: int = 0
    sampler: str = "random"  # random | domain_balanced | class_balanced | neighbours (anchor + 3 nearest)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # CPU threads for torch (0 = torch's default). Head-training ops are tiny ([256 x D] @ [D x 64]): extra
    # threads cost more in synchronisation than they save (measured 2 ms/step on 1 thread vs 26-300 ms on 2
    # busy cores), so 1 is the default.
    threads: int = 1
    deterministic: bool = True
    val_every: int = 1
    select: str = "last"  # which epoch's head becomes head.pt: last | best (by val mP@5)
    progress: bool = True

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainConfig:
        """Strict: unknown keys raise with the list of known ones (typos must not be silently ignored)."""
        return _from_dict(cls, dict(d or {}), "")

    def to_yaml(self, path: str | Path) -> None:
        """Atomic: a run killed while starting never leaves half a config.yaml to resume from."""
        from uniembed.core.fsutil import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"training config {p} not found")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: invalid YAML: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{p}: a training config must be a YAML mapping")
        return cls.from_dict(d)

    def with_overrides(self, overrides: list[str]) -> TrainConfig:
        """Apply ``key=value`` strings (dotted keys, YAML values): ``optim.lr=3e-4``, ``loss.type=softmax``,
        ``train_domains=[produce,packaged_goods]``."""
        d = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"--set expects key=value, got {item!r}")
            key, raw = item.split("=", 1)
            value = yaml.safe_load(raw) if raw.strip() else None
            node = d
            parts = key.strip().split(".")
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    raise ValueError(f"--set {key}: {p!r} is not a section of the config")
                node = node[p]
            node[parts[-1]] = value
        return TrainConfig.from_dict(d)

    def validate(self) -> TrainConfig:
        if not self.features and not self.dataset:
            raise ValueError("training needs input: set `features` (cached feature dirs) or `dataset`")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.schedule.name not in SCHEDULES:
            raise ValueError(f"schedule.name must be one of {SCHEDULES}, got {self.schedule.name!r}")
        if self.optim.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {self.optim.name!r}")
        if self.select not in ("last", "best"):
            raise ValueError(f"select must be 'last' or 'best', got {self.select!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.val_every < 1:
            raise ValueError("need epochs >= 0, batch_size >= 1, val_every >= 1")
        if not 0.0 <= self.split.val_fraction < 1.0:
            raise ValueError(
                f"split.val_fraction must be in [0, 1) (0: every label trains), got {self.split.val_fraction}"
            )
        # Check the head and loss sections now, before any data is loaded (in_dim comes from the features).
        from uniembed.models.heads import head_config
        from uniembed.models.losses import loss_config

        head_config(dict(self.head, in_dim=1 << 30))
        loss_config(self.loss)
        return self


def _from_dict(cls: type, d: dict, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(d) - set(fields)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ValueError(
            f"unknown config key(s) {sorted(prefix + k for k in unknown)} at {where}; "
            f"known: {', '.join(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        sub = _NESTED.get((cls.__name__, name))
        if sub is not None:
            kwargs[name] = _from_dict(sub, value or {}, f"{prefix}{name}.")
        elif name in ("features",) and isinstance(value, str):
            kwargs[name] = [value]
        elif name == "train_domains" and isinstance(value, str):
            kwargs[name] = [s for s in value.split(",") if s]
        elif name in ("head", "loss"):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"config {prefix}{name} must be a mapping")
            kwargs[name] = dict(value or {})
        else:
            kwargs[name] = _coerce(value, hints.get(name), f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Scalars to the field's type: PyYAML reads ``3e-3`` as a *string* (YAML 1.1); ``--set`` gives text."""
    if value is None:
        return None
    base = {float: float, int: int, bool: bool, str: str}
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for t in (hint, *(typing.get_args(hint) if union else ())):
        if t in base:
            if t is bool:
                if isinstance(value, bool):
                    return value
                if str(value).lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                    return str(value).lower() in ("true", "1", "yes", "on")
            else:
                try:
                    if t is int and isinstance(value, float) and not value.is_integer():
                        raise ValueError
                    return t(value) if t is not int else int(float(value))
                except (TypeError, ValueError):
                    pass
            raise ValueError(f"config {key}: cannot read {value!r} as {t.__name__}")
    return value


_NESTED: dict[tuple[str, str], type] = {
    ("TrainConfig", "split"): SplitConfig,
    ("TrainConfig", "optim"): OptimConfig,
    ("TrainConfig", "schedule"): ScheduleConfig,
    ("TrainConfig", "finetune"): FinetuneConfig,
}
