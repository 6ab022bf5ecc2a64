"""explain: Grad-CAM is the class activation map (per architecture), lands on the phantoms' lesions, is drawn at
a bounded display resolution, refuses absurd aspect ratios, and writes valid PNGs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_export import log_odds_atol, prob_atol, scope_atol

from conftest import make_gray, write_image
from covid_cxr.deploy import explain
from covid_cxr.deploy.options import ExplainConfig
from covid_cxr.errors import ConfigError, ImageReadError
from covid_cxr.imaging.phantoms import make_phantom_with_masks
from covid_cxr.imaging.pixels import preprocess
from covid_cxr.model import gradcam
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.inference import load_predictor
from covid_cxr.model.networks import ARCHS, build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PHANTOM_SIZE = 128  # as generated for learned_phantom_run
FRESH_SEED = 20240917  # the fixture's phantoms use seed 11: these are not in its training data


@pytest.fixture(scope="module")
def learned(learned_phantom_run):
    return load_model(learned_phantom_run / "best.pt")


@pytest.fixture(scope="module")
def tiny_predictor(tiny_run):
    """The 32 px tiny run's predictor: enough for shapes, files and errors."""
    return load_predictor(tiny_run, "torch", device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_predictor):
    """(model, meta) of the tiny run."""
    return tiny_predictor.model, tiny_predictor.meta


def _fresh_covid_phantoms(n: int, seed: int = FRESH_SEED) -> list[dict]:
    return [make_phantom_with_masks("covid", PHANTOM_SIZE, np.random.default_rng([seed, i])) for i in range(n)]


