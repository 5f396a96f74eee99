"""Hub backbones, named by prefix: what users online will ask for (the weights download from the hub).

- ``timm:<name>``: any timm model (``num_classes=0``), preprocessing from ``timm.data.resolve_data_config``;
  e.g. ``timm:vit_base_patch16_224.augreg_in21k`` (the original GUIE solution's ImageNet-21k ViT).
- ``open_clip:<arch>/<pretrained tag>``: the visual tower of an OpenCLIP model (its projected embedding),
  e.g. ``open_clip:ViT-H-14/laion2b_s32b_b79k`` (the backbone of GUIE's winning entries).

Tests build them offline with ``pretrained=False`` (random weights from a fixed seed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from uniembed.core.runtime import state_dict_sha256
from uniembed.models.pooling import make_pool, parse_pooling
from uniembed.models.preprocess import PreprocessConfig
from uniembed.models.registry import Backbone, register_backbone


class _TimmFeatures(nn.Module):
    """timm model -> ``forward_features`` map -> our pooling (used for GeM, which timm heads lack)."""

    def __init__(self, model: nn.Module, pool: nn.Module):
        super().__init__()
        self.model = model
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model.forward_features(x))


def _square_size(size: Any) -> int:
    if isinstance(size, list | tuple):
        size = [int(s) for s in size][-2:]
        if len(size) == 2 and size[0] != size[1]:
            raise ValueError(f"non-square input size {size} is not supported (squash-resize to S x S)")
        return size[-1]
    return int(size)


def _interp(name: str) -> str:
    return name if name in ("bilinear", "bicubic") else "bilinear"


@register_backbone("timm", prefix=True)
def timm_backbone(name: str, pretrained: bool = True, pooling: str = "avg", **kwargs: Any) -> Backbone:
    """Any timm model. ``avg`` averages the final map / patch tokens (timm ``global_pool='avg'``),
    ``native`` keeps the model's own pooling (e.g. the class token of a ViT), ``gem`` needs a CNN map."""
    import timm
    from timm.data import resolve_data_config

    kind = pooling.strip().lower()
    create = dict(pretrained=pretrained, num_classes=0)
    if kind == "native":
        pass
    elif kind == "avg":
        create["global_pool"] = "avg"
    else:
        if parse_pooling(kind).multi:  # also validates the name
            raise ValueError("multi-stage pooling is only available for mobilenetv2 and efficientnet_lite*")
        create["global_pool"] = ""
    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(name):
        raise KeyError(f"timm model {name!r} not available; see timm.list_models()")
    try:
        model = timm.create_model(name, **create)
    except RuntimeError as e:  # timm raises RuntimeError for unknown model / pretrained tag names
        raise KeyError(f"timm model {name!r} not available: {e}") from e
    except TypeError as e:  # a model class that takes no global_pool argument
        raise ValueError(f"timm:{name} does not support pooling {pooling!r}: {e}") from e
    except OSError as e:  # download / hub cache problems (offline machine, bad token, disk full)
        raise FileNotFoundError(f"could not load pretrained weights of timm:{name}: {e}") from e
    model.eval()
    cfg = resolve_data_config({}, model=model)
    size = _square_size(cfg["input_size"])
    pre = PreprocessConfig(
        input_size=size,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=_interp(str(cfg.get("interpolation", "bilinear"))),
    )
    module: nn.Module = model
    if create.get("global_pool") == "":
        with torch.no_grad():
            fm = model.forward_features(torch.zeros(1, 3, size, size))
        if fm.ndim != 4:
            raise ValueError(
                f"pooling {pooling!r} needs a CNN feature map; timm:{name} gives tokens {tuple(fm.shape)}"
            )
        module = _TimmFeatures(model, make_pool(kind))
    module.eval()
    with torch.no_grad():
        dim = int(module(torch.zeros(1, 3, size, size)).shape[1])
    weights = f"timm:{name}" if pretrained else "random"
    whash = state_dict_sha256(model) if pretrained else "random"
    info = {"timm_data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}}
    return Backbone(f"timm:{name}", module, pre, dim, kind, weights, whash, info)


@register_backbone("open_clip", prefix=True)
def open_clip_backbone(name: str, pretrained: bool = True, pooling: str = "avg", **kwargs: Any) -> Backbone:
    """OpenCLIP visual tower ``<arch>/<pretrained tag>``: its projected image embedding. CLIP towers pool
    internally (class token / attention pool), so only that ``native`` pooling is offered (``avg`` is
    accepted as the default name and recorded as ``native``)."""
    import open_clip

    arch, _, tag = name.partition("/")
    kind = pooling.strip().lower()
    if kind not in ("avg", "native"):
        raise ValueError(f"open_clip backbones only support their native pooling, not {pooling!r}")
    if pretrained and not tag:
        raise ValueError(f"open_clip:{name}: give a pretrained tag, e.g. open_clip:{arch}/laion2b_s32b_b79k")
    if arch not in open_clip.list_models():
        raise KeyError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=tag if pretrained else None)
    except RuntimeError as e:  # unknown pretrained tag for this architecture
        raise KeyError(f"open_clip:{name}: {e}") from e
    except OSError as e:  # download / hub cache problems (offline machine, disk full)
        raise FileNotFoundError(f"could not load pretrained weights of open_clip:{name}: {e}") from e
    visual = model.visual
    visual.eval()
    pcfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = _square_size(pcfg.get("size", getattr(visual, "image_size", 224)))
    mean = tuple(float(v) for v in pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in pcfg.get("std", open_clip.OPENAI_DATASET_STD))
    pre = PreprocessConfig(
        input_size=size, mean=mean, std=std, interpolation=_interp(pcfg.get("interpolation", ""))
    )
    with torch.no_grad():
        dim = int(visual(torch.zeros(1, 3, size, size)).shape[1])
    weights = f"open_clip:{arch}/{tag}" if pretrained else "random"
    whash = state_dict_sha256(visual) if pretrained else "random"
    info = {
        "open_clip_preprocess_cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pcfg.items()}
    }
    return Backbone(f"open_clip:{name}", visual, pre, dim, "native", weights, whash, info)
