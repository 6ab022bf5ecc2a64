"""calibrate: temperature and threshold refitted on a hospital's own images into a NEW run folder; the run given is
never changed, the new checkpoint records what was done, stale derived files are not carried over, and too little,
mismatched or training data is refused; evaluating the new run warns of optimism on the images it was refitted on,
and only on those."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_local_validation import FRESH, make_local_dataset

from covid_cxr import load_run
from covid_cxr.cli import main
from covid_cxr.data.dataset import read_dataset
from covid_cxr.errors import CalibrationError, DatasetError, RunError
from covid_cxr.evaluation import evaluate, recalibrate
from covid_cxr.evaluation.calibration import expected_calibration_error
from covid_cxr.evaluation.local import RECALIBRATED_NOTE, recalibrated_on
from covid_cxr.evaluation.metrics import MIN_PER_CLASS
from covid_cxr.evaluation.options import CalibrateConfig, EvalConfig
from covid_cxr.model.checkpoint import load_model, read_checkpoint, save_checkpoint
from covid_cxr.paths import RunDir

STALE = ("model.onnx", "model.json", "report.html")
"""Files export and report write from a run's weights and meta (here stand-ins): stale after a recalibration."""


@pytest.fixture(scope="module")
def local_data(phantom_dataset, tmp_path_factory) -> Path:
    return make_local_dataset(phantom_dataset, tmp_path_factory.mktemp("hospital") / "local")


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """tiny_run as training left it, plus stand-ins for the files made from its weights and meta."""
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run, run, ignore=FRESH)
    for name in STALE:
        (run / name).write_bytes(b"made from the old temperature and threshold")
    (run / "eval-test").mkdir()
    (run / "eval-test" / "metrics.json").write_text("{}")
    return run


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def local_pixels(data: Path, spec) -> tuple[np.ndarray, np.ndarray]:
    ds = read_dataset(data)
    rows = ds.rows(tuple(sorted(set(ds.df["split"]))))
    return ds.pixels(rows, spec, workers=1), ds.targets(rows)


