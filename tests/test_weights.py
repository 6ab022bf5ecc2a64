"""Chest-X-ray-pretrained starts: torchxrayvision DenseNet-121 state dicts through `--weights FILE`.

The files are written here in torchxrayvision's layout (`xrv.models.DenseNet().state_dict()`: torchvision's
DenseNet-121 keys with a 1-channel `features.conv0`, an 18-output `classifier` and `op_threshs`); the
reference forward is torchvision's own DenseNet with that 1-channel stem, as torchxrayvision runs it.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from covid_cxr.errors import CheckpointError
from covid_cxr.imaging.pixels import PreprocessSpec, normalize
from covid_cxr.model.networks import adapt_xrv_densenet, build_model, is_xrv_densenet, weights_are_xrv
from covid_cxr.training.options import TrainConfig


def _xrv_reference(seed: int = 0) -> tuple[nn.Module, dict]:
    """A DenseNet-121 as torchxrayvision builds it (1-channel stem, 18 outputs) with non-trivial BatchNorm
    statistics, and its state dict with ``op_threshs`` (what a user saves from ``xrv.models.DenseNet``)."""
    torch.manual_seed(seed)
    net = torchvision.models.densenet121(weights=None, num_classes=18)
    net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["op_threshs"] = torch.rand(18, generator=g)
    return net.eval(), state


@pytest.fixture(scope="module")
def xrv_file(tmp_path_factory):
    net, state = _xrv_reference()
    path = tmp_path_factory.mktemp("xrv") / "xrv-densenet121.pt"
    torch.save(state, path)
    return path, net, state


def test_xrv_layout_is_recognised(xrv_file):
    path, _, state = xrv_file
    assert is_xrv_densenet(state) and weights_are_xrv(path)
    assert not is_xrv_densenet(torchvision.models.densenet121(weights=None).state_dict())
    assert not weights_are_xrv("imagenet") and not weights_are_xrv("none")


def test_xrv_weights_give_torchxrayvisions_features_on_a_grey_image(xrv_file, caplog):
    """Our 3-channel network on the grey image repeated 3 times == torchxrayvision's 1-channel network (its
    features: norm5 -> ReLU -> global average pool, what its classifier reads)."""
    path, reference, _ = xrv_file
    with caplog.at_level(logging.INFO, logger="covid_cxr.model.networks"):
        model = build_model(["normal", "covid"], weights=path).eval()
    reference.classifier = nn.Identity()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2048 - 1024  # xrv's input range
    with torch.inference_mode():
        want = reference(x)
        got = model.net(x.repeat(1, 3, 1, 1))
    assert got.shape == want.shape == (2, 1024)
    # Two float32 networks that differ only in the stem (3 channels of w / 3 against 1 channel of w): the stem's
    # rounding differs (~2^-24 relative) and so may every later kernel's summation order (other shapes), which is
    # test_export.TOL's case: <= ~2e-5 of the features' scale; 1e-4 of their max leaves 5x
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert "torchxrayvision DenseNet-121" in caplog.text and "18-output pathology head" in caplog.text
    assert "classifier.bias, classifier.weight, op_threshs" in caplog.text


def test_the_stem_is_spread_over_three_channels_and_the_head_dropped(xrv_file):
    _, _, state = xrv_file
    adapted, dropped = adapt_xrv_densenet(state)
    assert dropped == ["classifier.bias", "classifier.weight", "op_threshs"]
    w = adapted["features.conv0.weight"]
    assert w.shape == (64, 3, 7, 7)
    # w / 3 three times, summed: <= 3 roundings of 6e-8 |w|, inside allclose's default rtol 1e-5 |w| (+ 1e-7)
    assert torch.allclose(w.sum(dim=1, keepdim=True), state["features.conv0.weight"], atol=1e-7)
    assert not any(k.startswith("classifier") for k in adapted)


def test_xrv_weights_need_densenet121(xrv_file):
    with pytest.raises(CheckpointError, match="--arch densenet121"):
        build_model(["normal", "covid"], arch="resnet18", weights=xrv_file[0])


def test_pickled_model_files_get_the_conversion_recipe(tmp_path):
    pickled = tmp_path / "xrv-release.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a whole module, as torchxrayvision's release files are
    with pytest.raises(CheckpointError, match=r"torch.save\(xrv.models.DenseNet\(weights=NAME\).state_dict\(\)"):
        build_model(["normal", "covid"], weights=pickled)


def test_input_scale_is_chosen_and_mismatches_are_named(xrv_file, caplog):
    from covid_cxr.training.train import input_scale

    path = str(xrv_file[0])
    assert input_scale(TrainConfig(data="d", out="o", weights=path, input_scale="xrv")) == "xrv"
    with caplog.at_level(logging.INFO, logger="covid_cxr.training.train"):
        assert input_scale(TrainConfig(data="d", out="o", weights=path, freeze_backbone=True)) == "imagenet"
    assert "WARNING" in caplog.text and "--input-scale xrv" in caplog.text and "--freeze-backbone" in caplog.text
    assert input_scale(TrainConfig(data="d", out="o", weights="none")) == "imagenet"
    spec = PreprocessSpec.for_size(32, scale="xrv")
    x = normalize(np.array([[0, 255]], dtype=np.uint8), spec)
    # float32 scaling to +-1024: a few roundings of 6e-8 x 1024 = 6e-5, inside allclose's rtol 1e-5 x 1024 = 0.01
    assert x.shape == (3, 1, 2) and np.allclose(x[:, 0, 0], -1024) and np.allclose(x[:, 0, 1], 1024)
    assert spec.scale == "xrv" and "[-1024, 1024]" in spec.describe()
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.for_size(32).scale == "imagenet"


def test_wrong_shaped_torchxrayvision_weights_are_named_in_one_line(xrv_file, tmp_path):
    """N11: a torchxrayvision-shaped state dict whose stem is 64x1x3x3 (not 7x7) was a bare size-mismatch
    RuntimeError ('this is a bug'); now a CheckpointError names the tensor and both shapes."""
    _, _, state = xrv_file
    bad = dict(state)
    bad["features.conv0.weight"] = torch.zeros(64, 1, 3, 3)
    path = tmp_path / "xrv-wrong.pt"
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=r"features.conv0.weight is \(64, 3, 3, 3\), densenet121 needs "
                                              r"\(64, 3, 7, 7\)"):
        build_model(["normal", "covid"], weights=path)
    odd = {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k.endswith("norm0.weight") else v)
           for k, v in torchvision.models.densenet121(weights=None).state_dict().items()}
    torch.save(odd, tmp_path / "tv-wrong.pt")
    with pytest.raises(CheckpointError, match=r"features.norm0.weight is \(65,\), densenet121 needs \(64,\)"):
        build_model(["normal", "covid"], weights=tmp_path / "tv-wrong.pt")
