"""evaluate: report files, metrics with patient-level CIs, consistency with predict, no silent skipping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_export import log_odds_atol, prob_atol, scope_atol

from covid_cxr.deploy import predict
from covid_cxr.deploy.options import PredictConfig
from covid_cxr.errors import DatasetError, ImageReadError
from covid_cxr.evaluation import evaluate
from covid_cxr.evaluation.metrics import auc_with_ci, bootstrap_ci, headline_metrics, rates, roc_auc
from covid_cxr.evaluation.options import EvalConfig
from covid_cxr.imaging.images import sha256_file
from covid_cxr.model.checkpoint import read_checkpoint
from covid_cxr.model.meta import log_probs

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
    assert metrics["protocol"]["synthetic_sources"] == ["synthetic-phantoms"]  # phantoms are flagged as such
    meta = read_checkpoint(run / "best.pt").meta
    assert metrics["threshold_log_odds"] == meta.threshold_log_odds and metrics["threshold"] == meta.threshold
    assert metrics["threshold_text"] == meta.threshold_text() and metrics["threshold_text"].startswith("P(covid) >= ")
    assert metrics["estimate"] is None  # a model with a test split estimates itself
    assert metrics["scope"]["in_scope"] + metrics["scope"]["out_of_scope"] == n_test
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == n_test
    # float64 exp of log-softmax, written as repr (exact): the sum is off by a few 1e-16
    np.testing.assert_allclose(preds["prob_normal"] + preds["prob_covid"], 1.0, atol=1e-12)
    # the log of a ratio of two such probabilities: each is off by ~(1 + |log p|) x 1.1e-16 relative, so the log
    # by ~1e-15 while neither probability underflows (the tiny model's are ~0.5); 1e-9 leaves 1e6x
    np.testing.assert_allclose(preds["log_odds"], np.log(preds["prob_covid"] / preds["prob_normal"]), atol=1e-9)
    decided = np.where(preds["log_odds"] >= meta.threshold_log_odds, "covid", "normal")
    assert list(preds["predicted_label"]) == list(decided)  # the decision is made on log-odds
    assert preds["in_scope"].dtype == bool
    assert (preds["in_scope"] == (preds["scope_score"] <= meta.gate.threshold)).all()
    assert int((~preds["in_scope"]).sum()) == metrics["scope"]["out_of_scope"]
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
    lp = np.log(np.c_[1 - scores, scores])
    pred = (scores >= 0.5).astype(int)
    per_image = np.arange(120)
    per_patient = np.r_[np.zeros(50, int), np.arange(1, 71)]  # the 50 correct positives are one patient
    ci_img = bootstrap_ci(targets, lp, pred, per_image, 1, 300)["sensitivity"]
    ci_pat = bootstrap_ci(targets, lp, pred, per_patient, 1, 300)["sensitivity"]
    assert (ci_pat[1] - ci_pat[0]) > 2 * (ci_img[1] - ci_img[0])
    auc_img = auc_with_ci(targets, lp, per_image, 1, 100, seed=0)
    auc_pat = auc_with_ci(targets, lp, per_patient, 1, 100, seed=0)
    assert auc_img["auc"] == auc_pat["auc"] == roc_auc(targets, lp, 1)
    assert (auc_pat["ci95"][1] - auc_pat["ci95"][0]) > (auc_img["ci95"][1] - auc_img["ci95"][0])


def test_binary_metrics_by_hand():
    t = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1])
    m = rates(t == 1, s >= 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    # ratios of small integer counts here and below: exact up to 1 ulp
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(0.5)
    assert m["ppv"] == pytest.approx(2 / 3) and m["npv"] == pytest.approx(0.5)
    lp, pred = np.log(np.c_[1 - s, s]), (s >= 0.5).astype(int)
    h = headline_metrics(t, lp, pred, 1)
    assert h["roc_auc"] == pytest.approx(4 / 6)  # 4 of 6 pos/neg pairs ranked right
    assert {k: h[k] for k in m} == m and h["accuracy"] == pytest.approx(3 / 5)
    # positive class first: the same images with the class order swapped give the same numbers
    swapped = headline_metrics(1 - t, lp[:, ::-1], 1 - pred, 0)
    assert swapped == pytest.approx(h)


def test_log_probability_metrics_do_not_tie_saturated_images():
    """Two confident images: float32 softmax gives both P(covid) = 1.0 exactly (a tie, AUC 0.5); the metrics
    rank on float64 log-odds, which still tell them apart."""
    logits = np.array([[0.0, 40.0], [0.0, 45.0]], dtype=np.float32)
    targets = np.array([0, 1])
    z32 = logits - logits.max(1, keepdims=True)
    p32 = np.exp(z32) / np.exp(z32).sum(1, keepdims=True)
    assert p32.dtype == np.float32 and (p32[:, 1] == 1.0).all()  # saturated: tied
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(targets, p32[:, 1]) == 0.5
    lp = log_probs(logits)
    assert roc_auc(targets, lp, 1) == 1.0
    assert headline_metrics(targets, lp, np.array([1, 1]), 1)["roc_auc"] == 1.0
    assert roc_auc(np.array([1, 0]), lp[:, ::-1], 0) == 1.0  # positive index 0 as well


def test_predict_agrees_with_evaluate(evaluated):
    run, _ = evaluated
    preds = pd.read_csv(run / "eval-test" / "predictions.csv").head(6)
    res = predict.run(PredictConfig(run=str(run), inputs=tuple(preds["path"]), format="json"))
    got = json.loads(res["text"])["predictions"]
    assert [g["path"] for g in got] == list(preds["path"])
    # evaluate runs the test split in batches of 32, predict these 6 files in one batch of 6: other kernels may
    # sum in another order, so each logit may move by test_export.TOL (was atol 1e-5 and 1e-4: what the derived
    # bounds give only for T >= 5 and T >= 2). Flags and decisions compared away from their thresholds' edges.
    meta = read_checkpoint(run / "best.pt").meta
    t = meta.temperature
    np.testing.assert_allclose([g["prob_covid"] for g in got], preds["prob_covid"], atol=prob_atol(t))
    np.testing.assert_allclose([g["log_odds"] for g in got], preds["log_odds"], atol=log_odds_atol(t))
    far = [abs(x - meta.threshold_log_odds) > log_odds_atol(t) for x in preds["log_odds"]]
    assert [g["predicted_label"] for g, f in zip(got, far) if f] == [
        e for e, f in zip(preds["predicted_label"], far) if f]
    far = [abs(x - meta.gate.threshold) > scope_atol(meta.gate.threshold) for x in preds["scope_score"]]
    assert [g["in_scope"] for g, f in zip(got, far) if f] == [e for e, f in zip(preds["in_scope"], far) if f]


def test_unreadable_test_image_stops_evaluation(tiny_run, phantom_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dataset, data)
    shutil.rmtree(data / "cache")
    df = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    row = df.index[df["split"] == "test"][0]
    # The corrupt file goes inside the row's source (a copy of its folder made of links: manifest paths may not
    # leave their source). Cached pixels are keyed by content (sha256), and a copied dataset still finds its
    # original's cache: give the row the corrupt file's own hash, so its pixels must come from the file.
    info = json.loads((data / "dataset.json").read_text())
    source = df.loc[row, "source"]
    original = Path(info["source_roots"][source]["absolute"])
    src = tmp_path / "src"
    src.mkdir()
    for entry in original.iterdir():
        (src / entry.name).symlink_to(entry)
    info["source_roots"][source] = {**info["source_roots"][source], "path": str(src), "absolute": str(src)}
    (data / "dataset.json").write_text(json.dumps(info))
    bad = src / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    df.loc[row, ["path", "sha256"]] = ["corrupt.png", sha256_file(bad)]
    df.to_csv(data / "manifest.csv", index=False)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.raises(ImageReadError, match="corrupt.png"):
        evaluate.run(EvalConfig(run=str(run), data=str(data), bootstrap=0))


def test_a_moved_run_folder_finds_its_dataset(evaluated, tmp_path):
    """config.yaml records the dataset relative to the run folder (and absolute, as a fallback): a run moved
    together with its dataset uses the moved dataset; a run copied alone falls back to the original."""
    import yaml

    run, result = evaluated
    rel = yaml.safe_load((run / "config.yaml").read_text())["data"]
    ups = sum(1 for part in rel.split("/") if part == "..")
    moved = tmp_path.joinpath(*[f"d{i}" for i in range(ups)]) / "run"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("eval-*"))
    dataset_copy = (moved / rel).resolve()
    assert tmp_path in dataset_copy.parents
    shutil.copytree(Path(result["protocol"]["dataset"]), dataset_copy)
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["data_absolute"] = str(tmp_path / "nowhere")  # only the relative path can work
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    again = evaluate.run(EvalConfig(run=str(moved), bootstrap=0))
    assert again["protocol"]["dataset"] == str(dataset_copy)
    assert again["confusion_matrix"] == result["confusion_matrix"]
    assert again["metrics"]["roc_auc"] == result["metrics"]["roc_auc"]

    alone = tmp_path / "alone" / "run"
    shutil.copytree(run, alone, ignore=shutil.ignore_patterns("eval-*"))
    assert not (alone / rel).exists()
    again = evaluate.run(EvalConfig(run=str(alone), bootstrap=0))
    assert again["protocol"]["dataset"] == result["protocol"]["dataset"]
    assert again["confusion_matrix"] == result["confusion_matrix"]


def test_training_stores_a_validated_operating_point_and_temperature(tiny_run, phantom_dataset):
    """The threshold is chosen on validation (meets the target there), temperature scaling does not
    raise the validation NLL, and both travel in the checkpoint's meta to evaluate and predict."""
    cal = json.loads((tiny_run / "calibration.json").read_text())
    meta = read_checkpoint(tiny_run / "best.pt").meta
    assert meta.temperature == pytest.approx(cal["calibration"]["temperature"])  # one float, stored twice: exact
    assert meta.calibration.to_dict() == cal["calibration"]
    assert meta.threshold_log_odds == cal["threshold_log_odds"] and meta.threshold == cal["threshold"]
    assert isinstance(meta.threshold, float) and cal["threshold_text"] == meta.threshold_text()
    assert cal["calibration"]["nll_after"] <= cal["calibration"]["nll_before"] + 1e-9
    assert (tiny_run / "calibration_val.png").is_file()
    assert meta.calibration.status in ("fitted", "at lower bound", "at upper bound")
    if meta.calibration.threshold_rule == "sensitivity":
        val = evaluate.run(EvalConfig(run=str(tiny_run), split="val", bootstrap=0))
        preds = pd.read_csv(tiny_run / "eval-val" / "predictions.csv")
        t = (preds["target"] == "covid").to_numpy()
        m = rates(t, (preds["log_odds"] >= meta.threshold_log_odds).to_numpy())
        assert m["sensitivity"] >= 0.95  # the default --target-sensitivity, met on validation
        assert m["sensitivity"] == meta.calibration.val_sensitivity
        assert val["metrics"]["sensitivity"] == m["sensitivity"]
        assert val["threshold"] == cal["threshold"] and val["calibration"]["temperature"] == meta.temperature


