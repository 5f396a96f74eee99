"""The bundled weights are the real pretrained ones: checked on real photos (needs ../shared/data)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from uniembed.models import create_backbone

pytestmark = pytest.mark.shared_data

# grocery_store label -> ImageNet classes that fit it
FITTING = {
    "grocery:Banana": {"banana"},
    "grocery:Granny-Smith": {"Granny Smith"},
    "grocery:Orange": {"orange"},
    "grocery:Lemon": {"lemon"},
}


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def test_efficientnet_lite2_imagenet_classifier_recognises_produce(shared_data: Path) -> None:
    """EfficientNet-Lite2's own ImageNet head puts the fitting class in its top-5 for grocery photos."""
    from torchvision.transforms.functional import pil_to_tensor

    from uniembed.data.images import load_image
    from uniembed_lab.imagenet import imagenet_class_names, imagenet_logits

    names = imagenet_class_names()
    bb = create_backbone("efficientnet_lite2")
    pre = bb.preprocessor()
    rows = _rows(shared_data / "grocery_store" / "labels.csv")
    for label, fitting in FITTING.items():
        picked = [r for r in rows if r["label"] == label and r["path"].startswith("test/")][:4]
        assert len(picked) == 4, f"not enough test photos of {label}"
        x = torch.cat(
            [pre(pil_to_tensor(load_image(shared_data / "grocery_store" / r["path"]))[None]) for r in picked]
        )
        top5 = imagenet_logits(bb, x).topk(5, dim=1).indices.tolist()
        hits = [bool(fitting & {names[i] for i in t}) for t in top5]
        assert sum(hits) >= 3, f"{label}: top-5 classes {[[names[i] for i in t] for t in top5]}"


def test_mobilenetv2_features_retrieve_coil100_objects(shared_data: Path) -> None:
    """Average-pooled MobileNetV2 features reach leave-one-out mP@5 >= 0.85 on all of COIL-100."""
    from uniembed.core.metrics import retrieval_metrics
    from uniembed.features.extract import embed_paths

    rows = _rows(shared_data / "coil100" / "labels.csv")
    paths = [str(shared_data / "coil100" / r["path"]) for r in rows]
    _, labels = np.unique([r["label"] for r in rows], return_inverse=True)
    res = embed_paths(paths, "mobilenetv2", engine="onnxruntime", batch_size=64)
    assert len(res) == len(rows) == 1182 and not res.skipped
    m = retrieval_metrics(res.features, labels[res.indices])
    assert m.mp5 >= 0.85, m.as_dict()
