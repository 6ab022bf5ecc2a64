"""evaluate: report files, metrics with patient-level CIs, consistency with predict, no silent skipping."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from covid_cxr import evaluate
from covid_cxr.config import EvalConfig, PredictConfig
from covid_cxr.errors import ImageReadError
from covid_cxr.metrics import binary_metrics, bootstrap_ci, headline_metrics
from covid_cxr import predict

EVAL_FILES = ("classification_report.txt", "metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png",
              "class_distribution.png", "samples.png")


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    result = evaluate.run(EvalConfig(run=str(tiny_run), bootstrap=200))
    return tiny_run, result


def test_evaluate_writes_every_report(evaluated, phantom_dataset):
    run, result = evaluated
    out = run / "eval-test"
    for name in EVAL_FILES:
        assert (out / name).stat().st_size > 0, name
    for png in ("confusion_matrix.png", "roc.png", "class_distribution.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = pd.read_csv(phantom_dataset / "manifest.csv")
    n_test = int((manifest["split"] == "test").sum())
    report = (out / "classification_report.txt").read_text()
    lines = report.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[2].split()[0] == "0" and lines[3].split()[0] == "1"
    assert lines[2].split()[-1] == str(n_test // 2)
    assert "accuracy" in report and report.rstrip().endswith(str(n_test))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["images"] == n_test
    assert metrics["protocol"]["split"] == "test" and metrics["protocol"]["sources"] == ["synthetic-phantoms"]
    assert "research use only" in metrics["disclaimer"]
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "ppv", "npv"):
        assert key in metrics["metrics"]
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == n_test
    np.testing.assert_allclose(preds["prob_normal"] + preds["prob_covid"], 1.0, atol=1e-5)
    cm = np.array(metrics["confusion_matrix"])
    assert cm.sum() == n_test and cm[1, 1] == metrics["metrics"]["tp"]


def test_confidence_intervals_contain_the_point_estimate(evaluated):
    _, result = evaluated
    for key, (lo, hi) in result["ci95"].items():
        v = result["metrics"][key]
        if np.isnan(v):
            continue
        assert lo - 1e-9 <= v <= hi + 1e-9, key


def test_bootstrap_resamples_patients_not_images():
    """One patient with many identical images: patient resampling gives a much wider interval."""
    rng = np.random.default_rng(0)
    targets = np.array([1] * 50 + [1] * 10 + [0] * 60)
    scores = np.r_[np.full(50, 0.9), rng.uniform(0, 0.4, 10), rng.uniform(0, 0.4, 60)]
    probs = np.c_[1 - scores, scores]
    per_image = np.arange(120)
    per_patient = np.r_[np.zeros(50, int), np.arange(1, 71)]  # the 50 correct positives are one patient
    ci_img = bootstrap_ci(targets, probs, per_image, 0.5, 300)["sensitivity"]
    ci_pat = bootstrap_ci(targets, probs, per_patient, 0.5, 300)["sensitivity"]
    assert (ci_pat[1] - ci_pat[0]) > 2 * (ci_img[1] - ci_img[0])


def test_binary_metrics_by_hand():
    t = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1])
    m = binary_metrics(t, s, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(0.5)
    assert m["ppv"] == pytest.approx(2 / 3) and m["npv"] == pytest.approx(0.5)
    assert headline_metrics(t, np.c_[1 - s, s], 0.5)["roc_auc"] == pytest.approx(4 / 6)  # 4 of 6 pos/neg pairs ranked right


def test_predict_agrees_with_evaluate(evaluated):
    run, _ = evaluated
    preds = pd.read_csv(run / "eval-test" / "predictions.csv").head(6)
    res = predict.run(PredictConfig(run=str(run), inputs=tuple(preds["path"]), format="json"))
    got = json.loads(res["text"])["predictions"]
    np.testing.assert_allclose([g["prob_covid"] for g in got], preds["prob_covid"], atol=1e-5)


def test_unreadable_test_image_stops_evaluation(tiny_run, phantom_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dataset, data)
    shutil.rmtree(data / "cache")  # cached pixels are keyed by content; without them the file is read
    df = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    df.loc[df.index[df["split"] == "test"][0], "path"] = str(bad)
    df.to_csv(data / "manifest.csv", index=False)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.raises(ImageReadError, match="corrupt.png"):
        evaluate.run(EvalConfig(run=str(run), data=str(data), bootstrap=0))


def test_training_stores_a_validated_operating_point_and_temperature(tiny_run, phantom_dataset):
    """The threshold is chosen on validation (meets the target there), temperature scaling does not
    raise the validation NLL, and both travel in the checkpoint to evaluate and predict."""
    import torch

    from covid_cxr.metrics import binary_metrics

    cal = json.loads((tiny_run / "calibration.json").read_text())
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    assert ckpt["temperature"] == pytest.approx(cal["temperature"]) and ckpt["threshold"] == cal["threshold"]
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    assert (tiny_run / "calibration_val.png").is_file()
    if "operating_point" in cal:
        val = evaluate.run(EvalConfig(run=str(tiny_run), split="val", bootstrap=0))
        preds = pd.read_csv(tiny_run / "eval-val" / "predictions.csv")
        t = (preds["target"] == "covid").astype(int).to_numpy()
        m = binary_metrics(t, preds["prob_covid"].to_numpy(), cal["threshold"])
        assert m["sensitivity"] >= 0.95  # the default --target-sensitivity, met on validation
        assert val["threshold"] == cal["threshold"] and val["calibration"]["temperature"] == cal["temperature"]


def test_breakdowns_and_reliability(evaluated):
    run, result = evaluated
    assert (run / "eval-test" / "reliability.png").is_file()
    by_source = result["by_source"]
    assert sum(b["n"] for b in by_source.values()) == result["protocol"]["images"]
    assert sum(b["n"] for b in result["by_view"].values()) == result["protocol"]["images"]
    assert 0 <= result["calibration"]["ece"] <= 1
    assert result["metrics_at_0.5"]["accuracy"] >= 0
