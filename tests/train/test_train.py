"""`uniembed train` on synthetic features: outputs, learning, determinism, exact resume, label split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from uniembed.cli import app
from uniembed.configs import config_path
from uniembed.core.splits import heldout_photos, split_labels
from uniembed.features.store import load_feature_set
from uniembed.train import TrainConfig, load_head, train
from uniembed.train.data import epoch_order, prepare_data
from uniembed.train.synthetic import write_synthetic_features

REPO = Path(__file__).resolve().parents[2]
SMOKE = config_path("smoke")
DEFAULT = config_path("default")


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 domains x 12 classes x 8 images, 96-d: classes differ only in a 12-d subspace."""
    return write_synthetic_features(tmp_path_factory.mktemp("syn") / "feats", nuisance=0.5, noise=0.2)


def _cfg(syn: Path, out: Path, **kw) -> TrainConfig:
    cfg = TrainConfig.from_yaml(SMOKE)
    cfg.features = [str(syn)]
    cfg.out = str(out)
    for k, v in kw.items():
        cfg = cfg.with_overrides([f"{k}={json.dumps(v) if not isinstance(v, str) else v}"])
    return cfg


def _state(run: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    return ck["model"]


def test_cli_smoke_run_writes_every_output(syn: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["train", "-c", str(SMOKE), "-f", str(syn), "-o", str(run), "--epochs", "3"]
    )
    assert res.exit_code == 0, res.output
    for name in ("config.yaml", "head.pt", "checkpoint.pt", "metrics.jsonl", "curve.png", "summary.json"):
        assert (run / name).exists(), name
    assert (run / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [x["kind"] for x in lines]
    assert kinds[0] == "setup" and kinds.count("baseline") == 2
    epochs = [x for x in lines if x["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]
    assert set(epochs[-1]["val"]["per_domain"]) == {"dom_a", "dom_b", "dom_c"}
    assert {b["name"] for b in lines if b["kind"] == "baseline"} == {"raw", "pca64"}
    # config.yaml is the complete resolved config: it reproduces the run's settings.
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert saved.epochs == 3 and saved.features == [str(syn)] and saved.optim.lr == pytest.approx(3e-3)
    # head.pt per docs/design.md; load_head rebuilds the head and it embeds features to unit 64-d vectors.
    head, rec = load_head(run)
    assert rec.embedding_dim == 64 and rec.backbone == "synthetic" and rec.backbone_state is None
    assert rec.feature_dirs() == [syn] and 1 <= rec.selected_epoch <= 3 and rec.head_config["out_dim"] == 64
    # On disk it stays a plain dict that torch.load(weights_only=True) reads.
    raw = torch.load(run / "head.pt", weights_only=True)
    assert raw["embedding_dim"] == 64 and set(raw["state_dict"]) == set(head.state_dict())
    fs = load_feature_set(syn)
    with torch.no_grad():
        e = head(torch.from_numpy(np.asarray(fs.features)))
    assert e.shape == (len(fs), 64)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(len(fs)))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"]["mP@5"] == epochs[-1]["val"]["mP@5"] and summary["seconds_per_epoch"] > 0
    # A second run into the same dir is refused without --resume/--overwrite.
    res = CliRunner().invoke(app, ["train", "-c", str(SMOKE), "-f", str(syn), "-o", str(run)])
    assert res.exit_code == 1 and "--resume" in res.output
    res = CliRunner().invoke(
        app, ["train", "-c", str(SMOKE), "-f", str(syn), "-o", str(run), "--set", "optim.lr=x"]
    )
    assert res.exit_code == 2 and "optim.lr" in res.output


def test_head_learns_beyond_raw_and_pca_on_unseen_labels(syn: Path, tmp_path: Path) -> None:
    run = train(_cfg(syn, tmp_path / "r", epochs=12))
    s = json.loads((run / "summary.json").read_text())
    head, raw, pca = s["val"]["mP@5"], s["baselines"]["raw"]["mP@5"], s["baselines"]["pca64"]["mP@5"]
    assert head > max(raw, pca) + 0.05, (head, raw, pca)
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in hist if h["kind"] == "epoch" and h["loss"] is not None]
    assert losses[-1] < losses[0]


def test_training_is_deterministic(syn: Path, tmp_path: Path) -> None:
    kw = {"epochs": 2, "head.dropout": 0.3, "sampler": "class_balanced"}
    a = _state(train(_cfg(syn, tmp_path / "a", **kw)))
    b = _state(train(_cfg(syn, tmp_path / "b", **kw)))
    c = _state(train(_cfg(syn, tmp_path / "c", seed=1, **kw)))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["head.linear.weight"], c["head.linear.weight"])


def test_resume_continues_exactly(syn: Path, tmp_path: Path) -> None:
    """4 epochs straight == 2 epochs, stop, resume for 2 more (cosine schedule, dropout, balanced sampler,
    head BatchNorm, sub-center ArcFace: every piece of state has to survive the checkpoint)."""
    kw = {
        "epochs": 4,
        "head.dropout": 0.3,
        "head.batchnorm": True,
        "sampler": "domain_balanced",
        "schedule.name": "cosine",
        "schedule.warmup_epochs": 1,
        "loss.type": "subcenter_arcface",
    }
    straight = train(_cfg(syn, tmp_path / "straight", **kw))
    cfg = _cfg(syn, tmp_path / "split", **kw)
    train(cfg, stop_after=2)
    ck = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 2
    train(cfg, resume=True)
    a, b = _state(straight), _state(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    hb = [
        json.loads(x)
        for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
        if '"epoch"' in x
    ]
    strip = [{k: v for k, v in h.items() if not k.endswith("_s")} for h in ha]
    assert strip == [{k: v for k, v in h.items() if not k.endswith("_s")} for h in hb]
    # Resuming with a different recipe is refused with the differences listed.
    with pytest.raises(ValueError, match="optim.lr"):
        train(cfg.with_overrides(["optim.lr=0.1"]), resume=True)


def test_label_split_is_deterministic_per_domain_and_supports_leave_one_domain_out(syn: Path) -> None:
    fs = load_feature_set(syn)
    names = np.asarray(fs.label_names, dtype=object)[fs.labels]
    s1 = split_labels(names, fs.domains, 0.5, seed=0)
    s2 = split_labels(names, fs.domains, 0.5, seed=0)
    s3 = split_labels(names, fs.domains, 0.5, seed=1)
    assert s1.val_labels == s2.val_labels and s1.val_labels != s3.val_labels
    assert not set(s1.train_labels) & set(s1.val_labels)
    assert s1.summary() == {d: {"train_labels": 6, "val_labels": 6} for d in ("dom_a", "dom_b", "dom_c")}
    # A domain's split does not depend on which other domains are present.
    m = fs.domains != "dom_c"
    s4 = split_labels(names[m], fs.domains[m], 0.5, seed=0)
    assert set(s4.val_labels) == {x for x in s1.val_labels if not x.startswith("dom_c")}
    # Leave-one-domain-out: nothing of dom_c is trained on; its val labels are the same as in-domain.
    d = prepare_data([str(syn)], 0.5, 0, train_domains=["dom_a", "dom_b"])
    assert set(d.domains[d.train_idx]) == {"dom_a", "dom_b"}
    assert set(d.label_names[d.val_idx]) == set(s1.val_labels)
    d2 = prepare_data([str(syn)], 0.5, 0, train_domains=["dom_a", "dom_b"], unseen_domains_all_labels=True)
    assert (d2.domains[d2.val_idx] == "dom_c").sum() == 12 * 8
    with pytest.raises(ValueError, match="not in the features"):
        prepare_data([str(syn)], 0.5, 0, train_domains=["dom_x"])


def test_heldout_photos_of_training_labels(syn: Path) -> None:
    """split.photo_fraction: a fixed share of each training label's photos leaves training (>= 2, at least
    one photo kept), deterministically, never touching held-out labels or another domain's choice."""
    fs = load_feature_set(syn)
    names = np.asarray(fs.label_names, dtype=object)[fs.labels]
    sp = split_labels(names, fs.domains, 0.5, seed=0)
    h = heldout_photos(names, fs.domains, sp.train_labels, 0.25, seed=0)
    assert h.dtype == bool and not np.isin(names[h], sp.val_labels).any()
    for lab in sp.train_labels:  # 8 photos a label -> round(0.25 * 8) = 2 held out
        assert h[names == lab].sum() == 2
    assert np.array_equal(h, heldout_photos(names, fs.domains, sp.train_labels, 0.25, seed=0))
    assert not np.array_equal(h, heldout_photos(names, fs.domains, sp.train_labels, 0.25, seed=1))
    m = fs.domains != "dom_c"
    h2 = heldout_photos(names[m], fs.domains[m], sp.train_labels, 0.25, seed=0)
    assert np.array_equal(h2, h[m])
    assert not heldout_photos(names, fs.domains, sp.train_labels, 0.0, seed=0).any()
    tiny = heldout_photos(np.array(["a", "a", "b", "b", "b"]), np.array(["d"] * 5), ["a", "b"], 0.9, seed=0)
    assert tiny.tolist()[:2] == [False, False] and tiny[2:].sum() == 2  # < 3 photos: none; else n - 1 at most
    with pytest.raises(ValueError, match="photo_fraction"):
        heldout_photos(names, fs.domains, sp.train_labels, 1.0, seed=0)
    # only where the run trains: a leave-one-domain-out run holds no photos of its left-out domain
    h3 = heldout_photos(names, fs.domains, sp.train_labels, 0.25, seed=0, train_domains=["dom_a", "dom_b"])
    assert np.array_equal(h3, h & (fs.domains != "dom_c"))
    d3 = prepare_data([str(syn)], 0.5, 0, train_domains=["dom_a", "dom_b"], photo_fraction=0.25)
    assert np.array_equal(np.sort(d3.photo_idx), np.flatnonzero(h3))
    # prepare_data trains on the rest and reports the held-out rows.
    d = prepare_data([str(syn)], 0.5, 0, photo_fraction=0.25)
    assert np.array_equal(np.sort(d.photo_idx), np.flatnonzero(h))
    assert not set(d.photo_idx.tolist()) & set(d.train_idx.tolist())
    assert len(d.classes) == len(sp.train_labels)
    assert len(d.train_idx) == 6 * len(sp.train_labels)


def test_balanced_samplers_equalise_groups() -> None:
    y = torch.tensor([0] * 90 + [1] * 10)
    g = torch.Generator().manual_seed(0)
    order = epoch_order(100_000, "class_balanced", g, y=torch.tensor(np.resize(y.numpy(), 100_000)))
    frac = (np.resize(y.numpy(), 100_000)[order.numpy()] == 1).mean()
    assert 0.48 < frac < 0.52
    doms = np.array(["a"] * 80 + ["b"] * 20)
    o = epoch_order(100, "domain_balanced", torch.Generator().manual_seed(0), domains=doms)
    assert o.shape == (100,)
    assert sorted(epoch_order(10, "random", torch.Generator().manual_seed(0)).tolist()) == list(range(10))


def test_config_yaml_roundtrip_overrides_and_errors(tmp_path: Path) -> None:
    cfg = TrainConfig.from_yaml(DEFAULT)
    assert cfg.loss["type"] == "arcface" and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.weight_decay == pytest.approx(1e-4) and cfg.head["out_dim"] == 64
    cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg
    c2 = cfg.with_overrides(["optim.lr=3e-4", "loss.type=dynamic_arcface", "train_domains=a,b", "epochs=7"])
    assert (c2.optim.lr, c2.loss["type"], c2.train_domains, c2.epochs) == (
        3e-4,
        "dynamic_arcface",
        ["a", "b"],
        7,
    )
    with pytest.raises(ValueError, match="optim.lrr"):
        cfg.with_overrides(["optim.lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        cfg.with_overrides(["epochs"])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"epochz": 3}))
    with pytest.raises(ValueError, match="epochz"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="features"):
        TrainConfig().validate()


def test_no_held_out_labels_trains_without_validation(tmp_path: Path) -> None:
    """One label per domain: nothing can be held out, so training runs and says validation was skipped."""
    feats = write_synthetic_features(tmp_path / "f", classes_per_domain=1, per_class=6)
    run = train(_cfg(feats, tmp_path / "r", epochs=2))
    s = json.loads((run / "summary.json").read_text())
    assert s["val"] is None and s["baselines"] == {} and s["epochs_done"] == 2
    load_head(run)