def _cam_reference(weight: torch.Tensor, act: torch.Tensor, size: int) -> np.ndarray:
    """relu(sum_k W[k] A_k) upsampled and scaled to [0, 1]: the class activation map of Zhou et al."""
    cam = F.relu(torch.einsum("c,chw->hw", weight, act))
    up = F.interpolate(cam[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    return up / up.max() if up.max() > 0 else up


def test_grad_cam_is_the_class_activation_map():
    """DenseNet pools ReLU(features) into a linear head, so Grad-CAM on that map must equal
    relu(sum_k W[c, k] A_k) (Zhou et al.); a hook on the wrong tensor or gradient breaks this."""
    torch.manual_seed(0)
    model = build_model(["normal", "covid"], weights=None).train()
    with torch.no_grad():  # class 0: positive weights, so its map cannot vanish; class 1: random signs
        model.head.weight[0].abs_()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        model.eval()
        ref_logits = model(x)
        act = F.relu(model.net.features(x))[0]
    model.train()
    for target in (0, 1):
        heat = gradcam.grad_cam(model, x, target, layer="features")
        ref = _cam_reference(model.head.weight[target].detach(), act, 96)
        assert ref.max() > 0 or target == 1
        # Both maps are the same einsum over the same activations (one forward, one kernel); the weights differ by
        # the rounding of the pooled gradient W / (h w) (~1 ulp each), and that scale cancels in the [0, 1]
        # normalisation. Left: float32 rounding of a 1024-term sum, ~2^-24 x sqrt(1024 / 2) ~ 1.4e-6 of sum|W A|,
        # which is up to R = 23x the map's peak for class 1's random-sign weights (R = 1 for class 0): ~3e-6 of the
        # peak (1e-6 here); 1e-5 is 3x that. A hook on the wrong tensor or gradient is off by O(1).
        np.testing.assert_allclose(heat, ref, atol=1e-5)
    assert model.training, "grad_cam must restore the model's mode"
    for name in ARCHS["densenet121"].cam_layers:
        assert not model.cam_module(name)._forward_hooks, f"grad_cam must remove its hook on {name}"
    model.eval()
    with torch.no_grad():  # the same eval forward on the same input: exact unless grad_cam changed the model
        torch.testing.assert_close(model(x), ref_logits)
    # automatic layer: the deepest map with >= 7 cells a side (the last block at 224 px, denseblock2 at 96)
    assert gradcam.cam_layers(model) == ARCHS["densenet121"].cam_layers
    assert gradcam._cam(model, x, 1)[2] == "features.denseblock2"
    assert gradcam._cam(model, torch.randn(1, 3, 224, 224), 1)[2] == "features"
    assert gradcam.grad_cam(model, x, 1).shape == (96, 96)
    with pytest.raises(ValueError, match="out of range"):
        gradcam.grad_cam(model, x, 2)
    with pytest.raises(ValueError, match="unknown Grad-CAM layer"):
        gradcam.grad_cam(model, x, 1, layer="classifier")
    with pytest.raises(ValueError, match=r"\(1, C, S, S\)"):
        gradcam.grad_cam(model, x[0], 1)
    with pytest.raises(TypeError, match="CxrNet"):
        gradcam.grad_cam(model.net, x, 1)


def test_grad_cam_layers_follow_the_architecture():
    """The candidate layers come from model.ARCHS[arch].cam_layers: for ResNet-18 the last stage (layer4) feeds
    the pooled head directly, so Grad-CAM there is the class activation map too."""
    torch.manual_seed(0)
    model = build_model(["normal", "covid"], arch="resnet18", weights=None).eval()
    with torch.no_grad():
        model.head.weight[0].abs_()
    x = torch.randn(1, 3, 224, 224)
    assert gradcam._cam(model, x, 0)[2] == "layer4"  # 7 x 7 at 224 px
    assert gradcam._cam(model, x[..., :96, :96], 0)[2] == "layer2"  # layer4 3 x 3, layer3 6 x 6, layer2 12 x 12
    with torch.no_grad():
        act = model.net.layer4(model.net.layer3(model.net.layer2(model.net.layer1(
            model.net.maxpool(model.net.relu(model.net.bn1(model.net.conv1(x))))))))[0]
    # as for DenseNet above: one 512-term sum per cell with positive weights (R = 1), ~1e-6 of the peak
    np.testing.assert_allclose(gradcam.grad_cam(model, x, 0, layer="layer4"),
                               _cam_reference(model.head.weight[0].detach(), act, 224), atol=1e-5)
    with pytest.raises(ValueError, match="unknown Grad-CAM layer"):
        gradcam.grad_cam(model, x, 0, layer="features")  # a DenseNet layer name


def test_heatmaps_are_drawn_at_a_bounded_display_resolution(tiny):
    model, meta = tiny
    small = make_gray(1, (100, 168))
    r = gradcam.explain_array(model, meta, small, target="normal")
    assert r["heatmap"].shape == r["display"].shape == (100, 168)  # small images: their own resolution
    np.testing.assert_array_equal(r["display"], small)
    assert r["target"] == 0 and r["layer"] in ARCHS[meta.arch].cam_layers and r["log_probs"].shape == (2,)
    big = np.asarray(Image.fromarray(make_gray(2, (150, 200))).resize((2000, 1500)))
    r = gradcam.explain_array(model, meta, big)
    assert r["heatmap"].shape == r["display"].shape == (1500 * 768 // 2000, 768)
    assert r["heatmap"].dtype == np.float32 and 0.0 <= r["heatmap"].min() and r["heatmap"].max() <= 1.0
    assert r["target"] == meta.positive_index  # default: the positive class
    assert gradcam.heatmap_for_image(model, meta, big).shape == (576, 768)
    tall = np.asarray(Image.fromarray(make_gray(3, (200, 150))).resize((900, 3000)))
    assert gradcam.display_image(tall).shape == (768, 230)
    # the overlay is drawn from the display image; a full-size image is refused
    buf = io.BytesIO()
    gradcam.overlay_png(r["display"], r["heatmap"], buf, caption="big")
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        assert max(img.size) < 2000
    with pytest.raises(ValueError, match="at most 768"):
        gradcam.overlay_png(big, np.zeros(big.shape, np.float32), io.BytesIO())


def test_absurd_aspect_ratios_are_refused(tiny, tiny_predictor, tmp_path):
    model, meta = tiny
    with pytest.raises(ImageReadError, match="aspect ratio"):
        gradcam.check_aspect(np.zeros((10, 5000), np.uint8), "strip.png")
    with pytest.raises(ImageReadError, match=r"strip\.png.*5000x10"):
        gradcam.check_aspect(np.zeros((10, 5000), np.uint8), "strip.png")
    with pytest.raises(ImageReadError, match="aspect ratio"):
        gradcam.check_aspect(np.zeros((5000, 10), np.uint8))
    gradcam.check_aspect(np.zeros((100, 800), np.uint8))  # 8:1 is still allowed
    with pytest.raises(ImageReadError, match="crop the image to the chest"):
        gradcam.explain_array(model, meta, np.full((10, 5000), 128, np.uint8))
    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((10, 5000), 128, np.uint8)).save(strip)
    with pytest.raises(ImageReadError, match=r"strip\.png.*aspect ratio"):
        explain.explain_images(tiny_predictor, [strip], tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.png"))


def test_overlay_png_to_buffer():
    image = (np.arange(60 * 80) % 255).astype(np.uint8).reshape(60, 80)
    heat = np.zeros((60, 80), np.float32)
    heat[10:20, 30:50] = 1.0
    buf = io.BytesIO()
    gradcam.overlay_png(image, heat, buf, caption="test: P(covid) 0.90")
    assert buf.getvalue()[:8] == PNG_MAGIC
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        assert img.size[0] > 200
    with pytest.raises(ValueError, match="same shape"):
        gradcam.overlay_png(image, heat[:, :10], io.BytesIO())


def test_explain_images_and_run(tiny_predictor, tiny_run, tmp_path):
    meta = tiny_predictor.meta
    inputs = tmp_path / "in"
    paths = [write_image(inputs / "x" / "scan.png", 1, (60, 50)), write_image(inputs / "y" / "scan.png", 2, (50, 60)),
             write_image(inputs / "y" / "SCAN.jpg", 3, (900, 1100))]
    out = tmp_path / "out"
    rows = explain.explain_images(tiny_predictor, paths, out)
    assert [r["heatmap_png"] for r in rows] == [str(out / "scan_gradcam.png"), str(out / "scan-2_gradcam.png"),
                                                str(out / "SCAN-3_gradcam.png")]
    for r in rows:
        data = open(r["heatmap_png"], "rb").read()
        assert data[:8] == PNG_MAGIC
        with Image.open(r["heatmap_png"]) as img:
            img.verify()
        assert r["target"] == "covid" and r["layer"] in ARCHS[meta.arch].cam_layers
        assert r["threshold"] == meta.threshold_text()
    # the same numbers as `covid-cxr predict`
    # (explain predicts image by image, predict_files these 3 in one batch: other kernels, so each logit may move by
    # test_export.TOL; was abs=1e-5, the derived bound only for T >= 5)
    expected = tiny_predictor.predict_files(paths)
    t = meta.temperature
    for r, e in zip(rows, expected):
        assert r["path"] == e["path"]
        if abs(e["log_odds"] - meta.threshold_log_odds) > log_odds_atol(t):  # not on the threshold's edge
            assert r["predicted_label"] == e["predicted_label"]
        if abs(e["scope_score"] - meta.gate.threshold) > scope_atol(meta.gate.threshold):
            assert r["in_scope"] == e["in_scope"]
        for lab in meta.labels:
            assert r[f"prob_{lab}"] == pytest.approx(e[f"prob_{lab}"], abs=prob_atol(t))

    broken = inputs / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        explain.explain_images(tiny_predictor, [broken], out)
    with pytest.raises(ConfigError, match="not a class"):
        explain.explain_images(tiny_predictor, paths, tmp_path / "never", target="pneumonia")
    assert not (tmp_path / "never").exists()  # refused before anything was written

    result = explain.run(ExplainConfig(run=str(tiny_run), inputs=(str(inputs / "x"),), out=str(tmp_path / "run-out"),
                                       target="normal", device="cpu", progress=False))
    assert result["images"] == 1 and result["results"][0]["target"] == "normal"
    saved = json.loads((tmp_path / "run-out" / "explanations.json").read_text())
    assert "research use only" in saved["disclaimer"] and saved["caveat"] == gradcam.CAVEAT
    assert "inferno" in saved["method"] and saved["results"][0]["heatmap_png"].endswith("scan_gradcam.png")
    assert (tmp_path / "run-out" / "scan_gradcam.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ConfigError, match="not a class"):
        explain.run(ExplainConfig(run=str(tiny_run), inputs=(str(inputs / "x"),), out=str(tmp_path / "o2"),
                                  target="pneumonia", device="cpu"))
    with pytest.raises(ConfigError):
        ExplainConfig(run="r", inputs=(), out="o")
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        ExplainConfig(run=str(tiny_run), inputs=(str(inputs),), out=str(a_file))


def test_caption_says_what_the_map_shows(tiny):
    _, meta = tiny
    lp = np.log(np.array([0.9, 0.1]))
    text = gradcam.caption_for("x" * 100 + ".png", meta, lp, target=1, in_scope=False)
    lines = text.splitlines()
    assert len(lines[0]) <= 60 and lines[0].endswith(".png")
    assert lines[1].startswith("OUT OF SCOPE")
    assert meta.threshold_text() in text and "evidence for 'covid'" in text and "little evidence" in text
    assert "threshold 1.00" not in text
    assert "OUT OF SCOPE" not in gradcam.caption_for("a.png", meta, lp, target=0, in_scope=True)


# ----------------------------------------------------------------------------- a model that learned the phantoms


@pytest.mark.slow
def test_heatmap_shape_range_and_determinism(learned):
    model, meta = learned
    image = _fresh_covid_phantoms(1)[0]["image"]
    heat = gradcam.heatmap_for_image(model, meta, image)
    assert heat.shape == image.shape and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)  # exact: divided by its own max (x / x = 1)
    np.testing.assert_array_equal(heat, gradcam.heatmap_for_image(model, meta, image))
    x = torch.from_numpy(preprocess(image, meta.preprocess)).unsqueeze(0)
    at_input = gradcam.grad_cam(model, x, meta.positive_index)
    assert at_input.shape == (meta.preprocess.size,) * 2
    # a non-square image gets a heatmap at its own resolution
    wide = np.ascontiguousarray(np.pad(image, ((0, 0), (20, 20)), mode="edge")[:100])
    assert gradcam.heatmap_for_image(model, meta, wide, target="normal").shape == (100, 168)
    with pytest.raises(ConfigError, match="not a class"):
        gradcam.heatmap_for_image(model, meta, image, target="pneumonia")


def _twins(n: int, seed: int = FRESH_SEED) -> list[tuple[dict, dict]]:
    """(covid phantom, its lesion-free twin): the same random anatomy (the lesions draw from their own stream),
    so the lesions are the only difference within a pair."""
    return [(make_phantom_with_masks("covid", PHANTOM_SIZE, np.random.default_rng([seed, i])),
             make_phantom_with_masks("normal", PHANTOM_SIZE, np.random.default_rng([seed, i]))) for i in range(n)]


def _lesion_enrichment(model, meta, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: mean covid heat on the lesion pixels / mean heat over the image, for the covid phantom and for its
    twin (scored on the same pixels, where the twin has no lesions)."""
    covid, twin = [], []
    for d, t in pairs:
        lesion = d["lesion_mask"]
        assert lesion.any() and not t["lesion_mask"].any()
        for image, out in ((d["image"], covid), (t["image"], twin)):
            heat = gradcam.heatmap_for_image(model, meta, image, target="covid")
            out.append(heat[lesion].mean() / max(float(heat.mean()), 1e-12))
    return np.array(covid), np.array(twin)


@pytest.mark.slow
def test_grad_cam_lands_on_the_lesions(learned):
    """Phantoms differ only by their lesions. Adding the lesions to an image must pull the model's covid heat onto
    them: on each covid phantom the heat on its lesions (relative to the image's mean heat) must exceed the heat on
    the same pixels of its lesion-free twin, and by far more than for an untrained network.

    Why this bar, not "more heat inside the lesions than outside" (>= 1.25 before): that ratio depends on the
    training run. Measured on 3 sets of 10 fresh phantoms at the auto layer (features.denseblock2, 8 x 8 at 64 px;
    the pre-refactor code picked the same map and gives bit-identical heatmaps; 128 px phantoms are shown at their
    own resolution), it was 0.91 / 0.97 / 0.98 for this fixture's model (training seed 0), but 1.31 and 1.68 on the
    first set for the same recipe trained with seeds 1 and 2, and 0.25-1.56 for untrained networks (8 initialisation
    seeds). The seed-0 model does find the lesions (log-odds +4..+7 on covid phantoms, -5..-8 on their twins), but
    its coarse map also lights the lower chest. The paired measure held for every pair of every set for all three
    trained models (mean covid - twin gain per set: seed 0 0.88-0.93, seed 1 1.14-1.24, seed 2 1.35-1.59; twins
    0.02-0.10), while untrained networks gave -0.98..+0.20 (8 seeds x 2 sets; covid > twin in 0-100% of pairs, at
    random). Bars: mean gain >= 0.5, covid > twin in >= 90% of pairs, and a gain >= 0.3 above an untrained
    network's (seed 0: 0.13)."""
    model, meta = learned
    pairs = _twins(10)
    covid, twin = _lesion_enrichment(model, meta, pairs)
    gain = float(np.mean(covid - twin))
    torch.manual_seed(0)
    untrained = build_model(meta.labels, arch=meta.arch, weights=None).eval()
    covid0, twin0 = _lesion_enrichment(untrained, meta, pairs)
    gain0 = float(np.mean(covid0 - twin0))
    inside_outside = float(np.mean([(h := gradcam.heatmap_for_image(model, meta, d["image"]))[d["lesion_mask"]].mean()
                                    / h[~d["lesion_mask"]].mean() for d, _ in pairs]))
    print(f"lesion enrichment of the covid heat: covid phantoms {covid.mean():.2f}, lesion-free twins "
          f"{twin.mean():.2f}, gain {gain:.2f} (covid > twin in {np.mean(covid > twin):.0%} of pairs); untrained "
          f"network gain {gain0:.2f}; heat inside/outside lesions {inside_outside:.2f} (not asserted)")
    assert gain >= 0.5
    assert np.mean(covid > twin) >= 0.9
    assert gain >= gain0 + 0.3
