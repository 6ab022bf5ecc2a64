"""Training loop: resume equivalence, run-folder safety, frozen backbone, sampling, augmentation, learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from covid_cxr import train as train_mod
from covid_cxr.config import ConfigError, DataConfig, EvalConfig, TrainConfig
from covid_cxr.data import EpochSampler, StackDataset
from covid_cxr.errors import CovidCxrError
from covid_cxr.transforms import AugmentSpec, PreprocessSpec


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), epochs=2, image_size=32, batch_size=16, weights="none",
                progress=False, patience=0)
    base.update(kw)
    return TrainConfig(**base)


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(phantom_dataset, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train_mod.run(_cfg(phantom_dataset, full))

    real = train_mod.train_one_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the machine goes down during epoch 2
        return real(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(train_mod, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod.run(_cfg(phantom_dataset, part))
    assert torch.load(part / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train_mod, "train_one_epoch", real)
    train_mod.run(_cfg(phantom_dataset, part, resume=True))

    a, b = _state(full / "last.pt"), _state(part / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lines_part = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines_part] == [1, 2]
    assert [x["train_loss"] for x in lines_full] == [x["train_loss"] for x in lines_part]


def test_run_folder_is_never_overwritten_and_resume_checks_options(phantom_dataset, tmp_path):
    out = tmp_path / "run"
    train_mod.run(_cfg(phantom_dataset, out, epochs=1))
    before = (out / "last.pt").read_bytes()
    with pytest.raises(CovidCxrError, match="already holds a run"):
        train_mod.run(_cfg(phantom_dataset, out, epochs=1))
    with pytest.raises(CovidCxrError, match="options differ"):
        train_mod.run(_cfg(phantom_dataset, out, epochs=1, lr=0.5, resume=True))
    assert (out / "last.pt").read_bytes() == before
    with pytest.raises(CovidCxrError, match="not found"):
        train_mod.run(_cfg(phantom_dataset, tmp_path / "new", resume=True))


def test_run_outputs_describe_themselves(phantom_dataset, tmp_path):
    out = tmp_path / "run"
    summary = train_mod.run(_cfg(phantom_dataset, out, epochs=2))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["image_size"] == 32 and cfg["lr"] == pytest.approx(1e-3) and cfg["labels"] == ["normal", "covid"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert {"train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "epoch_seconds"} <= lines[0].keys()
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]
    assert best["preprocess"]["size"] == 32 and best["labels"] == ["normal", "covid"]
    assert "optimizer" not in best  # only last.pt carries the training state
    assert "optimizer" in torch.load(out / "last.pt", weights_only=True)
    assert not list(out.glob(".*tmp*"))


def test_freeze_backbone_trains_only_the_classifier(phantom_dataset, tmp_path):
    torch.manual_seed(0)
    from covid_cxr.model import build_model

    init = build_model(["normal", "covid"], weights=None).state_dict()
    out = tmp_path / "frozen"
    train_mod.run(_cfg(phantom_dataset, out, epochs=1, freeze_backbone=True, seed=0))
    after = _state(out / "last.pt")
    changed = [k for k in after if not torch.equal(after[k], init[k])]
    assert changed and all(k.startswith("classifier.") for k in changed)


def test_train_with_imagenet_weights_from_torch_home(phantom_dataset, tmp_path, monkeypatch):
    """--weights imagenet loads torchvision's cached file offline; with a frozen backbone the trained
    checkpoint still holds exactly the file's backbone tensors."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(42)
    state = torchvision.models.densenet121(weights=None).state_dict()
    path = tmp_path / "torch" / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    out = tmp_path / "run"
    train_mod.run(_cfg(phantom_dataset, out, epochs=1, weights="imagenet", freeze_backbone=True))
    after = _state(out / "last.pt")
    for k, v in state.items():
        if not k.startswith("classifier."):
            assert torch.equal(after[k], v), k
    assert after["classifier.weight"].shape == (2, 1024)


def test_warmup_cosine_schedule():
    f = train_mod.warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_epoch_sampler_shards_and_reproducibility():
    targets = np.array([0] * 30 + [1] * 7)
    shards = [list(EpochSampler(targets, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 19
    assert set(shards[0]) | set(shards[1]) == set(range(37))
    s = EpochSampler(targets, seed=1)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(2)
    assert list(s) != e1
    s.set_epoch(1)
    assert list(s) == e1
    bal = EpochSampler(targets, seed=0, balanced=True)
    drawn = targets[list(bal)]
    bal.set_epoch(5)
    drawn = np.concatenate([drawn, targets[list(bal)]])
    assert 0.3 < drawn.mean() < 0.7  # classes drawn about equally despite 30:7


def test_augmentation_depends_only_on_seed_epoch_and_index():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
    spec = PreprocessSpec(size=32)
    ds = StackDataset(images, np.array([0, 1, 0, 1]), spec, AugmentSpec(), seed=3)
    ds.set_epoch(1)
    a = ds[2][0]
    ds2 = StackDataset(images, np.array([0, 1, 0, 1]), spec, AugmentSpec(), seed=3)
    ds2.set_epoch(1)
    assert torch.equal(a, ds2[2][0])
    ds2.set_epoch(2)
    assert not torch.equal(a, ds2[2][0])
    plain = StackDataset(images, np.array([0, 1, 0, 1]), spec)
    assert plain[2][0].shape == (3, 32, 32) and not torch.equal(a, plain[2][0])


def test_config_checks():
    with pytest.raises(ConfigError, match="--weights"):
        TrainConfig(data="d", out="o", weights="/no/such/file.pth")
    with pytest.raises(ConfigError):
        TrainConfig(data="d", out="o", image_size=8)
    assert TrainConfig(data="d", out="o").lr == 1e-4
    assert TrainConfig(data="d", out="o", weights="none").lr == 1e-3
    with pytest.raises(ConfigError):
        DataConfig(sources=(), out="x")
    with pytest.raises(ConfigError):
        EvalConfig(run="r", split="holdout")


@pytest.mark.slow
def test_learns_phantoms_from_scratch(learned_phantom_run):
    """Training from scratch reaches >= 0.9 accuracy on held-out phantoms."""
    from covid_cxr import evaluate

    result = evaluate.run(EvalConfig(run=str(learned_phantom_run), bootstrap=0))
    assert result["protocol"]["images"] == 80
    assert result["metrics"]["accuracy"] >= 0.9, result["classification_report"]
