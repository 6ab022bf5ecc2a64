"""Out-of-source crossval on phantoms from two synthetic "hospitals": folds never see their source, every image is
predicted once, finished folds are skipped on --resume, the final model records where its estimate comes from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_cxr.data.dataset import read_dataset
from covid_cxr.data.options import DataConfig
from covid_cxr.errors import DatasetError
from covid_cxr.imaging.phantoms import generate_phantoms
from covid_cxr.model.checkpoint import read_checkpoint
from covid_cxr.training import crossval
from covid_cxr.training.options import CrossvalConfig

slow = pytest.mark.slow  # the crossval fixture trains 3 small models (~1 min on 2 cores)

OPTIONS = dict(epochs=1, image_size=32, batch_size=16, weights="none", progress=False, bootstrap=50, seed=0)


@pytest.fixture(scope="module")
def two_hospitals(tmp_path_factory) -> Path:
    from covid_cxr.data import manifest

    root = tmp_path_factory.mktemp("hospitals")
    generate_phantoms(root / "hospital-a", 24, size=64, seed=1)
    generate_phantoms(root / "hospital-b", 24, size=64, seed=2)
    out = root / "dataset"
    manifest.build(DataConfig(sources=(("folder", str(root / "hospital-a")), ("folder", str(root / "hospital-b"))),
                              out=str(out), test_per_class=6, val_fraction=0.2, train_size=200, workers=1,
                              progress=False, dedup=False))
    return out


@pytest.fixture(scope="module")
def cv_result(two_hospitals, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cv") / "cv"
    doc = crossval.run(CrossvalConfig(data=str(two_hospitals), out=str(out), final=True, **OPTIONS))
    return out, doc


@slow
def test_folds_never_see_their_source(cv_result):
    out, _ = cv_result
    for held_out in ("hospital-a", "hospital-b"):
        ds = read_dataset(out / "folds" / held_out / "dataset")
        task = ds.df[ds.df["target"] != ""]
        assert set(task.loc[task["split"] == "test", "source"]) == {held_out}
        assert held_out not in set(task.loc[task["split"].isin(("train", "val")), "source"])
        assert (task["source"] == held_out).sum() == (task["split"] == "test").sum()
        meta = read_checkpoint(out / "folds" / held_out / "run" / "best.pt").meta
        assert held_out not in meta.data.sources
        # The fold reads the images through the parent dataset's roots and cache: its paths resolve.
        assert all(Path(p).is_file() for p in ds.rows("test")["path"])


@slow
def test_every_image_is_predicted_once_by_the_model_that_never_saw_it(cv_result, two_hospitals):
    out, doc = cv_result
    pred = pd.read_csv(out / "predictions.csv")
    task = read_dataset(two_hospitals).df
    task = task[task["target"] != ""]
    assert sorted(pred["path"]) == sorted(task["path"])
    assert (pred["fold"] == pred["source"]).all()
    assert doc["complete"] and doc["missing_folds"] == []
    pooled = doc["pooled"]
    assert 0.0 <= pooled["auc"] <= 1.0 and pooled["ci95"][0] <= pooled["auc"] <= pooled["ci95"][1]
    assert pooled["n"] == len(task) == 96
    assert set(doc["per_source"]) == {"hospital-a", "hospital-b"}
    for row in doc["per_source"].values():
        assert row["n"] == 48 and row["per_class"] == {"normal": 24, "covid": 24} and row["auc"] is not None
    on_disk = json.loads((out / "crossval.json").read_text())
    assert on_disk["pooled"]["auc"] == pytest.approx(pooled["auc"])  # the same float through JSON: exact
    assert (out / "roc.png").stat().st_size > 1000 and (out / "per_source.csv").is_file()
    assert doc["synthetic_sources"] == ["hospital-a", "hospital-b"]


@slow
def test_pooled_auc_is_computed_from_log_odds_across_folds(cv_result):
    from sklearn.metrics import roc_auc_score

    out, doc = cv_result
    pred = pd.read_csv(out / "predictions.csv")
    # the same log-odds (CSV keeps float64 repr exactly), ranked by another implementation: a ratio of pair counts,
    # equal to ~1 ulp; approx's default rel=1e-6 is ~1e10 ulp
    assert doc["pooled"]["auc"] == pytest.approx(roc_auc_score(pred["target"] == "covid", pred["log_odds"]))


@slow
def test_resume_skips_finished_folds(cv_result, two_hospitals):
    out, _ = cv_result
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("folds/*/run/best.pt")}
    doc = crossval.run(CrossvalConfig(data=str(two_hospitals), out=str(out), resume=True, **OPTIONS))
    assert {p: p.stat().st_mtime_ns for p in out.glob("folds/*/run/best.pt")} == stamps
    assert doc["complete"]


@slow
def test_a_finished_crossval_is_not_overwritten_without_resume(cv_result, two_hospitals):
    out, _ = cv_result
    with pytest.raises(DatasetError, match="--resume"):
        crossval.run(CrossvalConfig(data=str(two_hospitals), out=str(out), **OPTIONS))


@slow
def test_final_model_records_its_crossval_estimate(cv_result):
    out, doc = cv_result
    meta = read_checkpoint(out / "final" / "best.pt").meta
    assert meta.estimate["source"] == "crossval"
    assert meta.estimate["pooled_auc"] == pytest.approx(doc["pooled"]["auc"])  # the same number, stored twice
    assert meta.data.test_split is False
    # Every image except the validation split trained the final model.
    ds = read_dataset(meta.training["data_absolute"])
    assert meta.data.n_train == len(ds.rows(("train", "test", "unused")))


@slow
def test_prepare_only_writes_one_train_command_per_fold(two_hospitals, tmp_path):
    doc = crossval.run(CrossvalConfig(data=str(two_hospitals), out=str(tmp_path / "cv"), prepare_only=True,
                                      **OPTIONS))
    lines = (tmp_path / "cv" / "commands.sh").read_text().splitlines()
    train_lines = [line for line in lines if line.startswith("covid-cxr train")]
    assert len(train_lines) == 2 and all("--data folds/" in line for line in train_lines)
    assert "--image-size 32" in train_lines[0]
    assert not list((tmp_path / "cv").glob("folds/*/run"))
    assert doc["pooled"] is None


@slow
def test_one_source_is_refused(tmp_path):
    from covid_cxr.data import manifest

    generate_phantoms(tmp_path / "only", 12, size=64, seed=3)
    manifest.build(DataConfig(sources=(("folder", str(tmp_path / "only")),), out=str(tmp_path / "ds"),
                              test_per_class=3, workers=1, progress=False, dedup=False))
    with pytest.raises(DatasetError, match="at least two sources"):
        crossval.run(CrossvalConfig(data=str(tmp_path / "ds"), out=str(tmp_path / "cv"), **OPTIONS))


def test_pool_and_per_source_table_on_known_predictions():
    pred = pd.DataFrame({"fold": ["a"] * 4 + ["b"] * 2, "source": ["a"] * 4 + ["b"] * 2,
                         "target": ["covid", "normal", "covid", "normal", "covid", "covid"],
                         "log_odds": [3.0, -1.0, 0.5, 1.0, 2.0, -2.0],
                         "predicted_label": ["covid", "normal", "covid", "covid", "covid", "normal"],
                         "group": [1, 2, 3, 4, 5, 6], "in_scope": [True] * 5 + [False]})
    pooled = crossval.pool(pred, "covid", 0, 0)
    # positives 3, 0.5, 2, -2 against negatives -1, 1: 5 of 8 pairs ranked right. (Ratios of small integer counts
    # here and below: exact up to 1 ulp.)
    assert pooled["auc"] == pytest.approx(5 / 8)
    assert pooled["in_scope"] == pytest.approx(5 / 6)
    table = crossval.per_source_table(pred, ["normal", "covid"], "covid")
    assert table["a"]["auc"] == pytest.approx(0.75) and table["a"]["specificity"] == 0.5
    assert table["b"]["auc"] is None and table["b"]["sensitivity"] == 0.5 and table["b"]["specificity"] is None
    assert np.isclose(table["b"]["in_scope"], 0.5)  # 1 of 2: exact


def test_small_held_out_sources_carry_intervals_a_flag_and_no_roc_curve(tmp_path):
    """A held-out source with fewer than MIN_PER_CLASS images of a class gets its numbers with CIs and 'too few to
    judge', in crossval.json's table, per_source.csv's columns and the terminal; roc.png draws no curve for it."""
    from covid_cxr.evaluation.metrics import MIN_PER_CLASS

    rng = np.random.default_rng(0)
    big = MIN_PER_CLASS + 5
    rows = []
    for fold, n_pos, n_neg in (("big", big, big), ("small", 12, 3)):
        for i in range(n_pos + n_neg):
            pos = i < n_pos
            lo = float(rng.normal(1.0 if pos else -1.0, 1.0))
            rows.append({"fold": fold, "source": fold, "target": "covid" if pos else "normal", "log_odds": lo,
                         "predicted_label": "covid" if lo > 0 else "normal", "group": f"{fold}{i}", "in_scope": True})
    pred = pd.DataFrame(rows)
    table = crossval.per_source_table(pred, ["normal", "covid"], "covid", bootstrap=100, seed=0)
    assert table["big"]["too_few_to_judge"] is False and table["big"]["caveat"] is None
    assert table["big"]["auc_ci95"][0] <= table["big"]["auc"] <= table["big"]["auc_ci95"][1]
    small = table["small"]
    assert small["too_few_to_judge"] is True and "3 normal images" in small["caveat"]
    assert small["specificity_ci95"][1] - small["specificity_ci95"][0] > 0.4  # 3 images: wide, and shown
    pooled = crossval.pool(pred, "covid", 0, 0)
    drawn = crossval.roc_png(pred, "covid", pooled, tmp_path / "roc.png", synthetic=True)
    assert drawn == {"drawn": ["big"], "too_few": ["small"]} and (tmp_path / "roc.png").stat().st_size > 1000
    doc = {"pooled": {**pooled, "ci95": None}, "per_source": table, "out": str(tmp_path)}
    text = crossval.format_summary(doc)
    assert f"too few to judge: 3 normal images (fewer than {MIN_PER_CLASS})" in text
    line = next(t for t in text.splitlines() if t.startswith("big"))
    assert f"({table['big']['auc_ci95'][0]:.2f}-{table['big']['auc_ci95'][1]:.2f})" in line