def test_breakdowns_and_reliability(evaluated):
    run, result = evaluated
    assert (run / "eval-test" / "reliability.png").is_file()
    by_source = result["by_source"]
    assert sum(b["n"] for b in by_source.values()) == result["protocol"]["images"]
    assert sum(b["n"] for b in result["by_view"].values()) == result["protocol"]["images"]
    assert 0 <= result["calibration"]["ece"] <= 1
    assert result["metrics_at_0.5"]["accuracy"] >= 0


def test_every_subgroup_number_carries_its_interval_and_small_ones_are_flagged(evaluated):
    from covid_cxr.evaluation.evaluate import format_summary
    from covid_cxr.evaluation.metrics import MIN_PER_CLASS, wilson_ci

    _, result = evaluated
    assert str(MIN_PER_CLASS) in result["subgroups"]
    for table in (result["by_source"], result["by_view"]):
        for b in table.values():
            assert b["accuracy_ci95"] is not None
            if b["n_positive"]:
                k = round(b["sensitivity"] * b["n_positive"])
                assert b["sensitivity_ci95"] == pytest.approx(wilson_ci(k, b["n_positive"]))  # same function: exact
            few = 0 < b["n_positive"] < MIN_PER_CLASS or 0 < b["n_negative"] < MIN_PER_CLASS
            assert b["too_few_to_judge"] is few and (b["caveat"] is not None) is few
    text = format_summary(result)
    for name, b in result["by_source"].items():
        line = next(t for t in text.splitlines() if t.strip().startswith(f"source {name} "))
        assert "(" in line or b["roc_auc"] is None
        assert (b["caveat"] or "") in line


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../../../etc/passwd", "covid/../../../outside.png", ""])
def test_a_manifest_path_outside_its_source_is_refused_unopened(tiny_run, phantom_dataset, tmp_path, path):
    """N2: a received dataset whose manifest names /etc/passwd or climbs out of its source folder is refused with one
    line naming the row; the file is never opened (no bytes, no hash of it in the message)."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dataset, data)
    df = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    row = int(df.index[df["split"] == "test"][0])
    df.loc[row, "path"] = path
    df.to_csv(data / "manifest.csv", index=False)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval-*"))  # another test may have evaluated it
    with pytest.raises(DatasetError, match=f"manifest.csv row {row + 2}: image path") as err:
        evaluate.run(EvalConfig(run=str(run), data=str(data), bootstrap=0))
    message = str(err.value)
    assert "root:" not in message and "726f6f74" not in message and "sha256" not in message
    assert not (run / "eval-test").exists()  # nothing scored, nothing written
