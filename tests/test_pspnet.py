"""torchxrayvision's ChestX-Det PSPNet as a lung segmenter (``--lungs FILE``): its state dict layout loads, the lungs
are its Left Lung and Right Lung classes, wrong files are refused, and our network and input convention compute
what torchxrayvision's own code computes.

The files are written here in the published layout (``module.`` keys, as saved from ``nn.DataParallel``); no test
downloads the published weights.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from covid_cxr.errors import CheckpointError
from covid_cxr.imaging.lung_masks import iou
from covid_cxr.model.lungs import MAX_SEGMENTER_BYTES, lung_probabilities, load_segmenter
from covid_cxr.model.pspnet import (CHESTX_DET_TARGETS, LUNG_TARGETS, PSPNET_SIZE, PSPNET_SOURCE, ChestXDetLungs,
                                    PSPNet, chestx_det_input, chestx_det_lungs, pspnet_state)

PUBLISHED_NAME = "pspnet_chestxray_best_model_4.pth"
DARK, BRIGHT = 30, 220


def _fire(net: PSPNet, firing: tuple[str, ...]) -> None:
    """Only the classes named in ``firing`` fire, where the feature that :func:`_bright_passes` carries says the
    image is bright (standardised brightness above 0, i.e. pixels above ~124); every other class is off everywhere."""
    with torch.no_grad():
        net.classification.weight.zero_()
        net.classification.bias.fill_(-10.0)
        for name in firing:
            i = CHESTX_DET_TARGETS.index(name)
            net.classification.weight[i, 0] = 4.0
            net.classification.bias[i] = -12.0  # the carried feature is brightness + 3: threshold at 3


def _bright_passes(net: PSPNet) -> PSPNet:
    """Weights under which the image's standardised brightness (+ 3, to survive the ReLUs) travels unchanged through
    every layer in channel 0: centre taps and projection shortcuts 1, residual branches and pyramid paths off."""

    def centre(conv: nn.Conv2d) -> None:
        conv.weight[0, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()  # weight 1, bias 0, mean 0, variance 1
        for cbr in (net.convbnrelu1_1, net.convbnrelu1_2, net.convbnrelu1_3, net.cbr_final):
            centre(cbr.cbr_unit[0])
        net.convbnrelu1_1.cbr_unit[1].bias[0] = 3.0
        for stage in (net.res_block2, net.res_block3, net.res_block4, net.res_block5):
            for block in stage.layers:
                block.cb3.cb_unit[1].weight.zero_()
                if block.cb4 is not None:
                    centre(block.cb4.cb_unit[0])
    _fire(net, LUNG_TARGETS)
    return net


def _published(net: PSPNet) -> dict[str, torch.Tensor]:
    """``net``'s state dict as torchxrayvision's file holds it: saved from ``nn.DataParallel``."""
    return {f"module.{k}": v for k, v in net.state_dict().items()}


def _two_fields(h: int = 288, w: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with two bright rectangles where lung fields would be, and their mask."""
    truth = np.zeros((h, w), bool)
    truth[60:230, 30:110] = True
    truth[60:230, 146:226] = True
    return np.where(truth, np.uint8(BRIGHT), np.uint8(DARK)), truth


