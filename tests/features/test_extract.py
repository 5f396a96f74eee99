"""Feature extraction over prepared shards: contents, cache, resume, engines, bad input, CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import uniembed.features.extract as E
import uniembed.features.files as files_mod
from uniembed.features.store import is_complete, load_feature_set


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def prepared(small_labels_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uniembed.data.prepare import prepare

    ds = tmp_path_factory.mktemp("prepared") / "ds"
    prepare([str(small_labels_csv)], ds, shard_size=20, progress=False)
    return ds


@pytest.fixture(scope="module")
def extracted(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_root = tmp_path_factory.mktemp("features")
    return E.extract(
        prepared, out_root=out_root, engine="onnxruntime", batch_size=16, workers=1, progress=False
    )


def test_extract_writes_complete_feature_set(prepared: Path, extracted: Path) -> None:
    from uniembed.data.shards import iter_samples, load_manifest
    from uniembed.models import create_backbone

    manifest = load_manifest(prepared)
    n = manifest["count"]
    assert n >= 40 and len(manifest["shards"]) == -(-n // 20)  # shards of 20
    fs = load_feature_set(extracted)
    samples = list(iter_samples(prepared))
    assert len(fs) == len(samples) == n
    assert fs.dim == 1280 and fs.features.dtype == np.float16
    assert fs.keys == [s.key for s in samples]
    assert fs.labels.tolist() == [s.meta["label_id"] for s in samples]
    assert fs.paths == [s.meta["path"] for s in samples]
    assert set(fs.domains.tolist()) == {"packaged_goods", "produce", "toys_household_objects"}
    assert fs.label_names == manifest["labels"]
    assert np.isfinite(fs.float32()).all() and (np.linalg.norm(fs.float32(), axis=1) > 0).all()
    bb = create_backbone("mobilenetv2")
    assert extracted.name == f"mobilenetv2-{bb.fingerprint()}-{manifest['hash'][:12]}"
    info = fs.info
    assert info["fingerprint"] == bb.fingerprint() and info["weights_hash"] == bb.weights_hash
    assert info["manifest_hash"] == manifest["hash"] and info["engine"] == "onnxruntime"
    assert info["pooling"] == "avg" and info["preprocess"]["input_size"] == 224 and info["skipped"] == []
    assert not (extracted / "parts").exists()


def _no_engine(*args, **kwargs):
    raise AssertionError("a cache hit must not build an engine")


def test_second_call_is_a_cache_hit(prepared: Path, extracted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (extracted / "features.npy").stat().st_mtime_ns
    monkeypatch.setattr(E, "make_runner", _no_engine)
    res = E.extract_with_stats(prepared, out_root=extracted.parent, engine="onnxruntime", progress=False)
    assert res.path == extracted and res.stats.cached and res.stats.reused_shards == 0
    assert res.stats.images == len(load_feature_set(extracted)) and res.stats.engine == "onnxruntime"
    assert (extracted / "features.npy").stat().st_mtime_ns == before
    assert not (extracted / "parts").exists()
    # The path-only form returns the same directory.
    assert E.extract(prepared, out_root=extracted.parent, engine="onnxruntime", progress=False) == extracted


def test_features_match_preprocessor_and_engines_agree(prepared: Path, extracted: Path) -> None:
    """Extraction (worker decode + resize, ONNX Runtime) == ImagePreprocessor + torch on the same image, and
    the torch engine agrees with ONNX Runtime."""
    from torchvision.transforms.functional import pil_to_tensor

    from uniembed.data.images import load_image
    from uniembed.data.shards import iter_samples
    from uniembed.models import create_backbone

    fs = load_feature_set(extracted)
    samples = list(iter_samples(prepared))
    pick = list(range(0, len(samples), 8))  # spread over shards and domains
    bb = create_backbone("mobilenetv2")
    pre = bb.preprocessor()
    with torch.no_grad():
        ref = torch.cat(
            [bb.module(pre(pil_to_tensor(load_image(samples[i].image_bytes))[None])) for i in pick]
        ).numpy()
    got = fs.float32()[pick]
    assert _cos_rows(got, ref).min() >= 0.999
    images = [samples[i].image_bytes for i in pick]
    by_torch = E.embed_paths(images, bb, engine="torch")
    by_ort = E.embed_paths(images, bb, engine="onnxruntime")
    by_spin = E.embed_paths(images, bb, engine="onnxruntime-spin")
    assert _cos_rows(by_torch.features, by_ort.features).min() >= 0.999
    assert _cos_rows(by_torch.features, by_spin.features).min() >= 0.999
    assert _cos_rows(by_torch.features, got).min() >= 0.999


def test_cpu_default_engine_is_onnxruntime_without_spinning() -> None:
    """``auto`` on CPU = ONNX Runtime whose intra-op threads sleep instead of spinning (they would steal the
    decode worker's core); ``onnxruntime-spin`` keeps ORT's spinning and is its own engine in the cache."""
    from uniembed.models import create_backbone

    bb = create_backbone("mobilenetv2", pretrained=False)
    key = "session.intra_op.allow_spinning"
    default = E.make_runner(bb, "auto", threads=2, device="cpu")
    assert default.engine == "onnxruntime"
    assert default.session.get_session_options().get_session_config_entry(key) == "0"
    spin = E.make_runner(bb, "onnxruntime-spin", threads=2, device="cpu")
    assert spin.engine == "onnxruntime-spin" and spin is not default
    assert spin.session.get_session_options().get_session_config_entry(key) == "1"


def test_resume_after_crash_reuses_finished_shards(
    prepared: Path, extracted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = E._write_part
    written: list[Path] = []

    def crash_after_two(path: Path, *args, **kwargs) -> None:
        if len(written) == 2:
            raise RuntimeError("simulated kill")
        real_write(path, *args, **kwargs)
        written.append(path)

    monkeypatch.setattr(E, "_write_part", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated kill"):
        E.extract(prepared, out_root=tmp_path, engine="onnxruntime", workers=0, batch_size=16, progress=False)
    monkeypatch.undo()
    out = tmp_path / extracted.name
    assert not is_complete(out)
    assert sorted(p.name for p in (out / "parts").glob("*.npz")) == ["shard-000000.npz", "shard-000001.npz"]

    # A damaged part is redone rather than trusted.
    (out / "parts" / "shard-000001.npz").write_bytes(b"half-written")
    res = E.extract_with_stats(prepared, out_root=tmp_path, engine="onnxruntime", workers=0, progress=False)
    assert res.path == out and not res.stats.cached
    assert res.stats.reused_shards == 1 and res.stats.images == len(load_feature_set(extracted)) - 20
    resumed, clean = load_feature_set(out), load_feature_set(extracted)
    assert resumed.keys == clean.keys
    assert np.allclose(resumed.float32(), clean.float32(), atol=2e-3)


def _tiny_dataset(root: Path, n_shards: int = 1, per_shard: int = 4) -> Path:
    """A prepared dataset written by hand per docs/design.md; sample 1 is undecodable."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for sh in range(n_shards):
        shards.append(f"shard-{sh:06d}.tar")
        with tarfile.open(root / shards[-1], "w") as tar:
            for i in range(sh * per_shard, (sh + 1) * per_shard):
                key = f"{i:08d}"
                if i == 1:
                    data = b"<html>not a jpeg</html>"
                else:
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(
                        buf, format="JPEG"
                    )
                    data = buf.getvalue()
                meta = {
                    "label": f"l{i % 2}",
                    "label_id": i % 2,
                    "domain": "d",
                    "source": "s",
                    "path": f"/x/{i}.jpg",
                }
                for name, payload in ((f"{key}.jpg", data), (f"{key}.json", json.dumps(meta).encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(payload)
                    tar.addfile(ti, io.BytesIO(payload))
    manifest = {
        "version": 1,
        "hash": f"{n_shards:x}" * 64,
        "count": n_shards * per_shard,
        "shards": shards,
        "labels": ["l0", "l1"],
        "options": {"shard_size": per_shard},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_bad_images_are_skipped_and_counted(tmp_path: Path) -> None:
    ds = _tiny_dataset(tmp_path / "ds")
    out = E.extract(
        ds, out_root=tmp_path / "f", pretrained=False, engine="onnxruntime", workers=0, progress=False
    )
    fs = load_feature_set(out)
    assert len(fs) == 3 and fs.keys == ["00000000", "00000002", "00000003"]
    assert fs.info["weights_hash"] == "random"
    assert [s["key"] for s in fs.info["skipped"]] == ["00000001"]
    assert fs.info["skipped_counts"] == {"not an image": 1}


def test_two_workers_keep_manifest_order(tmp_path: Path) -> None:
    """Workers take whole shards and finish them in any order; the result follows the manifest."""
    ds = _tiny_dataset(tmp_path / "ds", n_shards=5, per_shard=3)
    one = E.extract(
        ds, out_root=tmp_path / "a", pretrained=False, engine="onnxruntime", workers=0, progress=False
    )
    two = E.extract(
        ds,
        out_root=tmp_path / "b",
        pretrained=False,
        engine="onnxruntime",
        workers=2,
        batch_size=2,
        progress=False,
    )
    a, b = load_feature_set(one), load_feature_set(two)
    assert a.keys == b.keys == [f"{i:08d}" for i in range(15) if i != 1]
    assert np.allclose(a.float32(), b.float32(), atol=1e-3)
    assert a.labels.tolist() == [int(k) % 2 for k in a.keys]


def test_bad_dataset_and_engine_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(E.ExtractError, match="not a prepared dataset"):
        E.extract(tmp_path, out_root=tmp_path / "f", progress=False)
    ds = _tiny_dataset(tmp_path / "ds")
    with pytest.raises(E.ExtractError, match="unknown engine"):
        E.extract(ds, out_root=tmp_path / "f", engine="tensorrt", pretrained=False, progress=False)
    (ds / "shard-000000.tar").unlink()
    with pytest.raises(E.ExtractError, match="missing"):
        E.extract(ds, out_root=tmp_path / "f", pretrained=False, progress=False)


def test_embed_paths_skips_or_raises_on_bad_input(tmp_path: Path, shared_data: Path) -> None:
    from uniembed.data.images import BadImageError

    good = next((shared_data / "coil100").rglob("*.png"))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    items = [str(good), str(text), str(tmp_path / "missing.png"), Image.open(good)]
    res = E.embed_paths(items, "mobilenetv2", engine="onnxruntime")
    assert res.indices.tolist() == [0, 3]
    assert res.skipped == [(1, "not an image"), (2, "missing file")]
    assert _cos_rows(res.features[:1], res.features[1:]).min() >= 0.9999  # path and PIL give the same
    with pytest.raises(BadImageError, match="notes.jpg"):
        E.embed_paths(items, "mobilenetv2", engine="onnxruntime", on_bad="raise")


def test_draft_decoding_of_large_jpegs_keeps_features(shared_data: Path) -> None:
    from uniembed.models import create_backbone

    photo = next((shared_data / "grocery_store" / "test").rglob("*.jpg"))
    big = io.BytesIO()
    Image.open(photo).convert("RGB").resize((1200, 900), Image.Resampling.BICUBIC).save(big, format="JPEG")
    bb = create_backbone("mobilenetv2")
    pre = bb.preprocessor()
    assert E._draft_decode(big.getvalue(), 224).size == (300, 225)  # decoded at 1/4 scale
    fast = E.decode_resized(big.getvalue(), pre, draft=True)
    exact = E.decode_resized(big.getvalue(), pre, draft=False)
    assert fast.shape == exact.shape == (3, 224, 224) and fast.dtype == torch.float16
    with torch.no_grad():
        f = bb.module(pre.normalize(torch.stack([fast, exact]))).numpy()
    assert _cos_rows(f[:1], f[1:])[0] >= 0.99


def test_cli_extract(prepared: Path, extracted: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from uniembed.cli import app

    r = CliRunner().invoke(app, ["extract", str(prepared), "--out", str(extracted.parent), "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == str(extracted)
    n = len(load_feature_set(extracted))
    assert f"count={n} dim=1280 backbone=mobilenetv2" in r.output and "cached" in r.output
    r = CliRunner().invoke(app, ["extract", str(tmp_path), "--out", str(tmp_path / "f")])
    assert r.exit_code == 1 and "not a prepared dataset" in r.output
    r = CliRunner().invoke(
        app, ["extract", str(prepared), "--backbone", "nope", "--out", str(tmp_path / "f")]
    )
    assert r.exit_code == 1 and "unknown backbone" in r.output


def test_extract_files_reads_sources_directly(
    small_labels_csv: Path, prepared: Path, extracted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`uniembed extract labels.csv`: no shards, same labels, features close to the shards path (which
    re-encodes images at longest side 336 first), a cache hit on the second call, bad files counted."""
    import csv
    import shutil

    rows = list(csv.DictReader(open(small_labels_csv)))
    # one undecodable file among real photos: skipped and counted, never a crash
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    src = tmp_path / "labels.csv"
    shutil.copy(small_labels_csv, src)
    with open(src, "a", newline="") as f:
        csv.writer(f).writerow([str(bad), rows[0]["label"], rows[0]["domain"]])
    first = E.extract_files_with_stats(
        [str(src)], out_root=tmp_path / "f", engine="onnxruntime", progress=False
    )
    out = first.path
    assert not first.stats.cached and first.stats.images == len(rows) + 1 and len(first.stats.skipped) == 1
    fs = load_feature_set(out)
    assert len(fs) == len(rows) and fs.info["skipped_counts"] == {"not an image": 1}
    assert fs.info["dataset_dir"] is None and fs.info["manifest_hash"].startswith("files-")
    by_path = {r["path"]: r for r in rows}
    assert all(fs.label_names[lid] == by_path[p]["label"] for p, lid in zip(fs.paths, fs.labels, strict=True))
    shards = load_feature_set(extracted)
    row_of = {p: i for i, p in enumerate(shards.paths)}
    idx = [row_of[p] for p in fs.paths]
    cos = _cos_rows(fs.features, np.asarray(shards.features)[idx])
    # the shards path decodes JPEGs re-encoded at longest side 336, so it differs slightly
    assert cos.mean() > 0.99 and cos.min() > 0.97, (cos.mean(), cos.min())
    before = (out / "features.npy").stat().st_mtime_ns
    monkeypatch.setattr(files_mod, "embed_paths", _no_engine)
    again = E.extract_files_with_stats([str(src)], out_root=tmp_path / "f", progress=False)
    assert again.path == out and again.stats.cached and again.stats.images == len(rows)
    assert (out / "features.npy").stat().st_mtime_ns == before
    assert E.extract_files([str(src)], out_root=tmp_path / "f", progress=False) == out