def test_a_source_name_that_climbs_out_is_refused_before_anything_is_written(two_hospitals, tmp_path):
    """Issue 18 N1: a dataset whose manifest.csv and dataset.json name a source '../../escaped' must not make
    crossval write outside --out (nor put such a path into commands.sh)."""
    import shutil

    from covid_cxr.paths import is_plain_name

    ds = tmp_path / "ds"
    shutil.copytree(two_hospitals, ds)
    for name in ("manifest.csv", "dataset.json"):
        (ds / name).write_text((ds / name).read_text().replace("hospital-a", "../../escaped"))
    out = tmp_path / "cv"
    with pytest.raises(DatasetError, match=r"source name '\.\./\.\./escaped' cannot be a fold folder name"):
        crossval.run(CrossvalConfig(data=str(ds), out=str(out), prepare_only=True, **OPTIONS))
    assert not (tmp_path / "escaped").exists() and not (out / "commands.sh").exists()
    with pytest.raises(DatasetError):
        crossval.fold_dir(out, "..")
    assert [is_plain_name(n) for n in ("cohen", "hospital-a", "a.b_c", ".", "..", "a/b", "", "x" * 129, "é")] == \
        [True, True, True, False, False, False, False, False, False]


def test_fold_counter_eta_from_the_folds_timed_so_far():
    from covid_cxr.training.crossval import eta_text

    assert eta_text([], 5) == ""  # nothing timed yet: no guess
    assert eta_text([100.0], 4) == "; 1 fold took 1 min 40 s, about 6 min 40 s left"
    assert eta_text([30.0, 50.0], 1) == "; 2 folds took 1 min 20 s, about 40 s left"
    assert eta_text([3000.0, 3600.0], 3) == "; 2 folds took 1 h 50 min, about 2 h 45 min left"


