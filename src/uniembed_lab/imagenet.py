"""ImageNet-1k predictions of a backbone that kept its classifier: the lab's proof that offline weights are
the real pretrained ones (a randomly initialised or mis-mapped network cannot name a banana)."""

from __future__ import annotations

import torch

from uniembed.models.backbones import CNNFeatureNet
from uniembed.models.registry import Backbone


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names, from torchvision's metadata (no download)."""
    from torchvision.models import MobileNet_V2_Weights

    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_logits(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """ImageNet-1k logits of a backbone that kept its classifier: normalised [B,3,S,S] -> [B,1000].

    Always average-pools the last map (that is what the classifier was trained on), whatever the pooling
    of the backbone's features."""
    fc = backbone.info.get("classifier")
    net = getattr(backbone.module, "net", backbone.module)  # a ``+colour`` wrapper keeps the CNN as .net
    if fc is None or not isinstance(net, CNNFeatureNet):
        raise ValueError(f"backbone {backbone.name!r} has no ImageNet classifier")
    with torch.no_grad():
        return fc(net.feature_map(x).mean(dim=(2, 3)))