@pytest.fixture(scope="module")
def published_file(tmp_path_factory) -> Path:
    """A ChestX-Det PSPNet state dict in the published layout whose lung classes fire on bright regions."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("xrv") / PUBLISHED_NAME
    torch.save(_published(_bright_passes(PSPNet())), path)
    return path


# ----------------------------------------------------------------------------- loading and using the file

@pytest.mark.slow  # a subprocess or a 512 px PSPNet or a full report: ~7-14 s; make test-slow runs it
def test_lungs_predict_with_a_chestx_det_state_dict_finds_its_lung_classes(published_file, tmp_path) -> None:
    """The whole CLI path at 512 px: the mask is where the Left and Right Lung classes fire, back at the image's own
    size, and the plausibility check passes it."""
    from covid_cxr.deploy.lungs import run
    from covid_cxr.deploy.options import LungsPredictConfig

    image, truth = _two_fields()
    Image.fromarray(image).save(tmp_path / "chest.png")
    result = run(LungsPredictConfig(inputs=(str(tmp_path / "chest.png"),), lungs=str(published_file),
                                    out=str(tmp_path / "out"), device="cpu"))
    assert result["images"] == 1 and result["implausible"] == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "chest_mask.png")) >= 128
    assert mask.shape == truth.shape and iou(mask, truth) > 0.9
    row = next(csv.DictReader((tmp_path / "out" / "lungs.csv").read_text().splitlines()))
    assert row["reason"] == "two lung fields"


@pytest.mark.slow  # a subprocess or a 512 px PSPNet or a full report: ~7-14 s; make test-slow runs it
def test_audit_hides_the_lung_fields_the_chestx_det_classes_find(published_file) -> None:
    """audit --lungs FILE: the model pixels (224 px, upsampled to the network's 512) get their own lung fields."""
    from types import SimpleNamespace

    from covid_cxr.evaluation.audit import predicted_lungs

    image, truth = _two_fields()
    pixels = np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR))[None]
    masks, how = predicted_lungs(SimpleNamespace(pixels=pixels), SimpleNamespace(lungs=str(published_file)))
    assert how["method"] == "predicted" and how["implausible_used_rectangle"] == 0
    assert iou(masks[0], np.asarray(Image.fromarray(truth).resize((224, 224), Image.NEAREST))) > 0.9


def test_the_segmenter_says_where_it_came_from_and_is_never_carried(published_file) -> None:
    seg = load_segmenter(published_file)
    assert isinstance(seg.model, ChestXDetLungs)
    assert seg.size == seg.model.input_size == PSPNET_SIZE
    assert seg.checksum == hashlib.sha256(published_file.read_bytes()).hexdigest()
    assert seg.description.startswith(f"{PSPNET_SOURCE} {published_file}")
    assert "Left Lung + Right Lung at 512 px" in seg.description
    assert seg.meta.training["sha256"] == seg.checksum
    with pytest.raises(CheckpointError, match="a classifier cannot carry it.*covid-cxr lungs train"):
        seg.model_width  # what train --lungs reads first


@pytest.fixture(scope="module")
def chestx_det(published_file):
    return load_segmenter(published_file)


@pytest.mark.parametrize("firing, lungs", [(("Left Lung",), True), (("Right Lung",), True),
                                            (tuple(t for t in CHESTX_DET_TARGETS if t not in LUNG_TARGETS), False)])
def test_the_lungs_are_the_classes_named_left_and_right_lung(chestx_det, firing, lungs) -> None:
    """Either lung class alone makes the mask; all 12 other classes together make none (256 px keeps it fast)."""
    seg = chestx_det
    _fire(seg.model.net, firing)
    image, truth = _two_fields()
    prob = lung_probabilities(seg.model, [image], 256, "cpu")[0]
    small = np.asarray(Image.fromarray(truth).resize((256, 256), Image.NEAREST))
    if lungs:
        assert iou(prob >= 0.5, small) > 0.85
    else:
        assert prob.max() < 0.01


def test_the_model_state_wrapper_and_unprefixed_keys_load_the_same_weights(published_file, tmp_path) -> None:
    raw = torch.load(published_file, weights_only=True)
    # ptsemseg's training script saves its best model so
    torch.save({"epoch": 4, "model_state": raw, "optimizer_state": {"state": {}, "param_groups": []},
                "best_iou": 0.8}, tmp_path / "wrapped.pth")
    wrapped = load_segmenter(tmp_path / "wrapped.pth")
    assert all(torch.equal(v, raw[f"module.{k}"]) for k, v in wrapped.model.net.state_dict().items())
    plain = pspnet_state({k.removeprefix("module."): v for k, v in raw.items()})
    assert plain.keys() == pspnet_state(raw).keys() == PSPNet().state_dict().keys()


