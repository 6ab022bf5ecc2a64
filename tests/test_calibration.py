"""Temperature scaling, ECE, reliability diagrams and the validation-chosen operating threshold."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from covid_cxr.errors import CovidCxrError
from covid_cxr.evaluation.calibration import (T_MAX, T_MIN, CalibrationError, calibrate, choose_threshold,
                                              expected_calibration_error, fit_temperature, nll, reliability_diagram_png)
from covid_cxr.evaluation.metrics import rates
from covid_cxr.imaging.pixels import PreprocessSpec
from covid_cxr.model.meta import ModelMeta, class_log_odds, log_probs, probabilities

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def binary_metrics(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Rates of the calls ``score >= threshold`` (the decision rule of ``ModelMeta.decide``)."""
    return rates(np.asarray(y) == 1, np.asarray(scores) >= threshold)


def calibrated_logits(n: int, k: int, seed: int, scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): the logits are calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, (n, k))
    y = (rng.random(n)[:, None] > np.cumsum(softmax(z), 1)).sum(1)
    return z, np.minimum(y, k - 1)


# ----------------------------------------------------------------------------- temperature

@pytest.mark.parametrize("k", [2, 3, 5])
def test_temperature_recovers_overconfidence(k):
    z, y = calibrated_logits(20000, k, seed=k)
    t = fit_temperature(4.0 * z, y)
    # Statistical, on data that are the same on every CPU (seeded PCG64; np.exp's last-bit differences between SIMD
    # builds change T by ~1e-13): the MLE's spread over seeds at n = 20000 is 0.035-0.053; these seeds are off by
    # 0.019-0.059; 0.25 is > 4.7 sd. A wrong slope or bracket gives T off by O(1).
    assert abs(t - 4.0) < 0.25, t


@pytest.mark.parametrize("k", [2, 4])
def test_temperature_near_one_on_calibrated_logits(k):
    z, y = calibrated_logits(20000, k, seed=10 + k)
    # as above: seed-to-seed sd 0.009-0.015 at n = 20000, these seeds 0.0035-0.0048 off; 0.06 is > 4 sd
    assert abs(fit_temperature(z, y) - 1.0) < 0.06


def test_temperature_lowers_heldout_nll():
    z, y = calibrated_logits(6000, 3, seed=1)
    over = 4.0 * z
    t = fit_temperature(over[:3000], y[:3000])  # fitted on "validation"
    before, after = nll(over[3000:], y[3000:]), nll(over[3000:], y[3000:], t)  # judged on held-out data
    assert after < before - 0.2, (before, after)  # 1.251 -> 0.693: over-confidence costs 0.56 nats here
    # back to the calibrated logits' NLL: T's estimation error (~0.1 at n = 3000) costs O(0.1^2 / 16) ~ 1e-3 nats;
    # 0.0006 here
    assert after == pytest.approx(nll(z[3000:], y[3000:]), abs=0.02)


def test_temperature_is_the_nll_minimum():
    z, y = calibrated_logits(500, 3, seed=2)
    z = 2.5 * z + np.random.default_rng(3).normal(0, 1, z.shape)
    t = fit_temperature(z, y)
    grid = np.exp(np.linspace(math.log(T_MIN), math.log(T_MAX), 4001))
    best = min(nll(z, y, g) for g in grid)
    assert nll(z, y, t) <= best + 1e-9  # float64 NLL of 500 terms ~1: rounding ~1e-14; bisection converged to 1e-15
    assert nll(z, y, t) < nll(z, y, t * 1.05) and nll(z, y, t) < nll(z, y, t / 1.05)


def test_temperature_clamped_on_degenerate_data():
    y = np.array([0, 1, 0, 1, 1, 0])
    separable = np.stack([1.0 - y, y.astype(float)], 1) * 3.0  # every sample ranked right
    assert fit_temperature(separable, y) == T_MIN
    assert fit_temperature(-separable, y) == T_MAX  # every sample ranked wrong: flatten fully
    assert fit_temperature(np.zeros((6, 2)), y) == 1.0  # T has no effect
    assert math.isfinite(nll(separable, y, T_MIN))


