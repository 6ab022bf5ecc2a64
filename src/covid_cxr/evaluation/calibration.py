"""Temperature scaling, calibration error and the operating point, all fitted on the validation split.

Pure functions over arrays; the callers (``train``/``evaluate``) decide which split they see.
The threshold and temperature are chosen on VALIDATION data and then only applied to the test
split, so test metrics are not tuned on the test set.

* :func:`fit_temperature` -- one scalar ``T`` for ``softmax(logits / T)`` (Guo et al., 2017).
* :func:`expected_calibration_error` -- ECE with its per-bin table, for reports and plots.
* :func:`reliability_diagram_png` -- accuracy against confidence, before/after scaling.
* :func:`choose_threshold` -- the threshold on a score (the positive log-odds) meeting a sensitivity
  target, or Youden's J.
* :func:`calibrate` -- all of the above for a model's validation logits -> a typed
  :class:`~covid_cxr.model.meta.Calibration` and the threshold in log-odds.

A temperature fit that ends on a bound is not a fit: :data:`T_MIN` means the validation split is
perfectly separated (the likelihood keeps rising as T -> 0, and applying T_MIN would saturate every
probability), so T = 1 is kept with a warning; :data:`T_MAX` means the logits carry no information
about the labels, and is applied with a warning.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from covid_cxr.errors import CalibrationError
from covid_cxr.figures import save_figure
from covid_cxr.model.meta import Calibration, class_log_odds, log_probs

T_MIN = 0.05
"""Smallest temperature :func:`fit_temperature` returns (separable data would drive ``T`` to 0)."""
T_MAX = 20.0
"""Largest temperature :func:`fit_temperature` returns (uninformative logits would drive ``T`` to infinity)."""
THRESHOLD_RULES = ("sensitivity", "youden")


# ----------------------------------------------------------------------------- input checks

def _as_array(x, name: str, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on the GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_logits(logits, targets) -> tuple[np.ndarray, np.ndarray]:
    z = _as_array(logits, "logits")
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] == 0:
        raise CalibrationError(f"logits must have shape (N, K) with N >= 1 and K >= 2, got {z.shape}")
    if not np.isfinite(z).all():
        raise CalibrationError("logits hold NaN or infinite values; pass the model's raw logits, not "
                               "log-probabilities of underflowed softmax outputs")
    y = _check_targets(targets, z.shape[0], z.shape[1])
    return z, y


def _check_targets(targets, n: int, k: int) -> np.ndarray:
    t = _as_array(targets, "targets", dtype=np.float64)
    if t.ndim != 1 or len(t) != n:
        raise CalibrationError(f"targets must have shape ({n},) to match the scores, got {t.shape}")
    if not (np.isfinite(t).all() and (t == np.round(t)).all() and ((t >= 0) & (t < k)).all()):
        raise CalibrationError(f"targets must be class indices 0..{k - 1}")
    return t.astype(np.int64)


def _check_probs(probs, targets) -> tuple[np.ndarray, np.ndarray]:
    p = _as_array(probs, "probs")
    if p.ndim != 2 or p.shape[1] < 2 or p.shape[0] == 0:
        raise CalibrationError(f"probs must have shape (N, K) with N >= 1 and K >= 2, got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise CalibrationError("probs must lie in [0, 1]; pass softmax outputs, not logits")
    if not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise CalibrationError("each row of probs must sum to 1; pass softmax outputs over all classes")
    return p, _check_targets(targets, p.shape[0], p.shape[1])


# ----------------------------------------------------------------------------- temperature scaling

def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (cross-entropy, natural log) of ``softmax(logits / temperature)``.

    Args:
        logits: (N, K) raw model outputs (a NumPy array or a torch tensor).
        targets: (N,) class indices.
        temperature: T > 0; 1.0 leaves the logits unchanged.
    """
    z, y = _check_logits(logits, targets)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise CalibrationError(f"temperature must be a positive number, got {temperature}")
    return float(-log_probs(z, temperature)[np.arange(len(y)), y].mean())


