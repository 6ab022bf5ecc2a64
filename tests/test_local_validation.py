"""Local validation: `evaluate --data LOCAL --split all` scores every image of the model's classes whatever its split,
and on a dataset the model was not trained on writes the local validation section (metrics.json, terminal, report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_cxr import DISCLAIMER
from covid_cxr.errors import ImageReadError
from covid_cxr.evaluation import evaluate, report
from covid_cxr.evaluation.local import VERDICTS, compare_with_expected
from covid_cxr.evaluation.metrics import MIN_PER_CLASS, wilson_ci
from covid_cxr.evaluation.options import EvalConfig, ReportConfig
from covid_cxr.imaging.images import sha256_file
from covid_cxr.model.checkpoint import load_model, save_checkpoint

FRESH = shutil.ignore_patterns("eval-*", "audit-*", "report.html", "model.onnx", "model.json", ".lock")
"""A run folder as training leaves it."""
LOCAL_SOURCE = "hospital-x"
UNUSED = 4
"""Training rows the local dataset marks split 'unused' (a hospital's ingest may leave rows out of every split)."""
OUTSIDE = 2
"""Rows whose target is not one of the model's classes (never scored, but counted)."""


def make_local_dataset(phantom_dataset: Path, dest: Path, edit=None) -> Path:
    """A copy of the phantom dataset as a hospital's own: one source that is not among the model's training sources,
    acquisition columns filled in, a few rows of split 'unused' and a few outside the task. ``edit(df)`` may change
    the manifest further."""
    shutil.copytree(phantom_dataset, dest)
    info = json.loads((dest / "dataset.json").read_text())
    (old,) = info["source_roots"]
    record = info["source_roots"].pop(old)
    info["source_roots"][LOCAL_SOURCE] = {**record, "path": record["absolute"]}  # the copy's relative path is wrong
    (dest / "dataset.json").write_text(json.dumps(info))
    df = pd.read_csv(dest / "manifest.csv", dtype=str, keep_default_na=False)
    i = np.arange(len(df))
    df["source"] = LOCAL_SOURCE
    df["modality"] = np.where(i % 2, "CR", "DX")
    df["manufacturer"] = np.where(i % 3 == 0, "Globex", "Acme")
    df["photometric"] = ""  # as a JPEG source leaves it: no subgroups, said so
    df.loc[df.index[df["split"] == "train"][:UNUSED], "split"] = "unused"
    df.loc[df.index[df["split"] == "test"][:OUTSIDE], ["label", "target"]] = ["pneumonia", ""]
    if edit is not None:
        df = edit(df)
    df.to_csv(dest / "manifest.csv", index=False)
    return dest


@pytest.fixture(scope="module")
def local_data(phantom_dataset, tmp_path_factory) -> Path:
    return make_local_dataset(phantom_dataset, tmp_path_factory.mktemp("hospital") / "local")


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("localrun") / "run"
    shutil.copytree(tiny_run, run, ignore=FRESH)
    return run


@pytest.fixture(scope="module")
def local_eval(run_copy, local_data):
    return evaluate.run(EvalConfig(run=str(run_copy), data=str(local_data), split="all", bootstrap=200, device="cpu"))


def test_split_all_scores_every_image_of_the_task_whatever_its_split(run_copy, local_data, local_eval):
    df = pd.read_csv(local_data / "manifest.csv", dtype=str, keep_default_na=False)
    task = df[df["target"].isin(["normal", "covid"])]
    assert (df["split"] == "unused").sum() == UNUSED and (df["target"] == "").sum() == OUTSIDE
    p = local_eval["protocol"]
    assert p["split"] == "all" and p["images"] == len(task) == len(df) - OUTSIDE
    assert p["rows_not_scored"] == OUTSIDE
    out = run_copy / "eval-all"
    assert local_eval["output_dir"] == str(out)
    for name in ("metrics.json", "predictions.csv", "reliability.png", "roc.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(preds) == len(task)
    unused = df.loc[df["split"] == "unused", "path"].map(lambda q: q.split("/")[-1])
    scored = set(preds["path"].map(lambda q: q.split("/")[-1]))
    assert set(unused) <= scored  # the 'unused' rows with a target are scored too
    assert not set(df.loc[df["target"] == "", "path"].map(lambda q: q.split("/")[-1])) & scored
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["local_validation"]["protocol"]["images"] == len(task)


def test_the_local_section_has_every_part_with_its_interval(local_eval, local_data):
    lv = local_eval["local_validation"]
    assert lv is not None and lv["disclaimer"] == DISCLAIMER and "not a diagnostic device" in lv["disclaimer"]
    p = lv["protocol"]
    assert p["dataset"] == str(local_data.resolve()) and p["sources"] == [LOCAL_SOURCE]
    assert p["training_sources"] == ["synthetic-phantoms"] and "patients (not images)" in p["confidence_intervals"]
    assert LOCAL_SOURCE in lv["why"] and "synthetic-phantoms" in lv["why"]
    assert local_eval["protocol"]["internal_split_warning"] is None  # not an internal split of the training sources
    at_model, at_local = lv["at_model_threshold"], lv["at_local_threshold"]
    assert at_model["threshold_log_odds"] == local_eval["threshold_log_odds"]
    assert at_model["roc_auc"] == local_eval["metrics"]["roc_auc"]
    assert at_model["sensitivity_ci95"] == local_eval["ci95"]["sensitivity"]
    for op in (at_model, at_local):
        for k in ("roc_auc", "sensitivity", "specificity"):
            lo, hi = op[f"{k}_ci95"]
            assert lo - 1e-9 <= op[k] <= hi + 1e-9, k
    # the local threshold reaches the model's own target here, on the images it was chosen on, and says so
    assert at_local["available"] and at_local["target_sensitivity"] == 0.95
    assert at_local["sensitivity"] >= 0.95 and "optimistic" in at_local["note"]
    assert at_local["tp"] + at_local["fn"] == p["images_per_class"]["covid"]
    # the two thresholds differ here, and their texts tell them apart, each rounding to its own threshold
    assert at_local["threshold"] != at_model["threshold"]
    assert at_local["threshold_text"] != at_model["threshold_text"]
    for op in (at_model, at_local):
        shown = op["threshold_text"].split(">= ")[1]
        assert abs(float(shown) - op["threshold"]) <= 0.5 * 10 ** -len(shown.split(".")[1]) + 1e-12
    # the local threshold is the highest reaching the target: the scores in predictions.csv give its sensitivity,
    # and leaving out the lowest-scored covid image it still catches misses the target
    scored = pd.read_csv(Path(local_eval["output_dir"]) / "predictions.csv")
    pos = scored.loc[scored["target"] == "covid", "log_odds"].to_numpy()
    caught = pos >= at_local["threshold_log_odds"]
    assert caught.mean() == pytest.approx(at_local["sensitivity"]) and caught.sum() == at_local["tp"]
    assert (pos > pos[caught].min()).mean() < 0.95
    # calibration: the one ECE, the same number evaluate reports
    assert lv["calibration"]["ece"] == local_eval["calibration"]["ece"] and lv["calibration"]["n_bins"] == 15
    # subgroups: acquisition columns with CIs and the one "too few to judge" rule
    sub = lv["subgroups"]
    assert set(sub["modality"]) == {"CR", "DX"} and set(sub["manufacturer"]) == {"Acme", "Globex"}
    assert lv["not_recorded"] == ["photometric"] and "photometric" not in sub
    assert sum(b["n"] for b in sub["manufacturer"].values()) == p["images"]
    for table in sub.values():
        for b in table.values():
            few = 0 < b["n_positive"] < MIN_PER_CLASS or 0 < b["n_negative"] < MIN_PER_CLASS
            assert b["too_few_to_judge"] is few and b["accuracy_ci95"] is not None
    # out of scope: the same flags as predictions.csv, with a Wilson interval
    s = lv["scope"]
    preds = pd.read_csv(Path(local_eval["output_dir"]) / "predictions.csv")
    assert s["out_of_scope"] == int((~preds["in_scope"]).sum()) and s["images"] == p["images"]
    assert s["share_out_of_scope_ci95"] == wilson_ci(s["out_of_scope"], s["images"])
    assert sum(b["n"] for b in sub["scope"].values()) == p["images"]
    assert lv["expected"]["available"] is False and "no out-of-source estimate" in lv["expected"]["text"]
    assert lv["recalibrated_on_these_images"] is False


def test_the_terminal_summary_shows_the_section(local_eval):
    text = evaluate.format_summary(local_eval)
    assert "LOCAL VALIDATION" in text and "at a local threshold" in text and "optimistic" in text
    assert "manufacturer Globex" in text and "modality CR" in text and "out of scope:" in text
    assert "not recorded for these images (no subgroups): photometric" in text
    assert f"{OUTSIDE} manifest rows not scored" in text
    assert text.rstrip().endswith(DISCLAIMER)
    assert "comes from the same sources as the training data" not in text


def test_no_local_section_on_the_training_data_or_a_copy_of_it(run_copy, phantom_dataset, tmp_path):
    """The training dataset itself, and a copy of it in another folder (same sources), are not local."""
    own = evaluate.run(EvalConfig(run=str(run_copy), split="val", bootstrap=0, device="cpu"))
    assert own["local_validation"] is None and own["protocol"]["internal_split_warning"]
    copy = tmp_path / "copy"
    shutil.copytree(phantom_dataset, copy)
    again = evaluate.run(EvalConfig(run=str(run_copy), data=str(copy), split="val", bootstrap=0, device="cpu"))
    assert again["local_validation"] is None
    assert "LOCAL VALIDATION" not in evaluate.format_summary(again)
    own_run = tmp_path / "run"  # its own copy: eval-all of run_copy is the local dataset's (other tests read it)
    shutil.copytree(run_copy, own_run, ignore=FRESH)
    every = evaluate.run(EvalConfig(run=str(own_run), split="all", bootstrap=0, device="cpu"))
    assert every["local_validation"] is None and every["protocol"]["images"] == 120
    assert "includes the images it learned from" in evaluate.format_summary(every)


@pytest.mark.parametrize("local, ci, verdict", [
    (0.70, [0.65, 0.74], "below"), (0.95, [0.92, 0.97], "above"), (0.82, [0.79, 0.85], "inside"),
    (0.80, [0.70, 0.88], "overlapping"), (float("nan"), None, "not measurable"), (0.74, None, "below"),
])
def test_the_local_auc_is_placed_against_the_expected_range(local, ci, verdict):
    est = {"source": "crossval", "pooled_auc": 0.81, "ci95": [0.76, 0.86], "crossval": "../cv"}
    got = compare_with_expected(local, ci, est)
    assert got["available"] and got["verdict"] == verdict and verdict in VERDICTS
    assert got["auc"] == 0.81 and got["ci95"] == [0.76, 0.86]
    words = {"below": "lies below", "above": "lies above", "inside": "lies inside", "overlapping": "overlaps",
             "not measurable": "cannot be measured"}
    assert words[verdict] in got["text"]
    none = compare_with_expected(local, ci, None)
    assert none["available"] is False and "Nothing to compare with" in none["text"]


@pytest.mark.slow  # a subprocess or a 512 px PSPNet or a full report: ~7-14 s; make test-slow runs it
def test_the_models_own_estimate_is_compared_and_the_report_shows_the_section(run_copy, local_data, local_eval,
                                                                              tmp_path):
    """A model carrying an out-of-source estimate gets the verdict in metrics.json and in report.html; the report of
    --data LOCAL --split all has the section, the research-use line and the caveats, and no 'internal' wording.

    The estimates are set around this model's local AUC and its interval (the same images, bootstrap and seed as
    local_eval, so the same interval): a little wider than the interval gives 'inside'; one that starts just below
    the AUC gives 'overlapping', which a comparison of the point AUC alone would call 'inside'."""
    auc, (lo, hi) = local_eval["metrics"]["roc_auc"], local_eval["ci95"]["roc_auc"]
    assert 0.05 < lo < auc - 0.005 and auc < hi < 0.95  # room on both sides: neither estimate is [0, 1]
    run = tmp_path / "run"
    shutil.copytree(run_copy, run, ignore=FRESH)
    model, meta = load_model(run / "best.pt")
    verdicts = {}
    for name, ci in (("overlapping", [auc - 0.005, hi + 0.05]), ("inside", [lo - 0.01, hi + 0.01])):
        assert ci[0] <= auc <= ci[1]
        save_checkpoint(run / "best.pt", model, meta.replace(estimate={"source": "crossval", "pooled_auc": auc,
                                                                       "ci95": ci, "crossval": "../cv"}))
        result = evaluate.run(EvalConfig(run=str(run), data=str(local_data), split="all", bootstrap=200,
                                         device="cpu"))
        assert result["ci95"]["roc_auc"] == pytest.approx([lo, hi], abs=1e-9)
        verdicts[name] = result["local_validation"]["expected"]
        assert verdicts[name]["ci95"] == ci and f"{ci[0]:.3f}-{ci[1]:.3f}" in verdicts[name]["text"]
    assert verdicts["overlapping"]["verdict"] == "overlapping" and "overlaps" in verdicts["overlapping"]["text"]
    lv = result["local_validation"]
    page = report.run(ReportConfig(run=str(run), data=str(local_data), split="all", audit=False,
                                   device="cpu")).read_text()  # reuses that evaluation: the same dataset
    assert lv["expected"]["verdict"] == "inside" and "lies inside" in lv["expected"]["text"]
    start = page.index("<h2>Local validation</h2>")
    part = page[start:page.index("<h2>", start + 1)]
    assert "lies inside" in part and "optimistic" in part and "by manufacturer" in part and "by modality" in part
    assert "Out of scope:" in part and "not a diagnostic device" in part and "patients (not images)" in part
    assert "Research use only" in page
    assert "On its own test split" not in page and "internal test split" not in page
    assert "comes from the same sources as the training data" not in page.lower()


def test_report_evaluates_again_when_its_evaluation_is_of_another_dataset(run_copy, local_data, local_eval, tmp_path,
                                                                          monkeypatch):
    """An eval-all/metrics.json of one hospital's dataset is not reported as another's: report runs evaluate again."""
    from covid_cxr.paths import RunDir

    calls = []

    class Evaluated(Exception):
        pass

    def fake_run(cfg):
        calls.append(cfg)
        raise Evaluated

    monkeypatch.setattr(evaluate, "run", fake_run)
    same = ReportConfig(run=str(run_copy), data=str(local_data), split="all", device="cpu")
    assert report._ensure_eval(RunDir(run_copy), same)["protocol"]["dataset"] == str(local_data.resolve())
    assert calls == []
    other = ReportConfig(run=str(run_copy), data=str(tmp_path / "other"), split="all", device="cpu")
    with pytest.raises(Evaluated):
        report._ensure_eval(RunDir(run_copy), other)
    assert [c.data for c in calls] == [str(tmp_path / "other")] and calls[0].split == "all"
    # without --data the report is of the run's own dataset: eval-all of the hospital's is not reused for it
    own = ReportConfig(run=str(run_copy), split="all", device="cpu")
    with pytest.raises(Evaluated):
        report._ensure_eval(RunDir(run_copy), own)
    assert len(calls) == 2 and calls[1].data is None and calls[1].split == "all"


def test_an_unreadable_unused_image_stops_evaluate_all(run_copy, phantom_dataset, tmp_path):
    """--split all reads the 'unused' rows too, and an unreadable one stops with its name (never skipped)."""
    src = tmp_path / "src"
    src.mkdir()
    original = Path(json.loads((phantom_dataset / "dataset.json").read_text())["source_roots"]["synthetic-phantoms"]
                    ["absolute"])
    for entry in original.iterdir():
        src.joinpath(entry.name).symlink_to(entry)
    bad = src / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")

    def corrupt_an_unused_row(df):
        row = df.index[df["split"] == "unused"][0]
        df.loc[row, ["path", "sha256"]] = ["corrupt.png", sha256_file(bad)]  # its pixels must come from the file
        return df

    data = make_local_dataset(phantom_dataset, tmp_path / "data", corrupt_an_unused_row)
    info = json.loads((data / "dataset.json").read_text())
    info["source_roots"][LOCAL_SOURCE].update(path=str(src), absolute=str(src))
    (data / "dataset.json").write_text(json.dumps(info))
    run = tmp_path / "run"
    shutil.copytree(run_copy, run, ignore=FRESH)
    with pytest.raises(ImageReadError, match="corrupt.png"):
        evaluate.run(EvalConfig(run=str(run), data=str(data), split="all", bootstrap=0, device="cpu"))
    assert not (run / "eval-all").exists()