def test_nll_matches_torch_and_meta_probabilities():
    z, y = calibrated_logits(200, 3, seed=4)
    zt, yt = torch.tensor(z), torch.tensor(y)
    for t in (0.5, 1.0, 3.0):
        ref = torch.nn.functional.cross_entropy(zt / t, yt).item()
        # float64 both ways, other exp/log implementations (<= a few ulp) and summation orders over 200 rows:
        # ~1e-15 relative; rel 1e-9 leaves 1e5x, and a float32 path (~1e-7) would fail it
        assert nll(z, y, t) == pytest.approx(ref, rel=1e-9)
        via_meta = -np.log(probabilities(z, t)[np.arange(len(y)), y]).mean()
        assert nll(zt, yt, t) == pytest.approx(via_meta, rel=1e-9)  # tensors accepted too
        # the same float64 log_probs, mean of 200 terms: <= 200 x 1.1e-16 = 2e-14 relative in any order
        assert nll(z, y, t) == pytest.approx(-log_probs(z, t)[np.arange(len(y)), y].mean(), rel=1e-12)


def test_temperature_input_errors():
    with pytest.raises(CalibrationError, match=r"shape \(N, K\)"):
        fit_temperature(np.zeros(5), np.zeros(5))
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        fit_temperature(np.array([[0.0, -np.inf], [1.0, 0.0]]), np.array([0, 1]))
    with pytest.raises(CalibrationError, match="class indices"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(CalibrationError, match=r"shape \(3,\)"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(CalibrationError, match="positive number"):
        nll(np.zeros((2, 2)), np.array([0, 1]), 0.0)


# ----------------------------------------------------------------------------- ECE

def test_ece_small_when_calibrated_large_when_overconfident():
    z, y = calibrated_logits(30000, 3, seed=5)
    good = expected_calibration_error(softmax(z), y)
    bad = expected_calibration_error(softmax(4.0 * z), y)
    # Calibrated by construction, so ECE is sampling noise: ~sum_b (n_b / N) sqrt(2 / pi) sqrt(p(1 - p) / n_b) with
    # N = 30000 over 15 bins: 0.0063 +- 0.0011 over seeds, 0.0052 for this one; 0.015 is 8 sd above the mean.
    # Seeded data: the same value on every CPU to ~1e-15.
    assert good["ece"] < 0.015, good["ece"]
    assert bad["ece"] > 0.10, bad["ece"]  # 0.22: logits 4x too confident
    fixed = expected_calibration_error(softmax(4.0 * z / fit_temperature(4.0 * z, y)), y)
    assert fixed["ece"] < 0.02  # 0.005: noise as for `good`, plus T's own error (~1% of 4)


def test_ece_binary_also_reports_positive_class_reliability():
    rng = np.random.default_rng(6)
    p1 = rng.random(30000)
    y = (rng.random(30000) < p1).astype(int)
    probs = np.stack([1 - p1, p1], 1)
    def gap(bins):  # what a second 'ECE' on P(class 1) would be; covid-cxr reports only the top-label one
        return sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / 30000

    res = expected_calibration_error(probs, y, n_bins=10)
    # noise only, as above: over seeds the ECE is 0.0036 +- 0.0013 and the P(class 1) gap 0.0061 +- 0.0016 (0.0064
    # and 0.0066 for this seed): 0.015 is >= 5.5 sd away
    assert set(res["positive"]) == {"bins"} and gap(res["positive"]["bins"]) < 0.015 and res["ece"] < 0.015
    squashed = expected_calibration_error(np.stack([1 - p1 ** 3, p1 ** 3], 1), y, n_bins=10)
    # E|p - p^3| = 1/4 for p uniform: the gap is 0.249 and the top-label ECE 0.185 (sd 0.002 over seeds)
    assert gap(squashed["positive"]["bins"]) > 0.1 and squashed["ece"] > 0.05
    assert "positive" not in expected_calibration_error(np.full((3, 3), 1 / 3), np.array([0, 1, 2]))


def test_ece_hand_computed_and_bin_table():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    res = expected_calibration_error(probs, y, n_bins=5)
    # top-label confidences 0.9, 0.8, 0.7, 0.6; correct 1, 0, 1, 1; bins (0.4,0.6], (0.6,0.8], (0.8,1]
    assert res["ece"] == pytest.approx(0.25 * 0.4 + 0.5 * 0.25 + 0.25 * 0.1)  # float64 of 4 numbers: ~1e-16
    bins = res["bins"]
    assert [b["count"] for b in bins] == [0, 0, 1, 2, 1]
    assert [b["lo"] for b in bins] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8]) and bins[-1]["hi"] == 1.0
    assert bins[3]["confidence"] == pytest.approx(0.75) and bins[3]["accuracy"] == 0.5
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None
    json.dumps(res, allow_nan=False)  # reports can store it as strict JSON