def _nll_slope(z: np.ndarray, y: np.ndarray, beta: float) -> float:
    """d NLL / d beta for softmax(beta * z): mean of E_p[z] - z_y, non-decreasing in beta (NLL is convex in beta)."""
    p = np.exp(log_probs(beta * z))
    return float(((p * z).sum(1) - z[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, max_iter: int = 200) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)`` on (validation) data.

    The NLL is convex in beta = 1/T, so its slope in beta is monotone and the minimiser is the
    slope's root, found by bisection on log T in [:data:`T_MIN`, :data:`T_MAX`]. This is exact
    and needs no step size; the bounds only bite for degenerate data: separable data (every
    sample ranked right, NLL falls as T -> 0) returns ``T_MIN``, logits no better than chance
    return ``T_MAX``, and logits constant within every row (T has no effect) return 1.0.

    Args:
        logits: (N, K) raw model outputs, K >= 2 (NumPy array or torch tensor).
        targets: (N,) class indices.
        max_iter: bisection steps at most (60 already reach float64 resolution on log T).

    Returns:
        T as a Python float; predict with ``softmax(logits / T)`` (``meta.probabilities``).

    Raises:
        CalibrationError: bad shapes, non-finite logits, targets outside 0..K-1.
    """
    z, y = _check_logits(logits, targets)
    if np.ptp(z, axis=1).max() == 0:
        return 1.0
    # slope(beta) < 0 -> NLL still falls as beta grows, i.e. as T shrinks.
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    if _nll_slope(z, y, 1.0 / T_MIN) <= 0:
        return T_MIN
    if _nll_slope(z, y, 1.0 / T_MAX) >= 0:
        return T_MAX
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if _nll_slope(z, y, math.exp(-mid)) < 0:
            hi = mid  # the optimum beta is larger, so T is smaller
        else:
            lo = mid
        if hi - lo < 1e-12:
            break
    return float(math.exp(0.5 * (lo + hi)))


# ----------------------------------------------------------------------------- calibration error

ECE_BINS = 15
"""Equal-width bins of the one ECE covid-cxr reports (top-label), in text, JSON and plots."""

def _reliability(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> dict:
    """ECE and bins of (confidence, outcome) pairs; bins are (lo, hi], the first also holds 0."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = idx == b
        count = int(m.sum())
        c = float(conf[m].mean()) if count else None
        a = float(hit[m].mean()) if count else None
        if count:
            ece += count / len(conf) * abs(a - c)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count, "confidence": c,
                     "accuracy": a})
    return {"ece": float(ece), "bins": bins}


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Expected calibration error over equal-width bins of the top-label confidence.

    ECE = sum over bins of (bin count / N) * |accuracy - mean confidence|. Empty bins carry
    ``None`` for confidence and accuracy (so the result stays valid JSON).

    Args:
        probs: (N, K) class probabilities (softmax outputs).
        targets: (N,) class indices.
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        ``{"ece", "n_bins", "bins": [{"lo", "hi", "count", "confidence", "accuracy"}, ...]}``; for
        K = 2 also ``"positive": {"bins"}``: P(class 1) against the observed fraction of class 1 (the
        reliability of the score the operating threshold is applied to), for plots. It carries no second ECE:
        ``ece`` (top-label) is the one calibration error covid-cxr reports, in text, JSON and plots alike.

    Raises:
        CalibrationError: bad shapes, rows not summing to 1, targets outside 0..K-1, n_bins < 1.
    """
    p, y = _check_probs(probs, targets)
    if int(n_bins) != n_bins or n_bins < 1:
        raise CalibrationError(f"n_bins must be a positive integer, got {n_bins}")
    top = _reliability(p.max(1), (p.argmax(1) == y).astype(float), int(n_bins))
    out = {"ece": top["ece"], "n_bins": int(n_bins), "bins": top["bins"]}
    if p.shape[1] == 2:  # bins only: the one ECE covid-cxr reports is the top-label one above
        out["positive"] = {"bins": _reliability(p[:, 1], (y == 1).astype(float), int(n_bins))["bins"]}
    return out


def reliability_diagram_png(probs: np.ndarray, targets: np.ndarray, path: Path, title: str,
                            probs_before: np.ndarray | None = None, n_bins: int = ECE_BINS,
                            mode: str = "top_label") -> None:
    """Reliability diagram: per-bin accuracy against mean confidence, the diagonal, bin counts below.

    Args:
        probs: (N, K) probabilities to show (after temperature scaling when ``probs_before`` is given).
        targets: (N,) class indices.
        path: PNG to write (with the research-use footer).
        title: first title line; the ECE values are appended.
        probs_before: the same samples' probabilities before temperature scaling, drawn for comparison.
        n_bins: equal-width bins on [0, 1].
        mode: ``"top_label"`` (confidence of the predicted class) or ``"positive"`` (P(class 1)
            against the observed fraction of class 1; two classes only).
    """
    if mode not in ("top_label", "positive"):
        raise CalibrationError(f"mode must be 'top_label' or 'positive', got {mode!r}")
    series = [("after temperature scaling" if probs_before is not None else "model", probs, "tab:blue", "-")]
    if probs_before is not None:
        series.insert(0, ("before temperature scaling", probs_before, "0.45", "--"))
    fig = Figure(figsize=(5.2, 6.4))
    ax, axh = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1, label="perfect calibration")
    eces = []
    for name, pr, color, style in series:
        full_rel = expected_calibration_error(pr, targets, n_bins)
        rel = full_rel
        if mode == "positive":
            if "positive" not in full_rel:
                raise CalibrationError("mode='positive' needs two classes; use mode='top_label'")
            rel = full_rel["positive"]
        full = [b for b in rel["bins"] if b["count"]]
        ece = full_rel["ece"]  # the one definition (top-label), whatever the points show
        ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], color=color, linestyle=style,
                marker="o", markersize=4, label=f"{name} (ECE {ece:.3f})")
        lo = np.array([b["lo"] for b in rel["bins"]])
        counts = np.array([b["count"] for b in rel["bins"]])
        if style == "-":
            axh.bar(lo, counts, width=1.0 / n_bins, align="edge", color=color, alpha=0.6, label=name)
        else:  # outline only, so the scaled counts stay visible behind it
            axh.bar(lo, counts, width=1.0 / n_bins, align="edge", fill=False, edgecolor=color, linestyle=style,
                    label=name)
        eces.append(f"{ece:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed fraction of class 1" if mode == "positive" else "accuracy")
    ax.set_title(f"{title}\nECE (top-label) {' -> '.join(eces)} ({n_bins} bins, {len(targets)} images)", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    axh.set_xlabel("predicted P(class 1)" if mode == "positive" else "confidence (probability of the predicted class)")
    axh.set_ylabel("images")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path)


# ----------------------------------------------------------------------------- operating point

def choose_threshold(scores: np.ndarray, targets: np.ndarray, rule: str = "sensitivity",
                     target_sensitivity: float = 0.95) -> dict:
    """Threshold on a positive-class score (covid-cxr passes the positive log-odds), chosen on VALIDATION data.

    A sample is called positive when ``score >= threshold`` (as in :meth:`covid_cxr.model.meta.ModelMeta.decide`).
    The threshold is always one of ``scores``, so ties are exact: every sample sharing a score
    gets the same call.

    * ``"sensitivity"``: the highest threshold whose sensitivity on these data is >= ``target_sensitivity``
      (highest, so specificity is as high as the target allows). That is the k-th largest positive
      score, k the smallest count with k / n_positive >= target.
    * ``"youden"``: maximises sensitivity + specificity - 1 (Youden's J), compared in exact integer
      arithmetic; among equal J the highest threshold wins.

    Args:
        scores: (N,) positive log-odds, or any score where higher means more likely positive.
        targets: (N,) 0/1 labels, 1 = positive.
        rule: ``"sensitivity"`` or ``"youden"``.
        target_sensitivity: in (0, 1]; used by the ``"sensitivity"`` rule only.

    Returns:
        ``{"threshold", "rule", "target_sensitivity" (None for youden), "sensitivity", "specificity",
        "n_positive", "n_negative"}``, the rates achieved on these data.

    Raises:
        CalibrationError (a ValueError): unknown rule, target outside (0, 1], bad shapes, non-finite
        scores, labels other than 0/1, or a split without positives or without negatives.
    """
    if rule not in THRESHOLD_RULES:
        raise CalibrationError(f"rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    if rule == "sensitivity" and not (0 < target_sensitivity <= 1):
        raise CalibrationError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    s = _as_array(scores, "scores")
    if s.ndim != 1 or len(s) == 0:
        raise CalibrationError(f"scores must be a non-empty 1-D array of positive scores, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise CalibrationError("scores hold NaN or infinite values")
    y = _check_targets(targets, len(s), 2)
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    n_pos, n_neg = len(pos), len(neg)
    if n_pos < 1 or n_neg < 1:
        raise CalibrationError(f"choosing a threshold needs both classes in the validation split, got "
                               f"{n_pos} positive and {n_neg} negative images; put both classes in the "
                               "val split (or pass a fixed threshold)")
    if rule == "sensitivity":
        threshold = float(pos[n_pos - _needed_positives(target_sensitivity, n_pos)])
    else:
        cand = np.unique(s)[::-1]  # descending: argmax picks the highest threshold among ties in J
        tp = n_pos - np.searchsorted(pos, cand, side="left")
        tn = np.searchsorted(neg, cand, side="left")
        threshold = float(cand[int(np.argmax(tp * n_neg + tn * n_pos))])
    tp = int((pos >= threshold).sum())
    tn = int((neg < threshold).sum())
    return {"threshold": threshold, "rule": rule,
            "target_sensitivity": float(target_sensitivity) if rule == "sensitivity" else None,
            "sensitivity": tp / n_pos, "specificity": tn / n_neg, "n_positive": n_pos, "n_negative": n_neg}


def separation_gap(scores: np.ndarray, is_positive: np.ndarray) -> tuple[float, float] | None:
    """(highest other score, lowest positive score) when every positive scores above every other image, else
    None."""
    pos, neg = scores[is_positive], scores[~is_positive]
    if len(pos) and len(neg) and float(pos.min()) > float(neg.max()):
        return float(neg.max()), float(pos.min())
    return None


def _needed_positives(target: float, n_pos: int) -> int:
    """Smallest k with k / n_pos >= target, checked with the same float division the metrics use."""
    k = min(n_pos, max(1, math.ceil(target * n_pos)))
    while k > 1 and (k - 1) / n_pos >= target:
        k -= 1
    while k < n_pos and k / n_pos < target:
        k += 1
    return k


def calibrate(logits: np.ndarray, targets: np.ndarray, positive: int | None, rule: str = "sensitivity",
              target_sensitivity: float = 0.95) -> tuple[Calibration, float, dict]:
    """Temperature and operating point from validation logits.

    Args:
        logits: (N, K) raw validation logits.
        targets: (N,) class indices.
        positive: index of the positive class (None or K > 2: argmax, no threshold).
        rule: ``sensitivity`` or ``youden`` (see :func:`choose_threshold`).
        target_sensitivity: for the ``sensitivity`` rule.

    Returns:
        (the :class:`~covid_cxr.model.meta.Calibration`, the threshold on the positive log-odds (0.0 when
        none is chosen), plotting data ``{"probs_before", "probs_after"}``).
    """
    z, y = _check_logits(logits, targets)
    warnings_: list[str] = []
    fitted = fit_temperature(z, y)
    if fitted <= T_MIN:
        status, t = "at lower bound", 1.0
        warnings_.append(f"temperature scaling hit its lower bound ({T_MIN}): the {len(y)} validation images are "
                         "perfectly separated, so no temperature can be fitted; T = 1 is kept and the probabilities "
                         "are NOT calibrated (they are over-confident on new data)")
    elif fitted >= T_MAX:
        status, t = "at upper bound", fitted
        warnings_.append(f"temperature scaling hit its upper bound ({T_MAX}): the validation logits carry no "
                         "information about the labels; probabilities are pulled towards uniform")
    elif np.ptp(z, axis=1).max() == 0:
        status, t = "not fitted", 1.0
    else:
        status, t = "fitted", fitted
    before, after = np.exp(log_probs(z, 1.0)), np.exp(log_probs(z, t))
    values = dict(temperature=float(t), status=status, fitted_temperature=float(fitted), n_val=int(len(y)),
                  nll_before=nll(z, y), nll_after=nll(z, y, t),
                  ece_before=expected_calibration_error(before, y)["ece"],
                  ece_after=expected_calibration_error(after, y)["ece"])
    threshold_lo = 0.0
    if positive is not None and z.shape[1] == 2:
        scores = class_log_odds(log_probs(z, t), positive)
        try:
            is_pos = y == positive
            op = choose_threshold(scores, is_pos.astype(int), rule, target_sensitivity)
            # The threshold equals one validation score; a hair below it keeps that image positive when
            # batch size or hardware changes the logits in the 7th digit.
            threshold_lo = float(op["threshold"]) - 1e-6 * max(1.0, abs(float(op["threshold"])))
            gap = separation_gap(scores, is_pos)
            if gap is not None:
                # Every threshold in the gap reaches 100 % on both classes: either rule would put it on the edge
                # of the positive cluster, where the next positive image from elsewhere falls below it.
                threshold_lo = (gap[0] + gap[1]) / 2.0
                op = {**op, "sensitivity": 1.0, "specificity": 1.0}
                warnings_.append(
                    f"validation separates the classes completely ({int(is_pos.sum())} positive and "
                    f"{int((~is_pos).sum())} other images): any threshold between them reaches 100 % sensitivity "
                    "there, so it is set midway between the two classes"
                    + (f"; the {100 * target_sensitivity:g} % sensitivity target cannot be checked on these data"
                       if rule == "sensitivity" else "")
                    + ", and new images (other hospitals, other scanners) will not be separated as cleanly: "
                      "measure sensitivity on data the model has not seen (covid-cxr crossval)")
            values.update(threshold_rule=rule, target_sensitivity=op["target_sensitivity"], separated=gap is not None,
                          val_sensitivity=op["sensitivity"], val_specificity=op["specificity"])
        except CalibrationError as exc:
            values["threshold_rule"] = "default 0.5"
            warnings_.append(f"no operating threshold chosen ({exc}); P = 0.5 is used")
    else:
        values["threshold_rule"] = "argmax"
    return Calibration(**values, warnings=tuple(warnings_)), threshold_lo, {"probs_before": before, "probs_after": after}
