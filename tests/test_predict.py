"""predict: files and folders in, CSV/JSON out, unreadable files named or reported."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_export import SCOPE_RTOL, prob_atol, scope_atol

from conftest import make_gray, write_image
from covid_cxr.deploy import predict
from covid_cxr.deploy.options import PredictConfig
from covid_cxr.errors import CovidCxrError, ImageReadError, RunError
from covid_cxr.imaging.pixels import PIXEL_RANGE, PreprocessSpec, finish, geometry, preprocess
from covid_cxr.model.checkpoint import read_checkpoint


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "in"
    paths = [write_image(folder / "a.png", 1), write_image(folder / "sub" / "b.JPG", 2, mode="RGB"),
             write_image(folder / "sub" / "c.jpeg", 3)]
    (folder / "notes.txt").write_text("not an image")
    return folder, paths


def test_csv_for_a_folder(tiny_run, images, tmp_path):
    folder, paths = images
    out = tmp_path / "preds" / "p.csv"
    res = predict.run(PredictConfig(run=str(tiny_run), inputs=(str(folder),), out=str(out)))
    assert res["images"] == 3 and out.is_file() and res["unreadable"] == 0 and res["text"] is None
    df = pd.read_csv(out)
    assert list(df.columns) == ["path", "prob_normal", "prob_covid", "log_odds", "predicted_label", "threshold",
                                "in_scope", "scope_score", "error"]
    assert sorted(df["path"]) == sorted(str(p) for p in paths)
    np.testing.assert_allclose(df["prob_normal"] + df["prob_covid"], 1.0, atol=1e-12)  # float64, CSV repr: ~1e-16
    meta = read_checkpoint(tiny_run / "best.pt").meta
    assert df["threshold"].dtype == np.float64 and (df["threshold"] == meta.threshold).all()
    expected = np.where(df["log_odds"] >= meta.threshold_log_odds, "covid", "normal")
    assert list(df["predicted_label"]) == list(expected)
    assert df["in_scope"].dtype == bool and df["scope_score"].dtype == np.float64
    assert (df["in_scope"] == (df["scope_score"] <= meta.gate.threshold)).all()
    assert res["out_of_scope"] == int((~df["in_scope"]).sum())


def test_json_format_and_disclaimer(tiny_run, images):
    folder, paths = images
    res = predict.run(PredictConfig(run=str(tiny_run), inputs=(str(paths[0]),), format="json"))
    doc = json.loads(res["text"])
    assert "not a diagnostic device" in doc["disclaimer"]
    assert doc["labels"] == ["normal", "covid"] and doc["positive_class"] == "covid"
    meta = read_checkpoint(tiny_run / "best.pt").meta
    assert isinstance(doc["threshold"], float) and doc["threshold"] == meta.threshold
    assert doc["threshold_text"] == meta.threshold_text()
    assert doc["out_of_scope_gate"]["threshold"] == meta.gate.threshold
    assert len(doc["predictions"]) == 1
    row = doc["predictions"][0]
    assert row["error"] == "" and isinstance(row["threshold"], float) and row["threshold"] == meta.threshold
    assert isinstance(row["in_scope"], bool) and isinstance(row["scope_score"], float)
    assert row["in_scope"] == (row["scope_score"] <= meta.gate.threshold)
    # the same float64 log-odds through another formula: a few ulp of a probability (~1e-16)
    assert row["prob_covid"] == pytest.approx(1 / (1 + np.exp(-row["log_odds"])), abs=1e-12)
    # the JSON rows carry the same sentence as the API's Prediction (one definition: ModelMeta.explain_decision)
    from covid_cxr.deploy.api import load_run

    [pred] = load_run(str(tiny_run)).predict([str(paths[0])])
    assert row["explanation"] == pred.explanation and "the decision threshold" in row["explanation"]


def test_unreadable_file_is_an_error_or_a_row(tiny_run, images, tmp_path):
    folder, _ = images
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(ImageReadError, match="broken.png"):
        predict.run(PredictConfig(run=str(tiny_run), inputs=(str(folder),)))
    res = predict.run(PredictConfig(run=str(tiny_run), inputs=(str(folder),), skip_unreadable=True))
    df = pd.read_csv(io.StringIO(res["text"]), keep_default_na=False)
    assert len(df) == 4 and res["unreadable"] == 1
    row = df[df["path"] == str(bad)].iloc[0]
    assert row["error"] and row["predicted_label"] == ""
    assert row["in_scope"] == "" and row["scope_score"] == "" and row["prob_covid"] == ""  # nothing made up
    assert float(row["threshold"]) == read_checkpoint(tiny_run / "best.pt").meta.threshold
    good = df[df["path"] != str(bad)]
    assert (good["error"] == "").all() and set(good["in_scope"]) <= {"True", "False"}


def test_bad_inputs(tiny_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CovidCxrError, match="holds no"):
        predict.run(PredictConfig(run=str(tiny_run), inputs=(str(empty),)))
    with pytest.raises(CovidCxrError, match="does not exist"):
        predict.run(PredictConfig(run=str(tiny_run), inputs=(str(tmp_path / "missing.png"),)))
    with pytest.raises(RunError, match="has no best.pt"):
        predict.run(PredictConfig(run=str(tmp_path), inputs=(str(empty),)))
    with pytest.raises(RunError, match="not found"):
        predict.run(PredictConfig(run=str(tmp_path / "no-run"), inputs=(str(empty),)))


def test_preprocess_is_pure_and_checks_its_input():
    img = make_gray(4, (50, 70))
    spec = PreprocessSpec(size=32)
    a = preprocess(img, spec)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and isinstance(a, np.ndarray)
    assert np.array_equal(a, preprocess(img.copy(), PreprocessSpec.for_size(32)))
    assert np.array_equal(a, finish(geometry(img, spec), spec))  # the stages compose to the whole pipeline
    assert np.array_equal(img, make_gray(4, (50, 70)))  # input untouched
    black = preprocess(np.zeros((10, 10), np.uint8), spec)
    white = preprocess(np.full((10, 10), PIXEL_RANGE[1], np.uint8), spec)
    # float32 (x - m) / s against float64: m, s and two operations each rounded to 2^-24 relative, no cancellation
    # (|x - m| >= 0.4): <= 4 x 6e-8 = 2.4e-7 relative; 1e-5 leaves 40x
    np.testing.assert_allclose(black[:, 0, 0], [-m / s for m, s in zip(spec.mean, spec.std)], rtol=1e-5)
    np.testing.assert_allclose(white[:, 0, 0], [(1 - m) / s for m, s in zip(spec.mean, spec.std)], rtol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(img.astype(np.float32), spec)
    with pytest.raises(ValueError, match="grayscale"):
        preprocess(np.zeros((8, 8, 3), np.uint8), spec)


def test_predict_uses_the_same_pixels_as_the_model_contract(tiny_run, images):
    """predict's probabilities are softmax(logits / T) of the model on preprocess(load_image(file))."""
    from covid_cxr.imaging.images import load_image
    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.model.meta import probabilities

    _, paths = images
    model, meta = load_model(tiny_run / "best.pt")
    x = torch.from_numpy(np.stack([preprocess(load_image(p), meta.preprocess) for p in paths]))
    with torch.no_grad():
        logits = model(x).numpy()
    res = predict.run(PredictConfig(run=str(tiny_run), inputs=tuple(str(p) for p in paths), format="json"))
    got = json.loads(res["text"])["predictions"]
    # the same network on the same 3-image batch in one process and thread count: the same kernels, the same float32
    # logits (MKL and oneDNN are run-to-run reproducible at a fixed thread count); 1e-6 is slack for float64
    # post-processing only, and a second pixel pipeline would show
    np.testing.assert_allclose([g["prob_covid"] for g in got], probabilities(logits, meta.temperature)[:, 1],
                               atol=1e-6)


