"""Every `--arch` at a small size: a training step, Grad-CAM, the out-of-scope gate, and (slow) the whole run
through ONNX export with logit and scope parity between the backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_api import _phantom_images
from test_export import SCOPE_RTOL, TOL, log_odds_atol
from torch.utils.data import DataLoader

import covid_cxr
from covid_cxr.imaging.pixels import PreprocessSpec, finish
from covid_cxr.model.gate import fit_gate
from covid_cxr.model.gradcam import grad_cam
from covid_cxr.model.inference import forward_pixels
from covid_cxr.model.networks import ARCHS, build_model
from covid_cxr.training.loaders import StackDataset
from covid_cxr.training.loop import train_one_epoch, warmup_cosine

SIZE = 64


def _stack(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([np.clip(120 + 50 * np.sin(xx / (3 + i % 4)) + rng.normal(0, 15, (SIZE, SIZE)), 0, 255)
                       for i in range(n)]).astype(np.uint8)
    return pixels, np.arange(n) % 2


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_arch_trains_a_step_and_explains(arch):
    torch.manual_seed(0)
    spec = PreprocessSpec.for_size(SIZE)
    model = build_model(["normal", "covid"], arch=arch, weights=None)
    pixels, targets = _stack(8, 0)
    loader = DataLoader(StackDataset(pixels, targets, spec), batch_size=4, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 0))
    before = model.head.weight.detach().clone()
    out = train_one_epoch(model, loader, optimizer, scheduler, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    assert np.isfinite(out["loss"]) and out["images"] == 8
    assert not torch.equal(before, model.head.weight)

    model.eval()
    heat = grad_cam(model, torch.from_numpy(finish(pixels[:1], spec)), target=1)
    # [0, 1] exactly: the map is divided by its own maximum, and rounding is monotone
    assert heat.shape == (SIZE, SIZE) and np.isfinite(heat).all() and 0.0 <= heat.min() and heat.max() <= 1.0


def test_the_gate_fits_on_a_small_arch():
    """(Every arch's gate is fitted by the slow end-to-end test: a 2048-wide covariance takes ~20 s on a busy CPU.)"""
    torch.manual_seed(0)
    spec = PreprocessSpec.for_size(SIZE)
    model = build_model(["normal", "covid"], arch="resnet18", weights=None).eval()
    pixels, targets = _stack(8, 1)
    outs = forward_pixels(model, pixels, spec, "cpu", batch_size=4, features=True)
    gate, info, summary = fit_gate(outs.features, outs.views, targets, outs.features[:4], outs.views[:4], 0.99)
    assert info.feature_dim == model.feature_dim
    model.gate = gate
    scored = forward_pixels(model, pixels, spec, "cpu", batch_size=4)
    assert scored.scope.shape == (8,) and np.isfinite(scored.scope).all()


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_arch_runs_train_export_and_both_backends(arch, phantom_dataset, tmp_path):
    """train (1 epoch, calibration, gate) -> ONNX export (checked against PyTorch) -> the same decisions, scopes and
    logits from both backends -> Grad-CAM from the ONNX predictor's checkpoint."""
    from covid_cxr.deploy.export import export_onnx
    from covid_cxr.training.options import TrainConfig
    from covid_cxr.training.train import run

    out = tmp_path / arch
    run(TrainConfig(data=str(phantom_dataset), out=str(out), arch=arch, epochs=1, image_size=SIZE, batch_size=16,
                    weights="none", progress=False, patience=0))
    summary = export_onnx(out / "best.pt", out / "model.onnx")
    assert summary["outputs"] == ["logits", "scope"]
    paths = _phantom_images(phantom_dataset, 8)
    torch_model = covid_cxr.load_run(out, device="cpu")
    onnx_model = covid_cxr.load_run(out, backend="onnx", device="cpu")
    assert torch_model.meta.arch == arch
    pixels = np.stack([covid_cxr.imaging.pixels.geometry(covid_cxr.imaging.images.load_image(p), torch_model.meta.preprocess)
                       for p in paths])
    t, o = torch_model.outputs(pixels), onnx_model.outputs(pixels)
    # test_export.TOL's and SCOPE_RTOL's derivations, with 10x room for the other archs: wider sums (ResNet-50's
    # 512 x 3 x 3 = 4608 products, ConvNeXt-T's 3072-wide MLPs: 2x DenseNet's sqrt(K)), other layers (LayerNorm,
    # depthwise convolutions) and narrower features (512 for ResNet-18: a smaller gate.MIN_SCALE floor), at 64 px.
    # (The scope bar was 1e-3, DenseNet's own bound.) A wrong graph is still off by O(1).
    logit_tol, scope_rtol = 10 * TOL, 10 * SCOPE_RTOL
    assert np.abs(t.logits - o.logits).max() <= logit_tol
    assert np.abs(t.scope - o.scope).max() <= scope_rtol * max(1.0, float(np.abs(t.scope).max()))
    tr, orr = torch_model.predict(paths), onnx_model.predict(paths)
    meta = torch_model.meta
    edge = scope_rtol * max(1.0, meta.gate.threshold)  # flags and decisions compared away from the thresholds' edges
    assert [a.in_scope for a in tr if abs(a.scope_score - meta.gate.threshold) > edge] == [
        b.in_scope for a, b in zip(tr, orr) if abs(a.scope_score - meta.gate.threshold) > edge]
    far = [abs(a.log_odds - meta.threshold_log_odds) > 10 * log_odds_atol(meta.temperature) for a in tr]
    assert [a.label for a, f in zip(tr, far) if f] == [b.label for b, f in zip(orr, far) if f]
    [cam] = onnx_model.explain(paths[0])
    assert cam.heatmap.shape == cam.image.shape and cam.heatmap.max() <= 1.0  # exact, as above


@pytest.mark.slow
def test_training_from_torchxrayvision_weights_records_the_input_scale(phantom_dataset, tmp_path):
    """--weights FILE (torchxrayvision layout) --input-scale xrv: the model trains, and the run's preprocessing (what
    every backend applies) is torchxrayvision's range."""
    from test_weights import _xrv_reference

    from covid_cxr.training.options import TrainConfig
    from covid_cxr.training.train import run

    _, state = _xrv_reference()
    weights = tmp_path / "xrv.pt"
    torch.save(state, weights)
    out = tmp_path / "xrv-run"
    run(TrainConfig(data=str(phantom_dataset), out=str(out), epochs=1, image_size=SIZE, batch_size=16,
                    weights=str(weights), input_scale="xrv", progress=False))
    model = covid_cxr.load_run(out, device="cpu")
    assert model.meta.preprocess.scale == "xrv" and model.meta.training["input_scale"] == "xrv"
    [r] = model.predict(_phantom_images(phantom_dataset, 1))
    assert r.label in ("normal", "covid") and np.isfinite(r.scope_score)