def test_calibrate_writes_a_new_run_and_never_touches_the_old_one(run_copy, local_data, phantom_dataset, tmp_path,
                                                                  capsys):
    before = snapshot(run_copy)
    new = tmp_path / "runs" / "tiny-local"
    assert main(["calibrate", "--run", str(run_copy), "--data", str(local_data), "--out", str(new),
                 "--device", "cpu", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert snapshot(run_copy) == before  # byte for byte, nothing added
    old_meta = read_checkpoint(run_copy / "best.pt").meta
    ckpt = read_checkpoint(new / "best.pt")  # the one reader: checksum verified
    rec = ckpt.meta.recalibration
    # the Python API loads the new temperature and threshold
    model = load_run(new, device="cpu")
    assert model.meta.temperature == rec["new"]["temperature"] == ckpt.meta.calibration.temperature
    assert model.meta.threshold_log_odds == rec["new"]["threshold_log_odds"]
    assert rec["old"]["temperature"] == old_meta.temperature
    assert rec["old"]["threshold_log_odds"] == old_meta.threshold_log_odds
    assert model.meta.temperature != old_meta.temperature  # fitted on other images: here 20 (a bound) -> ~5
    # what was done, recorded in the meta
    n_task = sum(rec["images_per_class"].values())
    assert rec["dataset"] == str(local_data.resolve()) and rec["split"] == "all" and rec["images"] == n_task
    assert rec["patients"] > 0 and rec["date"] and "optimistic" in rec["note"] and rec["previous"] is None
    assert rec["from_run"] == str(run_copy.resolve()) and rec["from_sha256"] == before["best.pt"]
    assert rec["new"]["sensitivity"] >= 0.95  # the model's own target, met on the images it was fitted on
    # the same weights (gate included)
    old_state = read_checkpoint(run_copy / "best.pt").state_dict
    assert ckpt.state_dict.keys() == old_state.keys()
    assert all(torch.equal(ckpt.state_dict[k], old_state[k]) for k in old_state)
    # predictions of the new run apply the new temperature and threshold to the same logits
    paths = sorted((Path(json.loads((local_data / "dataset.json").read_text())["source_roots"]["hospital-x"]
                         ["absolute"]) / "covid").glob("*.png"))[:6]
    got, was = model.predict(paths), load_run(run_copy, device="cpu").predict(paths)
    for g, w in zip(got, was):
        assert g.threshold == model.meta.threshold
        assert g.label == ("covid" if g.log_odds >= model.meta.threshold_log_odds else "normal")
        assert g.log_odds * model.meta.temperature == pytest.approx(w.log_odds * old_meta.temperature, abs=1e-4)
    # stale files are left out and named, with the command that makes them again
    for name in (*STALE, "last.pt", "eval-test"):
        assert not (new / name).exists(), name
        assert name in printed, name
    assert "covid-cxr export --run" in printed and " -> " in printed and "not a diagnostic device" in printed
    written = {p.name for p in new.iterdir()}
    assert {"best.pt", "config.yaml", "calibration.json", recalibrate.RECALIBRATION_PNG} <= written
    cal = json.loads((new / "calibration.json").read_text())
    assert cal["threshold_log_odds"] == model.meta.threshold_log_odds and cal["recalibration"] == rec
    assert RunDir(new).dataset().root.resolve() == phantom_dataset.resolve()  # config.yaml re-pointed
    assert not list(new.parent.glob(".*tmp*"))


def test_evaluating_the_recalibrated_run_on_the_same_images_says_it_is_optimistic(run_copy, local_data, tmp_path):
    new = tmp_path / "new"
    recalibrate.run(CalibrateConfig(run=str(run_copy), data=str(local_data), out=str(new), device="cpu", workers=1))
    result = evaluate.run(EvalConfig(run=str(new), data=str(local_data), split="all", bootstrap=0, device="cpu"))
    lv = result["local_validation"]
    assert lv["recalibrated_on_these_images"] is True
    assert any("refitted on these same images" in w for w in lv["warnings"])
    assert "refitted on these same images" in evaluate.format_summary(result)


def test_a_miscalibrated_model_gets_a_temperature_that_lowers_its_ece(run_copy, local_data, tmp_path):
    """Logits scaled up (x2, temperature 1) are over-confident; the refitted temperature undoes it, and the ECE on
    the images it was fitted on, measured here independently through load_run, falls."""
    model, meta = load_model(run_copy / "best.pt")
    with torch.no_grad():
        model.head.weight.mul_(2.0)
        model.head.bias.mul_(2.0)
    save_checkpoint(run_copy / "best.pt", model, meta.replace(temperature=1.0))
    new = tmp_path / "new"
    result = recalibrate.run(CalibrateConfig(run=str(run_copy), data=str(local_data), out=str(new), device="cpu",
                                             workers=1))
    old, fitted = load_run(run_copy, device="cpu"), load_run(new, device="cpu")
    assert old.meta.temperature == 1.0 and fitted.meta.temperature > 2.0
    assert result["status"] == "fitted"
    pixels, targets = local_pixels(local_data, old.meta.preprocess)
    logits = old.outputs(pixels).logits
    ece = {name: expected_calibration_error(np.exp(p.meta.log_probs(logits)), targets)["ece"]
           for name, p in (("old", old), ("new", fitted))}
    assert ece["new"] < ece["old"] - 0.05, ece
    assert result["recalibration"]["old"]["ece"] == pytest.approx(ece["old"], abs=1e-6)
    assert result["recalibration"]["new"]["ece"] == pytest.approx(ece["new"], abs=1e-6)


def test_too_few_images_of_a_class_are_refused(run_copy, phantom_dataset, tmp_path):
    def few_covid(df):
        covid = df.index[df["target"] == "covid"]
        df.loc[covid[MIN_PER_CLASS - 1:], ["label", "target"]] = ["other", ""]  # MIN_PER_CLASS - 1 covid images left
        return df

    data = make_local_dataset(phantom_dataset, tmp_path / "few", few_covid)
    new = tmp_path / "new"
    with pytest.raises(CalibrationError, match=rf"{MIN_PER_CLASS - 1} covid image\(s\), fewer than {MIN_PER_CLASS}"):
        recalibrate.run(CalibrateConfig(run=str(run_copy), data=str(data), out=str(new), device="cpu", workers=1))
    assert not new.exists() and not list(tmp_path.glob(".new*"))


def test_other_classes_are_refused(run_copy, phantom_dataset, tmp_path):
    def rest(df):
        df.loc[df["target"] == "normal", "target"] = "rest"
        return df

    data = make_local_dataset(phantom_dataset, tmp_path / "rest", rest)
    info = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**info, "labels": ["rest", "covid"], "task": "covid-vs-rest"}))
    with pytest.raises(DatasetError, match="labels"):
        recalibrate.run(CalibrateConfig(run=str(run_copy), data=str(data), out=str(tmp_path / "new"), device="cpu"))
    assert not (tmp_path / "new").exists()