def test_a_fold_whose_training_sources_lack_a_class_is_refused_at_planning(two_hospitals, tmp_path):
    """W5: with every normal image in hospital-b, holding hospital-b out leaves no normal image to train on. That is
    said at planning, naming the fold and the fix, before any fold is written (it used to fail late, unnamed)."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(two_hospitals, ds)
    df = pd.read_csv(ds / "manifest.csv", dtype=str, keep_default_na=False)
    df.loc[(df["source"] == "hospital-a") & (df["target"] == "normal"), "target"] = ""
    df.to_csv(ds / "manifest.csv", index=False)
    out = tmp_path / "cv"
    with pytest.raises(DatasetError, match=r"fold 'hospital-b': with hospital-b held out, the other sources "
                                           r"\(hospital-a\) have no 'normal' images to train on.*--fold hospital-a"):
        crossval.run(CrossvalConfig(data=str(ds), out=str(out), prepare_only=True, **OPTIONS))
    assert not (out / "folds").exists() and not (out / "commands.sh").exists()
    assert crossval.plan_folds(read_dataset(ds), ("hospital-a",)) == ["hospital-a"]  # the fold that can train


def test_a_fold_that_takes_most_of_a_class_away_is_flagged(two_hospitals, tmp_path):
    """Issue 19: holding out a source that holds most of a class's images leaves the fold's model few of them to
    learn from (the Radiography DB holds 87 % of the shared normals). Such a fold is named with the share it
    removes; balanced sources are not flagged; crossval.json and the summary carry it."""
    import shutil

    ds_dir = tmp_path / "ds"
    shutil.copytree(two_hospitals, ds_dir)
    assert crossval.fold_losses(read_dataset(ds_dir), ["hospital-a", "hospital-b"]) == {}  # 50/50: not "most"
    df = pd.read_csv(ds_dir / "manifest.csv", dtype=str, keep_default_na=False)
    normals_a = df.index[(df["source"] == "hospital-a") & (df["target"] == "normal")]
    df.loc[normals_a[: len(normals_a) - 2], "target"] = ""  # hospital-a keeps 2 of its normal images
    df.to_csv(ds_dir / "manifest.csv", index=False)
    ds = read_dataset(ds_dir)
    n_b = int(((ds.df["source"] == "hospital-b") & (ds.df["target"] == "normal")).sum())
    flagged = crossval.fold_losses(ds, ["hospital-a", "hospital-b"])
    assert list(flagged) == ["hospital-b"]
    assert flagged["hospital-b"] == [f"fold hospital-b: holding hospital-b out removes {n_b / (n_b + 2):.0%} of the "
                                     f"'normal' images ({n_b} of {n_b + 2}); this fold's model trains on 2 'normal' "
                                     "images, so its held-out score mostly measures that shortage, not only an "
                                     "unseen hospital"]
    text = crossval.format_summary({"pooled": {"auc": 0.5, "ci95": None, "n": 4, "n_positive": 2, "patients": 4,
                                               "sensitivity_at_95_specificity": 0.0, "in_scope": 1.0,
                                               "sensitivity_at_fold_thresholds": 0.5,
                                               "specificity_at_fold_thresholds": 0.5},
                                    "per_source": {}, "fold_warnings": flagged, "out": "cv"})
    assert "WARNING: fold hospital-b: holding hospital-b out removes" in text


@slow
def test_seeds_give_a_spread_an_interval_covering_both_and_an_ensemble(two_hospitals, tmp_path):
    """crossval --seeds 2: the first seed is the crossval itself, the second lives in seeds/seed-1 with its own fold
    models; crossval.json carries each seed's pooled AUC, their SD, an interval at least as wide as the patient
    interval, and the ensemble of the seeds' log-odds; the summary says it. Two folds x two seeds of 1-epoch models."""
    out = tmp_path / "cv"
    doc = crossval.run(CrossvalConfig(data=str(two_hospitals), out=str(out), seeds=2, **OPTIONS))
    assert (out / "seeds" / "seed-1" / "folds" / "hospital-a" / "run" / "best.pt").is_file()
    seeds = doc["across_seeds"]
    second = json.loads((out / "seeds" / "seed-1" / "crossval.json").read_text())
    assert seeds["pooled_auc"] == [round(doc["pooled"]["auc"], 4), round(second["pooled"]["auc"], 4)]
    assert seeds["seeds"] == [0, 1] and seeds["seed_sd"] >= 0
    lo, hi = seeds["ci95_seeds_and_patients"]
    p_lo, p_hi = doc["pooled"]["ci95"]
    assert lo <= seeds["mean"] <= hi and hi - lo >= (p_hi - p_lo) * 0.5  # covers at least the mean patient variance
    assert 0.0 <= seeds["ensemble"]["auc"] <= 1.0
    rec = seeds["fold_recalibrated"]  # the same spread for the per-fold recalibrated pool
    assert rec["auc"] == [round(doc["estimators"]["pooled_fold_recalibrated"], 4),
                          round(second["estimators"]["pooled_fold_recalibrated"], 4)]
    assert rec["ci95_seeds_and_patients"][0] <= rec["mean"] <= rec["ci95_seeds_and_patients"][1]
    on_disk = json.loads((out / "crossval.json").read_text())
    assert on_disk["across_seeds"] == seeds and on_disk["estimators"]["headline"] == "pooled"
    assert "2 seeds: pooled AUC" in crossval.format_summary(doc)


