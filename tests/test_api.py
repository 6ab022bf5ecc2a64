"""The Python API: covid_cxr.load_run -> Predictor.predict / explain, the lazy package exports, and docs/api.md's
example (run as written, on a tiny trained run)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export import SCOPE_RTOL, prob_atol, scope_atol

import covid_cxr
from covid_cxr.deploy import predict
from covid_cxr.deploy.options import PredictConfig
from covid_cxr.errors import CheckpointError, CovidCxrError, ImageReadError
from covid_cxr.model.results import as_gray_image

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "pandas", "matplotlib", "sklearn", "scipy", "onnx")


def _phantom_images(dataset: Path, n: int) -> list[Path]:
    manifest = (dataset / "manifest.csv").read_text().splitlines()
    info = json.loads((dataset / "dataset.json").read_text())
    root = next(iter(info["source_roots"].values()))
    base = Path(root["absolute"])
    header = manifest[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in manifest[1:]]
    return [base / r["path"] for r in rows if r["split"] == "test"][:n]


def readme_example() -> str:
    """The first python block of docs/api.md's 'Python API' section."""
    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_on_a_trained_run(tiny_run, phantom_dataset, tmp_path, monkeypatch):
    """docs/api.md's code, unchanged, in a folder laid out as it assumes (runs/, scans/, data/)."""
    images = _phantom_images(phantom_dataset, 3)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "densenet").symlink_to(tiny_run, target_is_directory=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "covid-vs-normal").symlink_to(phantom_dataset, target_is_directory=True)
    (tmp_path / "scans").mkdir()
    for name, src in zip("abc", images):
        shutil.copy2(src, tmp_path / "scans" / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "docs/api.md", "exec"), {"__name__": "readme"})
    printed = out.getvalue()
    assert "scans/a.png: " in printed and "<PIL image 1>: " in printed and "<array 2>: " in printed
    assert "the decision threshold " in printed and "set to catch 95 % of covid cases on validation" in printed
    assert (tmp_path / "heatmaps" / "a_gradcam.png").is_file()
    assert re.search(r"torch\.Size\(\[8, 3, 32, 32\]\)", printed), printed


def test_paths_pil_images_and_arrays_predict_the_same(tiny_run, phantom_dataset):
    model = covid_cxr.load_run(tiny_run, device="cpu")
    path = _phantom_images(phantom_dataset, 1)[0]
    gray = np.asarray(Image.open(path).convert("L"))
    inputs = [path, str(path), Image.open(path), gray, gray[..., None], gray[None], np.stack([gray] * 3, -1),
              Image.fromarray(gray).convert("RGB")]
    results = model.predict(inputs)
    assert len(results) == len(inputs)
    first = results[0]
    # exact: the 8 inputs decode to the same pixels and are rows of one forward pass; every row of a batched
    # convolution or GEMM runs the same kernel in the same summation order (threads split rows, never one sum)
    for r in results[1:]:
        assert r.probabilities == first.probabilities and r.label == first.label and r.in_scope == first.in_scope
    assert results[0].source == str(path) and results[3].source == "<array 3>" and results[2].source == "<PIL image 2>"
    assert first.threshold == model.meta.threshold and first.threshold_text == model.meta.threshold_text()
    assert first.in_scope in (True, False) and first.scope_score is not None
    assert sum(first.probabilities.values()) == pytest.approx(1.0)  # float64 exp of log-softmax: ~1e-16 off
    assert first.probability == first.probabilities["covid"]
    # one image, not in a list (a batch of one: fp32 kernels may sum in another order than for a batch of eight, so
    # each logit may move by test_export.TOL; was abs=1e-6, tighter than that bound for every T <= T_MAX = 20)
    assert model.predict(path)[0].probabilities["covid"] == pytest.approx(first.probabilities["covid"],
                                                                         abs=prob_atol(model.meta.temperature))
    assert first.to_dict()["label"] == first.label


def test_predict_agrees_with_the_command_line(tiny_run, phantom_dataset):
    paths = _phantom_images(phantom_dataset, 5)
    api = covid_cxr.load_run(tiny_run, device="cpu").predict(paths)  # the command's batch size: same numbers
    rows = json.loads(predict.run(PredictConfig(run=str(tiny_run), inputs=tuple(map(str, paths)), format="json",
                                                device="cpu"))["text"])["predictions"]
    assert [r.source for r in api] == [row["path"] for row in rows]
    for r, row in zip(api, rows):
        # same process, thread count and 5-image batch: the same kernels give the same float32 logits (MKL and
        # oneDNN are run-to-run reproducible at a fixed thread count), and JSON round-trips a float64 exactly;
        # 1e-12 only allows float64 post-processing in another order (~1e-16)
        assert r.probabilities["covid"] == pytest.approx(row["prob_covid"], abs=1e-12)
        assert r.label == row["predicted_label"] and r.in_scope == row["in_scope"]


def test_folders_are_expanded(tiny_run, phantom_dataset, tmp_path):
    for i, src in enumerate(_phantom_images(phantom_dataset, 3)):
        shutil.copy2(src, tmp_path / f"{i}.png")
    results = covid_cxr.load_run(tiny_run, device="cpu").predict(tmp_path)
    assert [Path(r.source).name for r in results] == ["0.png", "1.png", "2.png"]