def test_input_is_the_8_bit_image_over_255_resized_whole() -> None:
    image, _ = _two_fields()
    x = chestx_det_input(image)
    assert x.shape == (PSPNET_SIZE, PSPNET_SIZE) and x.dtype == np.float32
    assert x.min() == pytest.approx(DARK / 255) and x.max() == pytest.approx(BRIGHT / 255)
    native = np.full((PSPNET_SIZE, PSPNET_SIZE), 255, np.uint8)
    assert np.array_equal(chestx_det_input(native), np.ones_like(x))  # no resize at the native size
    with pytest.raises(ValueError, match="8-bit"):
        chestx_det_input(image.astype(np.uint16) * 256)  # the range would be unknown


# ----------------------------------------------------------------------------- wrong files

def test_files_that_are_neither_segmenter_are_refused_naming_the_file(tmp_path) -> None:
    from covid_cxr.imaging.pixels import PreprocessSpec
    from covid_cxr.model.checkpoint import new_meta, save_checkpoint
    from covid_cxr.model.networks import build_model

    expected = "ChestX-Det PSPNet state dict"
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02not a torch file" * 100)
    torch.save({"weight": torch.randn(3, 3), "bias": torch.zeros(3)}, tmp_path / "random.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module: never unpickled
    for name in ("garbage.pth", "random.pth", "module.pth"):
        with pytest.raises(CheckpointError, match=f"(?s){re.escape(str(tmp_path / name))}.*{expected}"):
            load_segmenter(tmp_path / name)
    labels = ("covid", "normal")
    save_checkpoint(tmp_path / "best.pt", build_model(labels, arch="resnet18", weights=None),
                    new_meta("resnet18", labels, "covid", PreprocessSpec(size=64), {}, None))
    with pytest.raises(CheckpointError, match="resnet18 classifier, not a lung segmenter"):
        load_segmenter(tmp_path / "best.pt")
    with open(tmp_path / "huge.pth", "wb") as f:  # sparse: refused from its size, never read
        f.truncate(MAX_SEGMENTER_BYTES + 1)
    with pytest.raises(CheckpointError, match=f"huge.pth is 512 MiB, more than any lung segmenter.*{expected}"):
        load_segmenter(tmp_path / "huge.pth")
    with pytest.raises(CheckpointError, match=f"not found; expected .*{expected}"):
        load_segmenter(tmp_path / "missing.pth")


def test_state_dicts_in_the_layout_but_not_chestx_det_are_refused() -> None:
    state = PSPNet().state_dict()
    with pytest.raises(CheckpointError, match="f.pth: a PSPNet with 19 output classes, not ChestX-Det's 14"):
        chestx_det_lungs(PSPNet(n_classes=19).state_dict(), "f.pth")  # ptsemseg's Cityscapes head
    shallow = PSPNet(blocks=(3, 4, 6, 3)).state_dict()  # ptsemseg's ADE20K depth
    with pytest.raises(CheckpointError, match=r"(?s)f.pth: not the .* layout \(ResNet-101 depth.*Unexpected key"):
        chestx_det_lungs({**state, "res_block4.layers.23.cbr1.cbr_unit.0.weight": torch.zeros(1)}, "f.pth")
    with pytest.raises(CheckpointError, match="Missing key"):
        chestx_det_lungs(shallow, "f.pth")
    with pytest.raises(CheckpointError, match="'cbr_final.cbr_unit.1.weight' is not a tensor"):
        chestx_det_lungs({**state, "cbr_final.cbr_unit.1.weight": [1.0]}, "f.pth")
    half = chestx_det_lungs({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, "f.pth")
    assert {p.dtype for p in half.parameters()} == {torch.float32}  # a half-precision copy runs as float32
    assert pspnet_state({"state_dict": state}) is None  # not this layout at all: the caller tries its own formats
    assert pspnet_state({1: torch.zeros(1)}) is None and pspnet_state([state]) is None


# ----------------------------------------------------------------------------- parity with torchxrayvision

def _randomised(seed: int) -> dict[str, torch.Tensor]:
    """torchxrayvision's own ptsemseg network, randomly initialised with ``seed``, batch-norm statistics and affine
    parameters randomised too (at their defaults batch norm would be nearly the identity and hide mistakes)."""
    from torchxrayvision.baseline_models.chestx_det.ptsemseg.pspnet import pspnet

    torch.manual_seed(seed)
    theirs = pspnet(len(CHESTX_DET_TARGETS))
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return theirs.state_dict()


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


# Same operations in the same order: PyTorch's CPU kernels give bitwise-equal results. The bound leaves room for a
# different convolution algorithm on other hardware: float32 rounds each step by u = 6e-8 relative, and ~110 layers of
# sums over up to 36,864 products can accumulate some hundred u before the output, relative to its largest value.
PARITY_TOLERANCE = 1e-5
# torchxrayvision's ptsemseg code calls the deprecated F.upsample (same result as F.interpolate)
XRV_UPSAMPLE = "ignore:`nn.functional.upsample` is deprecated:UserWarning"


@pytest.mark.filterwarnings(XRV_UPSAMPLE)
def test_torchxrayvision_reads_our_layout_and_computes_what_we_compute(published_file, monkeypatch) -> None:
    """torchxrayvision's own class loads the file we wrote (its loader, strict), its network computes our logits for
    the same weights, and its forward feeds the network the same pixels as ours from an 8-bit image."""
    xrv = pytest.importorskip("torchxrayvision", reason="torchxrayvision not installed (pip install torchxrayvision)")
    monkeypatch.setattr(xrv.utils, "download", lambda *a, **k: pytest.fail("torchxrayvision tried to download"))
    theirs = xrv.baseline_models.chestx_det.PSPNet(cache_dir=str(published_file.parent))
    assert tuple(theirs.targets) == CHESTX_DET_TARGETS

    state = _randomised(seed=1)
    theirs.model.load_state_dict(state)
    ours = PSPNet().eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))  # not square: pooling per axis
    with torch.no_grad():
        assert _relative_error(ours(x), theirs.model.eval()(x)) <= PARITY_TOLERANCE

    class Seen(nn.Module):
        """Records what the network is fed instead of running it."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.x = x
            return torch.zeros(x.shape[0], len(CHESTX_DET_TARGETS), *x.shape[2:])

    image = np.random.default_rng(3).integers(0, 256, (700, 700), dtype=np.uint8)  # shrunk: antialiased
    theirs.model, mine = Seen(), ChestXDetLungs(Seen())
    with torch.no_grad():
        theirs(torch.from_numpy(xrv.datasets.normalize(image, 255))[None, None])  # their documented input
        mine(torch.from_numpy(chestx_det_input(image))[None, None])
    assert mine.net.x.shape == theirs.model.x.shape == (1, 3, PSPNET_SIZE, PSPNET_SIZE)
    # their path goes through [-1024, 1024] and back: 2048 * u absolute there, a few u after standardising
    assert torch.allclose(mine.net.x, theirs.model.x, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings(XRV_UPSAMPLE)
def test_our_segmenter_gives_torchxrayvisions_lung_probabilities_at_512_px(tmp_path, monkeypatch) -> None:
    """End to end on an 8-bit image of another size: torchxrayvision's PSPNet (its loader, its forward) and
    load_segmenter read the same randomly initialised file; sigmoid of the larger lung logit is our P(lung)."""
    xrv = pytest.importorskip("torchxrayvision", reason="torchxrayvision not installed (pip install torchxrayvision)")
    monkeypatch.setattr(xrv.utils, "download", lambda *a, **k: pytest.fail("torchxrayvision tried to download"))
    torch.save({f"module.{k}": v for k, v in _randomised(seed=4).items()}, tmp_path / PUBLISHED_NAME)
    theirs = xrv.baseline_models.chestx_det.PSPNet(cache_dir=str(tmp_path))
    image = np.random.default_rng(5).integers(0, 256, (400, 400), dtype=np.uint8)
    with torch.no_grad():
        logits = theirs(torch.from_numpy(xrv.datasets.normalize(image, 255))[None, None])[0]
    lung = [theirs.targets.index(t) for t in LUNG_TARGETS]
    want = torch.sigmoid(logits[lung]).amax(dim=0).numpy()
    got = load_segmenter(tmp_path / PUBLISHED_NAME).probabilities([image])[0]
    assert got.shape == want.shape == (PSPNET_SIZE, PSPNET_SIZE)
    assert float(np.abs(got - want).max()) <= PARITY_TOLERANCE  # probabilities: at most the logits' error
