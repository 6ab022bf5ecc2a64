"""build_model / weights loading / self-describing checkpoints."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision

from covid_cxr.errors import CheckpointError, WeightsNotFound
from covid_cxr.model import (build_model, imagenet_weights_path, load_checkpoint, read_checkpoint,
                             save_checkpoint)
from covid_cxr.transforms import PreprocessSpec

LABELS = ["normal", "covid"]


def _reference_state(seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.densenet121(weights=None).state_dict()


def _to_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key names of torchvision's published file (``norm.1`` instead of ``norm1``)."""
    pat = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(.*)$")
    return {pat.sub(r"\1.\2.\3", k): v for k, v in state.items()}


def _assert_backbone_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    checked = 0
    for k, v in state.items():
        if k.startswith("classifier."):
            continue
        assert torch.equal(ours[k], v), k
        checked += 1
    assert checked > 600  # every backbone tensor of DenseNet-121


def test_build_model_from_scratch_has_new_head():
    model = build_model(LABELS, weights=None)
    assert model.classifier.out_features == 2
    assert model.classifier.in_features == 1024
    assert all(p.requires_grad for p in model.parameters())
    out = model.eval()(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 2)


def test_imagenet_weights_load_offline_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = _reference_state()
    path = tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    assert imagenet_weights_path() == path
    path.parent.mkdir(parents=True)
    torch.save(_to_legacy(state), path)  # as torchvision publishes it: legacy key names
    model = build_model(LABELS, weights="imagenet")
    _assert_backbone_equal(model, state)
    assert model.classifier.out_features == 2


def test_missing_imagenet_weights_name_the_path_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFound) as err:
        build_model(LABELS, weights="imagenet")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth") in msg
    assert "--weights FILE" in msg


def test_weights_file_with_legacy_keys(tmp_path):
    state = _reference_state(seed=5)
    f = tmp_path / "w.pth"
    torch.save(_to_legacy(state), f)
    _assert_backbone_equal(build_model(LABELS, weights=str(f)), state)


def test_features_equal_torchvision_forward(tmp_path):
    """Our DenseNet computes exactly what torchvision's does with the same weights."""
    state = _reference_state(seed=7)
    f = tmp_path / "w.pth"
    torch.save(state, f)
    ours = build_model(LABELS, weights=str(f)).eval()
    ref = torchvision.models.densenet121(weights=None)
    ref.load_state_dict(state)
    ref.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.features(x), ref.features(x))


def test_wrong_architecture_weights_are_refused(tmp_path):
    f = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), f)
    with pytest.raises(CheckpointError, match="do not fit densenet121"):
        build_model(LABELS, weights=str(f))


def test_pickled_module_is_refused(tmp_path):
    f = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), f)
    with pytest.raises(CheckpointError, match="cannot load"):
        build_model(LABELS, weights=str(f))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(LABELS, weights=None).eval()
    spec = PreprocessSpec(size=64)
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, LABELS, spec, {"image_size": 64}, threshold=0.3, extra={"epoch": 2})
    raw = torch.load(path, weights_only=True)  # no pickled modules inside
    assert set(raw) >= {"state_dict", "labels", "preprocess", "threshold", "config", "version", "arch"}
    assert not list(tmp_path.glob(".*tmp*"))
    loaded, meta = load_checkpoint(path)
    assert meta["labels"] == LABELS and meta["threshold"] == 0.3 and meta["epoch"] == 2
    assert meta["preprocess_spec"] == spec
    assert meta["version"]["torch"] == str(torch.__version__)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)
    model = build_model(LABELS, weights=None)
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, LABELS, PreprocessSpec(size=32), {})
    raw = torch.load(path, weights_only=True)
    raw["state_dict"].pop("classifier.bias")
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="do not match"):  # strict loading
        load_checkpoint(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a covid-cxr checkpoint"):
        load_checkpoint(path)