@pytest.mark.parametrize("bad, needle", [
    (np.zeros((64, 64), np.float32), "float32 pixels"),
    (np.zeros((4, 64, 64), np.uint8), "not one image"),
    (np.zeros((4, 4), np.uint8), "at least 8x8"),
    ({"not": "an image"}, "dict is not an image"),
])
def test_what_is_not_an_image_is_refused_clearly(bad, needle):
    with pytest.raises(ImageReadError, match=needle):
        as_gray_image(bad, 0)


def test_unreadable_files_are_named(tiny_run, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ImageReadError, match="broken.png"):
        covid_cxr.load_run(tiny_run, device="cpu").predict([broken])


def test_explain_returns_heatmaps_and_overlays(tiny_run, phantom_dataset, tmp_path):
    model = covid_cxr.load_run(tiny_run, device="cpu")
    path = _phantom_images(phantom_dataset, 1)[0]
    [e] = model.explain([path], out_dir=tmp_path / "cams")
    assert e.heatmap.shape == e.image.shape and e.heatmap.dtype == np.float32
    assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0  # exact: divided by its own max (rounding is monotone)
    assert e.target == "covid" and e.layer.startswith("features")
    assert Path(e.overlay_png).is_file() and Path(e.overlay_png).name == f"{path.stem}_gradcam.png"
    assert e.prediction.probabilities == model.predict(path)[0].probabilities
    [normal] = model.explain(np.asarray(Image.open(path)), target="normal")
    assert normal.target == "normal" and normal.overlay_png is None
    with pytest.raises(Exception, match="not a class of this model"):
        model.explain(path, target="pneumonia")


def test_onnx_backend_predicts_like_torch_and_explains_from_the_checkpoint(tiny_exported, phantom_dataset):
    paths = _phantom_images(phantom_dataset, 4)
    t = covid_cxr.load_run(tiny_exported, device="cpu").predict(paths)
    o = covid_cxr.load_run(tiny_exported, backend="onnx", device="cpu").predict(paths)
    t_meta = covid_cxr.load_run(tiny_exported, device="cpu").meta
    for a, b in zip(t, o):  # torch vs ONNX Runtime: logits within test_export.TOL, scores within SCOPE_RTOL
        assert a.probabilities["covid"] == pytest.approx(b.probabilities["covid"], abs=prob_atol(t_meta.temperature))
        assert a.scope_score == pytest.approx(b.scope_score, rel=SCOPE_RTOL, abs=SCOPE_RTOL)
        if abs(a.scope_score - t_meta.gate.threshold) > scope_atol(t_meta.gate.threshold):  # not on the edge
            assert a.in_scope == b.in_scope
    onnx_model = covid_cxr.load_run(tiny_exported / "model.onnx", backend="onnx")
    assert onnx_model.backend == "onnx"
    assert onnx_model.explain(paths[0])[0].heatmap.max() <= 1.0


def test_load_run_errors_say_what_to_do(tiny_run, tmp_path):
    with pytest.raises(CovidCxrError, match="nothing-here not found; train a model with `covid-cxr train"):
        covid_cxr.load_run(tmp_path / "nothing-here")
    with pytest.raises(CheckpointError, match="not found"):
        covid_cxr.load_run(tmp_path / "nothing-here.safetensors")
    with pytest.raises(Exception, match="backend must be one of"):
        covid_cxr.load_run(tiny_run, backend="tensorflow")
    with pytest.raises(CheckpointError, match="export the model first"):
        covid_cxr.load_run(tiny_run, backend="onnx")


def test_import_covid_cxr_is_light_and_exports_the_api_lazily():
    code = ("import sys, json, covid_cxr\n"
            "names = [covid_cxr.load_run.__module__, covid_cxr.Predictor.__module__, covid_cxr.Prediction.__module__]\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "ds = covid_cxr.ManifestDataset.__module__\n"
            "print(json.dumps({'names': names, 'heavy_before_dataset': heavy, 'dataset': ds, "
            "'torch_after_dataset': 'torch' in sys.modules, 'all': sorted(covid_cxr.__all__)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["names"] == ["covid_cxr.deploy.api", "covid_cxr.model.inference", "covid_cxr.model.results"]
    assert doc["heavy_before_dataset"] == []
    assert doc["dataset"] == "covid_cxr.training.loaders" and doc["torch_after_dataset"] is True
    assert {"load_run", "Predictor", "ManifestDataset"} <= set(doc["all"])
    with pytest.raises(AttributeError):
        covid_cxr.no_such_name  # noqa: B018


def test_manifest_dataset_with_a_model_spec_gives_that_models_inputs(tiny_run, phantom_dataset):
    from covid_cxr.imaging.pixels import finish

    model = covid_cxr.load_run(tiny_run, device="cpu")
    ds = covid_cxr.ManifestDataset(phantom_dataset, "test", spec=model.meta.preprocess)
    x, y = ds[0]
    assert tuple(x.shape) == (3, model.meta.preprocess.size, model.meta.preprocess.size)
    assert ds.labels == list(model.labels) and y in (0, 1)
    assert np.array_equal(x.numpy(), finish(ds._inner.pixels[0], model.meta.preprocess))  # one function, same input
