"""Backbone registry and factory: names, shapes, preprocessing, weights bookkeeping, scripting."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniembed.models import create_backbone, list_backbones
from uniembed.models.backbones import (
    _load_onto,
    efficientnet_lite_weights_path,
    mobilenetv2_weights_path,
)
from uniembed_lab.imagenet import imagenet_class_names, imagenet_logits

OFFLINE = {
    "mobilenetv2": 224,
    "efficientnet_lite0": 224,
    "efficientnet_lite1": 240,
    "efficientnet_lite2": 260,
}


def _run(bb, batch: int = 2, size: int | None = None) -> torch.Tensor:
    """Forward a random batch; CNNs accept any multiple of 32, so tests use small inputs where they can."""
    s = size or bb.preprocess.input_size
    with torch.no_grad():
        return bb.module(torch.randn(batch, 3, s, s))


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(KeyError) as e:
        create_backbone("resnet9000")
    msg = str(e.value)
    for name in ("mobilenetv2", "efficientnet_lite2", "timm:<name>", "open_clip:<name>"):
        assert name in msg
    with pytest.raises(KeyError, match="names no model"):
        create_backbone("timm:")
    assert "mobilenetv2" in list_backbones()


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_backbones_shapes_and_weights(name: str) -> None:
    bb = create_backbone(name)
    assert bb.preprocess.input_size == OFFLINE[name]
    assert bb.dim == 1280
    assert _run(bb, size=96).shape == (2, 1280)
    assert not bb.module.training
    assert not any(p.requires_grad for p in bb.module.parameters())
    path = (
        mobilenetv2_weights_path() if name == "mobilenetv2" else efficientnet_lite_weights_path(int(name[-1]))
    )
    assert bb.weights == str(path)
    assert bb.weights_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    if name.startswith("efficientnet_lite"):
        # (x - 127) / 128 expressed as scale/mean/std
        x = torch.tensor([0.0, 127.0, 255.0]).view(1, 3, 1, 1).expand(1, 3, 1, 1)
        out = bb.preprocessor().normalize(x).flatten()
        assert torch.allclose(out, (torch.tensor([0.0, 127.0, 255.0]) - 127) / 128, atol=1e-6)
    else:
        assert bb.preprocess.mean == (0.485, 0.456, 0.406)


def test_mobilenetv2_weights_loaded_one_to_one() -> None:
    """Every tensor of the deep-sort file lands, in order, on torchvision's ``.features``."""
    state = torch.load(mobilenetv2_weights_path(), map_location="cpu", weights_only=True)
    bb = create_backbone("mobilenetv2")
    ours = bb.module.body.state_dict()
    assert len(ours) == len(state)
    for (_, a), (_, b) in zip(state.items(), ours.items(), strict=True):
        assert torch.equal(a, b)


def test_weights_shape_mismatch_fails_clearly(tmp_path) -> None:
    from torchvision.models import mobilenet_v2

    state = torch.load(mobilenetv2_weights_path(), map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match="does not match this architecture"):
        _load_onto(mobilenet_v2(width_mult=0.5).features, state, tmp_path / "w.pt")
    short = dict(list(state.items())[:-3])
    with pytest.raises(ValueError, match="tensors, but the model expects"):
        _load_onto(mobilenet_v2().features, short, tmp_path / "w.pt")


@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnet_lite0"])
def test_pooling_variants(name: str) -> None:
    avg = create_backbone(name)
    gem = create_backbone(name, pooling="gem")
    multi = create_backbone(name, pooling="avg+stages")
    assert gem.dim == 1280 and multi.dim > 1280
    assert len({avg.fingerprint(), gem.fingerprint(), multi.fingerprint()}) == 3
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a, g, m = avg.module(x), gem.module(x), multi.module(x)
    assert m.shape == (2, multi.dim)
    # The last block of the multi-stage feature is the plain average-pooled feature: building any variant
    # must leave the network itself untouched (a train-mode probe would corrupt BatchNorm statistics).
    assert torch.allclose(m[:, -1280:], a, atol=1e-5)
    assert not torch.allclose(g, a)
    with pytest.raises(ValueError, match="unknown pooling"):
        create_backbone(name, pooling="max")


def test_block_l2_stages_are_the_width_changes() -> None:
    """``avg+stages_l2``: MobileNetV2 blocks 13/16/17 + the final map (96/160/320/1280 channels: where the
    width changes), each average-pooled and L2-normalised, then concatenated."""
    bb = create_backbone("mobilenetv2", pooling="avg+stages_l2")
    avg = create_backbone("mobilenetv2")
    assert bb.dim == 96 + 160 + 320 + 1280 == 1856
    assert bb.info["stage_ids"] == [13, 16, 17, 18] and bb.info["block_l2"] is True
    assert create_backbone("mobilenetv2", pooling="avg+stages").info["stage_ids"] == [3, 6, 13, 18]
    assert bb.fingerprint() not in {
        avg.fingerprint(),
        create_backbone("mobilenetv2", pooling="avg+stages").fingerprint(),
    }
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = bb.module(x)
        # Reference: the plain torchvision body, tapped by hand.
        maps, h = {}, x
        for i, layer in enumerate(avg.module.body):
            h = layer(h)
            maps[i] = h
        ref = torch.cat([F.normalize(maps[i].mean(dim=(2, 3)), dim=1) for i in (13, 16, 17, 18)], dim=1)
    assert out.shape == (2, 1856)
    assert torch.allclose(out, ref, atol=1e-5)
    for blk in out.split([96, 160, 320, 1280], dim=1):
        assert torch.allclose(blk.norm(dim=1), torch.ones(2), atol=1e-5)
    lite = create_backbone("efficientnet_lite0", pooling="avg+stages_l2")
    # stem is child 0, so blocks 10/14/15 (112/192/320 channels, the research's stage ends) + head.
    assert lite.info["stage_ids"] == [11, 15, 16, 17] and lite.dim == 112 + 192 + 320 + 1280
    with pytest.raises(ValueError, match="only available for mobilenetv2"):
        create_backbone("timm:resnet18", pretrained=False, pooling="avg+stages_l2")