def test_the_new_folder_must_be_new_and_outside_the_run(run_copy, local_data, tmp_path, capsys):
    before = snapshot(run_copy)
    for out, match in ((run_copy / "local", "inside the run folder"), (run_copy, "inside the run folder"),
                       (tmp_path, "already exists")):
        with pytest.raises(RunError, match=match):
            recalibrate.run(CalibrateConfig(run=str(run_copy), data=str(local_data), out=str(out), device="cpu"))
    assert snapshot(run_copy) == before
    assert main(["calibrate", "--run", str(run_copy), "--data", str(local_data), "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_the_training_data_is_refused(run_copy, phantom_dataset, tmp_path, capsys):
    """The run's own dataset (any split), and a copy of it in another folder (its sources are the training sources),
    are not a hospital's images: a refit there would pass for a local one."""
    copy = tmp_path / "copy"
    shutil.copytree(phantom_dataset, copy)
    for data, split, why in ((phantom_dataset, "all", "the dataset the model was trained on"),
                             (phantom_dataset, "test", "the dataset the model was trained on"),
                             (copy, "val", "synthetic-phantoms of this dataset are among the model's training "
                                           "sources")):
        new = tmp_path / f"new-{split}"
        with pytest.raises(CalibrationError, match="refusing to calibrate") as caught:
            recalibrate.run(CalibrateConfig(run=str(run_copy), data=str(data), split=split, out=str(new),
                                            device="cpu", workers=1))
        assert why in str(caught.value) and "--allow-training-data" in str(caught.value)
        assert not new.exists()
    assert main(["calibrate", "--run", str(run_copy), "--data", str(phantom_dataset), "--out", str(tmp_path / "cli"),
                 "--device", "cpu", "--workers", "1"]) == 2
    assert "refusing to calibrate" in capsys.readouterr().err and not (tmp_path / "cli").exists()


def test_allow_training_data_refits_on_them_and_says_so(run_copy, phantom_dataset, tmp_path):
    new = tmp_path / "new"
    result = recalibrate.run(CalibrateConfig(run=str(run_copy), data=str(phantom_dataset), split="test", out=str(new),
                                             device="cpu", workers=1, allow_training_data=True))
    rec = result["recalibration"]
    assert rec["local"] is False and "the dataset the model was trained on" in rec["why"]


def test_calibrating_on_val_then_evaluating_test_gives_no_false_warning(run_copy, phantom_dataset, tmp_path):
    """The honest flow: refit on one part of the hospital's images, measure on another. Only the images refitted on
    make the numbers optimistic: none of the test split, some of 'all'."""

    def bigger_val(df):  # the hospital set most of its patients aside for calibration
        df.loc[df["split"] == "train", "split"] = "val"
        return df

    local_data = make_local_dataset(phantom_dataset, tmp_path / "local", bigger_val)
    new = tmp_path / "new"
    result = recalibrate.run(CalibrateConfig(run=str(run_copy), data=str(local_data), split="val", out=str(new),
                                             device="cpu", workers=1))
    rec = result["recalibration"]
    assert rec["split"] == "val" and rec["local"] is True and len(rec["image_fingerprints"]) == rec["images"]
    test = evaluate.run(EvalConfig(run=str(new), data=str(local_data), split="test", bootstrap=0, device="cpu"))
    lv = test["local_validation"]
    assert lv["recalibrated_on_these_images"] is False
    assert not [w for w in lv["warnings"] if "refitted on" in w] and lv["warnings"]  # the synthetic-data one remains
    assert "refitted on" not in evaluate.format_summary(test)
    every = evaluate.run(EvalConfig(run=str(new), data=str(local_data), split="all", bootstrap=0, device="cpu"))
    lv = every["local_validation"]
    assert lv["recalibrated_on_these_images"] is True
    (warning,) = [w for w in lv["warnings"] if "refitted on" in w]
    assert warning.startswith(f"{rec['images']} of these {every['protocol']['images']} images are among those")


def test_a_record_without_fingerprints_compares_dataset_and_split():
    """A checkpoint recalibrated before fingerprints were recorded: the same folder and split (or 'all' on either
    side) counts as the same images, another split or folder does not."""
    import pandas as pd

    rows = pd.DataFrame({"sha256": ["a" * 64, "b" * 64]})
    where = {"dataset": "/data/local"}
    for rec_split, split, expected in (("val", "val", None), ("val", "test", 0), ("all", "test", None),
                                       ("val", "all", None), ("test", "val", 0)):
        assert recalibrated_on({"dataset": "/data/local", "split": rec_split}, where, split, rows) == expected
    assert recalibrated_on({"dataset": "/data/other", "split": "all"}, where, "all", rows) == 0
    assert recalibrated_on(None, where, "all", rows) == 0
    with_prints = {"dataset": "/elsewhere", "split": "all", "image_fingerprints": ["a" * 16]}
    assert recalibrated_on(with_prints, where, "test", rows) == 1  # a copy in another folder is caught
    assert RECALIBRATED_NOTE.startswith("the model's temperature and threshold were refitted")