def test_onnx_backend_and_heatmaps(tiny_run, images, tmp_path):
    """`export` then `predict --backend onnx` agrees with torch; `--heatmaps` writes one overlay per image."""
    import shutil

    from covid_cxr.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    folder, paths = images
    assert main(["export", "--run", str(run)]) == 0
    assert (run / "model.onnx").is_file() and (run / "model.json").is_file()
    torch_res = predict.run(PredictConfig(run=str(run), inputs=(str(folder),), format="json"))
    onnx_res = predict.run(PredictConfig(run=str(run), inputs=(str(folder),), format="json", backend="onnx",
                                         heatmaps=str(tmp_path / "heat")))
    t = json.loads(torch_res["text"])["predictions"]
    o = json.loads(onnx_res["text"])["predictions"]
    assert [r["path"] for r in t] == [r["path"] for r in o]
    # torch vs ONNX Runtime: test_export's derived bounds (was atol=1e-4, tighter than prob_atol for T < 0.5)
    meta = read_checkpoint(run / "best.pt").meta
    np.testing.assert_allclose([r["prob_covid"] for r in o], [r["prob_covid"] for r in t],
                               atol=prob_atol(meta.temperature))
    clear = [abs(r["scope_score"] - meta.gate.threshold) > scope_atol(meta.gate.threshold) for r in t]
    # the gate is part of the exported graph (flags compared away from its threshold's edge)
    assert [r["in_scope"] for r, c in zip(o, clear) if c] == [r["in_scope"] for r, c in zip(t, clear) if c]
    np.testing.assert_allclose([r["scope_score"] for r in o], [r["scope_score"] for r in t], rtol=SCOPE_RTOL,
                               atol=SCOPE_RTOL)
    assert [r["threshold"] for r in o] == [r["threshold"] for r in t]
    pngs = sorted((tmp_path / "heat").glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert all(r["heatmap_png"] for r in o)
    with pytest.raises(CovidCxrError, match="export the model first"):
        predict.run(PredictConfig(run=str(tiny_run.parent), inputs=(str(folder),), backend="onnx"))


def test_auto_format_is_a_table_for_a_person_and_csv_or_json_for_a_program(tiny_run):
    cfg = PredictConfig(run="r", inputs=("x",))
    assert cfg.format == "auto"
    assert predict.output_format(cfg, terminal=True) == "table"
    assert predict.output_format(cfg, terminal=False) == "csv"
    assert predict.output_format(PredictConfig(run="r", inputs=("x",), out="p.csv"), terminal=True) == "csv"
    assert predict.output_format(PredictConfig(run="r", inputs=("x",), out="p.JSON"), terminal=True) == "json"
    assert predict.output_format(PredictConfig(run="r", inputs=("x",), format="csv"), terminal=True) == "csv"


def test_the_table_names_each_decision_and_sums_up(tiny_run, images):
    """On a terminal: short paths, the decision or 'out of scope' (probability in brackets), the unreadable file
    with its reason, a summary whose counts add up, and the threshold in plain words."""
    folder, paths = images
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    res = predict.run(PredictConfig(run=str(tiny_run), inputs=(str(folder),), skip_unreadable=True, format="table"))
    csv = predict.run(PredictConfig(run=str(tiny_run), inputs=(str(folder),), skip_unreadable=True, format="csv"))
    df = pd.read_csv(io.StringIO(csv["text"]), keep_default_na=False)
    meta = read_checkpoint(tiny_run / "best.pt").meta
    lines = res["text"].splitlines()
    assert lines[0].split() == ["image", "decision", "P(covid)", "scope", "score"]
    body = {line.split()[0]: line for line in lines[1:5]}
    assert set(body) == {"a.png", "sub/b.JPG", "sub/c.jpeg", "broken.png"}
    assert "unreadable" in body["broken.png"]
    for _, r in df[df["error"] == ""].iterrows():
        name = str(pd.Series([r["path"]]).iloc[0]).removeprefix(str(folder) + "/")
        words = body[name].split()
        if r["in_scope"] == "False":
            assert words[1:4] == ["out", "of", "scope"] and words[4].startswith("(")
        else:
            assert words[1] == r["predicted_label"]
    n_covid = int((df["predicted_label"] == "covid").sum())
    n_normal = int((df["predicted_label"] == "normal").sum())
    assert n_covid + n_normal == 3
    assert f"4 images: {n_normal} normal, {n_covid} covid" in res["text"] and "1 unreadable" in res["text"]
    assert res["summary"] in res["text"] and csv["summary"] == res["summary"]
    assert meta.threshold_reason() in res["text"]


def test_every_prediction_explains_its_decision(tiny_run, images):
    """The API's Prediction carries the sentence the web page and the table show: P(covid) against the threshold
    and how the threshold was chosen; an out-of-scope image says so first."""
    from covid_cxr.deploy.api import load_run

    _, paths = images
    model = load_run(str(tiny_run))
    meta = model.meta
    for pred in model.predict([str(p) for p in paths]):
        side = "at or above" if pred.label == "covid" else "below"
        head = f"{pred.label}: P(covid) "
        assert head in pred.explanation and meta.threshold_reason() in pred.explanation
        p_text, t_text = pred.explanation.split(head)[1].split(",")[0].split(f" is {side} the decision threshold ")
        for text, value in ((p_text, pred.probability), (t_text, meta.threshold)):  # rounded, never misleading
            # half a unit of the last printed digit; 1e-12 for float64 parsing and 10.0 ** -d (~1e-16 each)
            assert abs(float(text) - value) <= 0.5 * 10.0 ** -len(text.split(".")[1]) + 1e-12
        assert (float(p_text) >= float(t_text)) == (pred.label == "covid") or p_text == t_text
        assert pred.explanation.startswith("out of scope: ") == (pred.in_scope is False)
        assert str(pred) == f"{pred.source}: {pred.explanation}"