def test_block_l2_stages_onnx_engine_agrees(tmp_path) -> None:
    """The extraction engine's ONNX export of ``avg+stages_l2`` computes what torch does."""
    import onnxruntime as ort

    from uniembed.features.extract import PixelEmbedder, export_onnx

    bb = create_backbone("mobilenetv2", pooling="avg+stages_l2")
    path = export_onnx(bb, tmp_path / "m.onnx")
    pixels = torch.randint(0, 256, (3, 3, 224, 224)).float()
    with torch.no_grad():
        ref = PixelEmbedder(bb).eval()(pixels).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["features"], {"pixels": pixels.numpy()})[0]
    assert got.shape == (3, 1856)
    assert np.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "pooling"),
    [("efficientnet_lite0", "gem"), ("mobilenetv2", "avg+stages"), ("mobilenetv2", "avg+stages_l2")],
)
def test_offline_modules_script_and_trace(name: str, pooling: str) -> None:
    """The export stage puts ``module`` inside a TorchScript model: both scripting and tracing must work."""
    bb = create_backbone(name, pooling=pooling)
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ref = bb.module(x)
        assert torch.allclose(torch.jit.script(bb.module)(x), ref, atol=1e-5)
        assert torch.allclose(torch.jit.trace(bb.module, x)(x), ref, atol=1e-5)


def test_efficientnet_lite_matches_package_model() -> None:
    """Our scriptable re-expression of EfficientNet-Lite computes exactly what the package's model does."""
    from efficientnet_lite_pytorch import EfficientNet

    bb = create_backbone("efficientnet_lite0")
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(efficientnet_lite_weights_path(0), map_location="cpu", weights_only=True))
    ref.eval()
    x = torch.randn(1, 3, 224, 224)  # the package's convs pad for their fixed 224 input
    with torch.no_grad():
        assert torch.allclose(bb.module.feature_map(x), ref.extract_features(x), atol=1e-5)
        assert torch.allclose(imagenet_logits(bb, x), ref(x), atol=1e-4)
    assert len(imagenet_class_names()) == 1000
    with pytest.raises(ValueError, match="no ImageNet classifier"):
        imagenet_logits(create_backbone("mobilenetv2"), x)


def test_random_weights_are_seeded() -> None:
    a = create_backbone("efficientnet_lite0", pretrained=False)
    b = create_backbone("efficientnet_lite0", pretrained=False)
    real = create_backbone("efficientnet_lite0")
    assert a.weights_hash == "random" and a.weights == "random"
    state = torch.get_rng_state()
    create_backbone("mobilenetv2", pretrained=False)
    assert torch.equal(state, torch.get_rng_state()), (
        "building a random backbone must not touch the global RNG"
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.module(x), b.module(x))
        assert not torch.allclose(a.module(x), real.module(x))
    assert a.fingerprint() != real.fingerprint()


def test_timm_random_weights_shapes_and_preprocessing() -> None:
    cnn = create_backbone("timm:resnet18", pretrained=False)
    assert cnn.name == "timm:resnet18" and cnn.dim == 512 and _run(cnn, size=64).shape == (2, 512)
    assert cnn.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    gem = create_backbone("timm:resnet18", pretrained=False, pooling="gem")
    assert gem.dim == 512 and _run(gem, size=64).shape == (2, 512)
    vit = create_backbone("timm:vit_tiny_patch16_224", pretrained=False)
    assert vit.dim == 192 and _run(vit, batch=1).shape == (1, 192)
    assert vit.preprocess.input_size == 224
    assert vit.preprocess.mean == pytest.approx((0.5, 0.5, 0.5))
    assert vit.preprocess.interpolation == "bicubic"
    native = create_backbone("timm:vit_tiny_patch16_224", pretrained=False, pooling="native")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert not torch.allclose(native.module(x), vit.module(x))  # class token vs token average
    with pytest.raises(ValueError, match="needs a CNN feature map"):
        create_backbone("timm:vit_tiny_patch16_224", pretrained=False, pooling="gem")
    with pytest.raises(KeyError, match="not available"):
        create_backbone("timm:definitely_not_a_model", pretrained=False)


def test_open_clip_random_weights_visual_tower() -> None:
    import open_clip

    bb = create_backbone("open_clip:ViT-S-32", pretrained=False)
    assert bb.name == "open_clip:ViT-S-32" and bb.pooling == "native"
    assert bb.preprocess.input_size == 224
    assert bb.preprocess.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert bb.preprocess.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert _run(bb, batch=1).shape == (1, bb.dim)
    with pytest.raises(ValueError, match="native pooling"):
        create_backbone("open_clip:ViT-S-32", pretrained=False, pooling="gem")
    with pytest.raises(ValueError, match="pretrained tag"):
        create_backbone("open_clip:ViT-S-32", pretrained=True)
    with pytest.raises(KeyError, match="unknown open_clip architecture"):
        create_backbone("open_clip:NotAnArch/tag", pretrained=False)
