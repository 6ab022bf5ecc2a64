"""Subgroup numbers with their uncertainty: Wilson intervals, the patient bootstrap, the "too few to judge" rule."""

from __future__ import annotations

import numpy as np
import pytest

from covid_cxr.evaluation.metrics import MIN_PER_CLASS, enough_to_judge, subgroup_metrics, wilson_ci, with_ci


def test_wilson_interval_matches_the_textbook_values():
    # Wilson (1927) 95% score intervals, as tabulated (e.g. Newcombe 1998, table I): 5/10 -> 0.237-0.763,
    # 0/10 -> 0-0.278, 10/10 -> 0.722-1, 0/1 -> 0-0.793. 3 decimals are what those tables give: rounded, so the
    # exact values are within 5e-4 of them (float64 arithmetic adds ~1e-16).
    for (k, n), (lo, hi) in {(5, 10): (0.237, 0.763), (0, 10): (0.0, 0.278), (10, 10): (0.722, 1.0),
                             (0, 1): (0.0, 0.793)}.items():
        got = wilson_ci(k, n)
        assert got == pytest.approx([lo, hi], abs=5e-4), (k, n, got)
    assert wilson_ci(0, 0) is None
    # never outside [0, 1], never zero width, narrower with more images
    for n in (1, 3, 30, 300):
        for k in (0, n // 2, n):
            lo, hi = wilson_ci(k, n)
            assert 0.0 <= lo < hi <= 1.0
    assert np.diff(wilson_ci(50, 100)) < np.diff(wilson_ci(5, 10))


def test_a_subgroup_with_one_image_of_a_class_is_flagged_too_few_to_judge():
    # 12 covid, 1 normal: the normal is called covid, so specificity 0 - a fact about one image, not about the model
    is_pos = np.array([True] * 12 + [False])
    called = np.array([True] * 10 + [False, False, True])
    m = subgroup_metrics(is_pos, called, np.arange(13.0), np.arange(13), ("normal", "covid"), n_resamples=200, seed=0)
    assert (m["n"], m["n_positive"], m["n_negative"]) == (13, 12, 1)
    # the same function on the same counts (exact), and ratios of small integers (1 ulp)
    assert m["specificity"] == 0.0 and m["specificity_ci95"] == pytest.approx(wilson_ci(0, 1))
    assert m["sensitivity"] == pytest.approx(10 / 12) and m["sensitivity_ci95"] == pytest.approx(wilson_ci(10, 12))
    assert m["too_few_to_judge"] is True
    assert m["caveat"] == f"too few to judge: 1 normal image (fewer than {MIN_PER_CLASS})"
    assert m["roc_auc"] == 0.0 and m["roc_auc_ci95"] is not None  # the one normal scores highest of 13: AUC 0


def test_enough_images_of_both_classes_are_judged_and_one_class_has_no_auc():
    rng = np.random.default_rng(0)
    is_pos = np.array([True] * MIN_PER_CLASS + [False] * MIN_PER_CLASS)
    scores = np.where(is_pos, 1.0, -1.0) + rng.normal(0, 1, len(is_pos))
    m = subgroup_metrics(is_pos, scores > 0, scores, np.arange(len(is_pos)), n_resamples=100, seed=1)
    assert m["too_few_to_judge"] is False and m["caveat"] is None
    lo, hi = m["roc_auc_ci95"]
    assert lo <= m["roc_auc"] <= hi
    assert enough_to_judge(MIN_PER_CLASS, MIN_PER_CLASS) and not enough_to_judge(MIN_PER_CLASS - 1, 100)
    only_pos = subgroup_metrics(np.ones(5, bool), np.ones(5, bool), np.zeros(5), np.arange(5))
    assert only_pos["roc_auc"] is None and only_pos["specificity"] is None and only_pos["specificity_ci95"] is None
    assert only_pos["caveat"] == f"too few to judge: 5 positive images (fewer than {MIN_PER_CLASS})"


def test_numbers_are_printed_with_their_interval():
    assert with_ci(0.81234, [0.7, 0.9]) == "0.812 (0.70-0.90)"
    assert with_ci(None, None) == "n/a" and with_ci(float("nan"), [0.1, 0.2]) == "n/a"
    assert with_ci(0.5, None, 2) == "0.50"