def test_per_fold_recalibration_removes_a_scale_shift_between_fold_models() -> None:
    """Two fold models that rank their own held-out images perfectly, but one scores everything 6 log-odds higher
    (and chose its validation threshold 6 higher): pooling their raw scores mixes the scales and costs AUC; moving
    each fold's own threshold to 0 (no held-out label used) restores the ranking, and leaves decisions unchanged."""
    from sklearn.metrics import roc_auc_score

    from covid_cxr.training.crossval import estimators, fold_recalibrated

    rng = np.random.default_rng(0)
    rows = []
    for fold, shift in (("a", 0.0), ("b", 6.0)):
        for target, centre in (("covid", 1.5), ("normal", -1.5)):
            for v in centre + rng.uniform(-1, 1, 40):
                rows.append({"fold": fold, "target": target, "log_odds": v + shift})
    pred = pd.DataFrame(rows)
    thresholds = {"a": 1 / (1 + np.exp(-0.0)), "b": 1 / (1 + np.exp(-6.0))}
    results = {f: {"threshold": t} for f, t in thresholds.items()}
    y = (pred["target"] == "covid").to_numpy()
    raw = roc_auc_score(y, pred["log_odds"])
    aligned = fold_recalibrated(pred, results)
    assert raw < 0.85 and roc_auc_score(y, aligned["log_odds"]) == 1.0
    for f, t in thresholds.items():  # the same decisions at each fold's threshold
        g, h = pred[pred["fold"] == f], aligned[aligned["fold"] == f]
        assert ((g["log_odds"] >= np.log(t / (1 - t))) == (h["log_odds"] >= 0)).all()
    est = estimators({"auc": raw}, {}, {"auc": 1.0, "ci95": [1.0, 1.0]})
    assert est["pooled_fold_recalibrated"] == 1.0 and est["headline"] == "pooled"