def test_ece_counts_and_confidence_inside_bins():
    z, y = calibrated_logits(2000, 4, seed=7)
    res = expected_calibration_error(softmax(3 * z), y, n_bins=12)
    assert sum(b["count"] for b in res["bins"]) == 2000
    for b in res["bins"]:
        if b["count"]:
            # a float64 mean of <= 2000 values inside [lo, hi] may round past an edge by <= 2000 x 1.1e-16 = 2e-13
            assert b["lo"] - 1e-12 <= b["confidence"] <= b["hi"] + 1e-12


def test_ece_input_errors():
    with pytest.raises(CalibrationError, match="sum to 1"):
        expected_calibration_error(np.array([[0.5, 0.6]]), np.array([0]))
    with pytest.raises(CalibrationError, match="not logits"):
        expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(CalibrationError, match="n_bins"):
        expected_calibration_error(np.array([[0.5, 0.5]]), np.array([0]), n_bins=0)


# ----------------------------------------------------------------------------- threshold

def random_dataset(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Small to medium binary datasets with many tied scores (coarse rounding)."""
    n = int(rng.integers(2, 120))
    y = rng.integers(0, 2, n)
    if y.min() == y.max():  # both classes present
        y[:2] = [0, 1]
    raw = rng.random(n) * 0.6 + 0.4 * y * rng.random()
    decimals = int(rng.integers(0, 3))
    return np.round(raw, decimals), y


def exact_rates(scores, y, t) -> tuple[int, int]:
    return int(((scores >= t) & (y == 1)).sum()), int(((scores < t) & (y == 0)).sum())


def test_threshold_meets_target_and_is_highest_over_random_datasets():
    rng = np.random.default_rng(2024)
    for _ in range(800):
        scores, y = random_dataset(rng)
        target = float(rng.choice([0.5, 0.8, 0.9, 0.95, 0.99, 1.0, rng.random() * 0.999 + 0.001]))
        res = choose_threshold(scores, y, "sensitivity", target)
        t = res["threshold"]
        m = binary_metrics(y, scores, t)
        assert m["sensitivity"] >= target, (scores, y, target, res)
        assert res["sensitivity"] == m["sensitivity"] and res["specificity"] == m["specificity"]
        assert t in scores  # a real score, so ties fall on one side together
        higher = np.nextafter(t, np.inf)
        assert binary_metrics(y, scores, higher)["sensitivity"] < target, (scores, y, target, res)
        assert (res["n_positive"], res["n_negative"]) == (int(y.sum()), int((1 - y).sum()))


def test_youden_matches_brute_force_over_random_datasets():
    rng = np.random.default_rng(7)
    for _ in range(800):
        scores, y = random_dataset(rng)
        res = choose_threshold(scores, y, "youden")
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        cands = sorted(set(scores.tolist()) | {math.inf})
        j = {t: exact_rates(scores, y, t)[0] * n_neg + exact_rates(scores, y, t)[1] * n_pos for t in cands}
        best = max(j.values())
        assert j[res["threshold"]] == best, (scores, y, res)
        assert res["threshold"] == max(t for t in cands if j[t] == best and t != math.inf)  # highest among ties
        m = binary_metrics(y, scores, res["threshold"])
        # ratios of the same integer counts: equal to ~1 ulp
        assert res["sensitivity"] + res["specificity"] == pytest.approx(m["sensitivity"] + m["specificity"])
        assert res["target_sensitivity"] is None and res["rule"] == "youden"


def test_threshold_hand_computed():
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.3])
    y = np.array([1, 1, 0, 1, 0])
    res = choose_threshold(scores, y, target_sensitivity=0.6)
    # 2/3 is a ratio of counts: equal to 1 ulp
    assert res == {"threshold": 0.8, "rule": "sensitivity", "target_sensitivity": 0.6,
                   "sensitivity": pytest.approx(2 / 3), "specificity": 0.5, "n_positive": 3, "n_negative": 2}
    assert choose_threshold(scores, y, target_sensitivity=1.0)["threshold"] == 0.7
    assert choose_threshold(scores, y, target_sensitivity=0.3)["threshold"] == 0.9
    assert choose_threshold(scores, y, "youden")["threshold"] == 0.7  # J = 1 + 1/2 - 1


@pytest.mark.parametrize("n_pos,target,k", [(20, 0.95, 19), (100, 0.55, 55), (100, 0.07, 7)])
def test_threshold_exact_float_target(n_pos, target, k):
    # k / n_pos >= target exactly as the metrics compute it, although ceil(target * n_pos) is k + 1 for
    # 0.55 * 100 and 0.07 * 100: the threshold must not demand one positive more than needed.
    y = np.r_[np.ones(n_pos, int), np.zeros(5, int)]
    pos = np.linspace(0.5, 0.99, n_pos)
    res = choose_threshold(np.r_[pos, np.full(5, 0.2)], y, target_sensitivity=target)
    assert res["sensitivity"] == k / n_pos >= target
    assert res["threshold"] == pos[n_pos - k]


@pytest.mark.parametrize("scores,y,kwargs,match", [
    ([0.1, 0.2, 0.3], [0, 0, 0], {}, "0 positive and 3 negative"),
    ([0.1, 0.2], [1, 1], {}, "2 positive and 0 negative"),
    ([0.1, 0.2], [1, 1], {"rule": "youden"}, "both classes"),
    ([0.1, 0.2], [0, 1], {"rule": "f1"}, "rule must be one of"),
    ([0.1, 0.2], [0, 1], {"target_sensitivity": 0.0}, r"target_sensitivity must be in \(0, 1\]"),
    ([0.1, 0.2], [0, 1], {"target_sensitivity": 1.5}, r"target_sensitivity must be in \(0, 1\]"),
    ([0.1, np.nan], [0, 1], {}, "NaN"),
    ([0.1, 0.2, 0.3], [0, 1], {}, "shape"),
    ([0.1, 0.2], [0, 2], {}, "class indices 0..1"),
    ([], [], {}, "non-empty"),
])
def test_threshold_errors(scores, y, kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        choose_threshold(np.array(scores, dtype=float), np.array(y), **kwargs)
    assert isinstance(err.value, CovidCxrError)  # the CLI reports it without a traceback


# ----------------------------------------------------------------------------- calibrate (temperature + operating point)

def _meta(labels=("normal", "covid"), positive="covid", **kw) -> ModelMeta:
    return ModelMeta(arch="densenet121", labels=labels, positive=positive, preprocess=PreprocessSpec(size=32), **kw)


def test_calibrate_perfectly_separated_validation_keeps_temperature_one():
    """Separated validation logits drive the fitted T to its lower bound; applying it would saturate every
    probability, so T = 1 is kept, the status says so and a warning explains it."""
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    z = np.stack([1.0 - y, y.astype(float)], 1) * 3.0 + np.linspace(0, 0.5, 8)[:, None]
    cal, threshold_lo, plot = calibrate(z, y, positive=1)
    assert cal.status == "at lower bound"
    assert cal.temperature == 1.0 and cal.fitted_temperature == T_MIN
    assert len(cal.warnings) == 2 and "lower bound" in cal.warnings[0] and "NOT calibrated" in cal.warnings[0]
    assert "separates the classes" in cal.warnings[1] and "95 % sensitivity target cannot be checked" in cal.warnings[1]
    assert cal.nll_after == cal.nll_before and cal.n_val == 8
    scores = class_log_odds(log_probs(z, 1.0), 1)
    assert threshold_lo == pytest.approx((scores[y == 0].max() + scores[y == 1].min()) / 2)  # between the classes
    np.testing.assert_array_equal(plot["probs_after"], plot["probs_before"])
    meta = _meta(temperature=cal.temperature, threshold_log_odds=threshold_lo, calibration=cal)
    assert (meta.decide(meta.log_probs(z)) == y).all()  # the operating point still separates validation
    assert cal.val_sensitivity == 1.0 and cal.val_specificity == 1.0


def test_separated_validation_puts_the_threshold_between_the_classes_for_both_rules():
    """On separated validation either rule alone would sit on the edge of the positive cluster (the demo's '95 %
    sensitivity' became 68 % on test); the threshold goes midway, and a fitted temperature does not change that."""
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    z = np.stack([np.zeros(80), np.r_[rng.normal(-2, 1, 40).clip(max=-0.5), rng.normal(2, 1, 40).clip(min=0.5)]], 1)
    for rule in ("sensitivity", "youden"):
        cal, threshold_lo, _ = calibrate(z, y, positive=1, rule=rule, target_sensitivity=0.95)
        scores = class_log_odds(log_probs(z, cal.temperature), 1)
        lo, hi = scores[y == 0].max(), scores[y == 1].min()
        # the library's midpoint of the same float64 scores: equal to ~1 ulp
        assert threshold_lo == pytest.approx((lo + hi) / 2) and lo < threshold_lo < hi
        assert cal.val_sensitivity == cal.val_specificity == 1.0
        assert any("separates the classes" in w for w in cal.warnings)
    z_overlap = z.copy()
    z_overlap[0, 1] = 3.0  # one normal above every covid: not separated, the rule's own threshold
    cal, threshold_lo, _ = calibrate(z_overlap, y, positive=1, target_sensitivity=0.95)
    assert not any("separates the classes" in w for w in cal.warnings)
    scores = class_log_odds(log_probs(z_overlap, cal.temperature), 1)
    # calibrate puts the threshold 1e-6 x max(1, |t|) below the chosen score, and t = 1.14 here (T = 0.44)
    assert threshold_lo < choose_threshold(scores, y, "sensitivity", 0.95)["threshold"] < threshold_lo + 1e-5


def test_calibrate_fits_temperature_and_a_log_odds_threshold():
    z, y = calibrated_logits(3000, 2, seed=9)
    over = 4.0 * z
    cal, threshold_lo, plot = calibrate(over, y, positive=1, rule="sensitivity", target_sensitivity=0.9)
    assert cal.status == "fitted" and cal.warnings == ()
    # statistical, on seeded data (the same T on every CPU to ~1e-13): T's seed-to-seed sd at n = 3000 is 0.11 and
    # this seed gives 4.156; 0.3 is 2.7 sd, and a T that is not fitted at all would be 1
    assert cal.temperature == cal.fitted_temperature and abs(cal.temperature - 4.0) < 0.3
    assert cal.nll_after < cal.nll_before and cal.ece_after < cal.ece_before
    assert cal.threshold_rule == "sensitivity" and cal.target_sensitivity == 0.9
    assert plot["probs_after"].shape == plot["probs_before"].shape == (3000, 2)
    scores = class_log_odds(log_probs(over, cal.temperature), 1)
    chosen = choose_threshold(scores, y, "sensitivity", 0.9)
    # a hair below the chosen score: 1e-6 x max(1, |t|), and |t| ~ 0.77 here (log-odds of N(0, 2.1^2) scores)
    assert chosen["threshold"] - 1e-5 < threshold_lo < chosen["threshold"]
    assert cal.val_sensitivity == chosen["sensitivity"] >= 0.9
    meta = _meta(temperature=cal.temperature, threshold_log_odds=threshold_lo, calibration=cal)
    m = rates(y == 1, meta.decide(meta.log_probs(over)) == 1)
    assert m["sensitivity"] == cal.val_sensitivity and m["specificity"] == cal.val_specificity


def test_calibrate_positive_class_first():
    z, y = calibrated_logits(500, 2, seed=11)
    cal, threshold_lo, _ = calibrate(z, y, positive=0, target_sensitivity=0.8)
    meta = _meta(labels=("covid", "normal"), temperature=cal.temperature, threshold_log_odds=threshold_lo)
    m = rates(y == 0, meta.decide(meta.log_probs(z)) == 0)
    assert m["sensitivity"] == cal.val_sensitivity >= 0.8


def test_calibrate_without_a_threshold():
    z, y = calibrated_logits(600, 3, seed=12)
    cal, threshold_lo, _ = calibrate(2.0 * z, y, positive=1)  # three classes: argmax
    assert cal.threshold_rule == "argmax" and threshold_lo == 0.0 and cal.status == "fitted"
    z2, _ = calibrated_logits(50, 2, seed=13)
    cal, threshold_lo, _ = calibrate(z2, np.zeros(50, int), positive=1)  # no positives in validation
    assert cal.threshold_rule == "default 0.5" and threshold_lo == 0.0
    assert any("no operating threshold" in w for w in cal.warnings)


def test_calibrate_uninformative_logits_hit_the_upper_bound():
    y = np.array([0, 1, 0, 1, 1, 0])
    wrong = -np.stack([1.0 - y, y.astype(float)], 1) * 3.0  # every sample ranked wrong
    cal, _, _ = calibrate(wrong, y, positive=1)
    assert cal.status == "at upper bound" and cal.temperature == T_MAX
    assert any("upper bound" in w for w in cal.warnings)


# ----------------------------------------------------------------------------- reliability diagram

def test_reliability_diagram_png(tmp_path):
    z, y = calibrated_logits(3000, 2, seed=8)
    over = 4.0 * z
    t = fit_temperature(over, y)
    after, before = softmax(over / t), softmax(over)
    paths = {"both": tmp_path / "rel.png", "one": tmp_path / "one.png", "pos": tmp_path / "pos.png"}
    reliability_diagram_png(after, y, paths["both"], f"val split, T = {t:.2f}", probs_before=before)
    reliability_diagram_png(after, y, paths["one"], "val split")
    reliability_diagram_png(after, y, paths["pos"], "val split", probs_before=before, mode="positive")
    for p in paths.values():
        assert p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 300


def test_reliability_diagram_errors(tmp_path):
    probs = np.full((3, 3), 1 / 3)
    with pytest.raises(CalibrationError, match="two classes"):
        reliability_diagram_png(probs, np.array([0, 1, 2]), tmp_path / "x.png", "t", mode="positive")
    with pytest.raises(CalibrationError, match="mode must be"):
        reliability_diagram_png(probs, np.array([0, 1, 2]), tmp_path / "x.png", "t", mode="bottom")
    assert not (tmp_path / "x.png").exists()


def test_the_threshold_is_explained_in_plain_words_for_every_rule():
    from covid_cxr.model.meta import Calibration

    sens = _meta(threshold_log_odds=-1.0, calibration=Calibration(threshold_rule="sensitivity", target_sensitivity=0.95))
    assert sens.threshold_reason() == "set to catch 95 % of covid cases on validation"
    text = sens.explain_decision({"normal": 0.67, "covid": 0.33}, "covid")
    assert text == ("covid: P(covid) 0.330 is at or above the decision threshold 0.269, which was set to catch 95 % of "
                    "covid cases on validation")
    assert sens.explain_decision({"normal": 0.9, "covid": 0.1}, "normal").startswith("normal: P(covid) 0.100 is below")
    t = sens.threshold  # a probability just below the threshold never reads as equal to it or above it
    close = sens.explain_decision({"normal": 1 - (t - 2e-5), "covid": t - 2e-5}, "normal")
    p_text, t_text = close.split("P(covid) ")[1].split(" is below the decision threshold ")
    t_text = t_text.split(",")[0]
    assert p_text != t_text and float(p_text) < float(t_text)
    out = sens.explain_decision({"normal": 0.067, "covid": 0.933}, "covid", in_scope=False)
    assert out.startswith("out of scope: ") and "P(covid) 0.933" in out
    sep = Calibration(threshold_rule="sensitivity", target_sensitivity=0.9, separated=True)
    assert "midway between them" in _meta(calibration=sep).threshold_reason()
    youden = _meta(calibration=Calibration(threshold_rule="youden"))
    assert "Youden" in youden.threshold_reason() and ", which was set on validation" in youden.explain_decision(
        {"normal": 0.5, "covid": 0.5}, "covid")
    plain = _meta()
    assert plain.threshold_reason().startswith("the default 0.5")
    assert "(the default 0.5" in plain.explain_decision({"normal": 0.5, "covid": 0.5}, "covid")
    three = _meta(labels=("normal", "covid", "other"), positive=None)
    assert three.explain_decision({"normal": 0.2, "covid": 0.7, "other": 0.1}, "covid") == (
        "covid: the largest probability (0.70)")
