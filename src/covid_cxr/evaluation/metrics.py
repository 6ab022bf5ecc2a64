"""Classification metrics with patient-level bootstrap confidence intervals.

Inputs are float64 log-probabilities (``ModelMeta.log_probs``) and the decided class per image
(``ModelMeta.decide``), never float32 probabilities: rankings (AUC, ROC) use log-odds, which do not
saturate, so confident images are never tied.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score

from covid_cxr.model.meta import class_log_odds


def roc_auc(targets: np.ndarray, lp: np.ndarray, positive: int | None = 1) -> float:
    """ROC AUC of the positive class on its log-odds (two classes), or the one-vs-rest macro AUC on
    log-probabilities (more classes); NaN when a class is absent."""
    targets = np.asarray(targets)
    lp = np.asarray(lp, dtype=np.float64)
    k = lp.shape[1]
    present = np.unique(targets)
    if len(present) < 2:
        return float("nan")
    if k == 2:
        pos = 1 if positive is None else positive
        return float(roc_auc_score(targets == pos, class_log_odds(lp, pos)))
    aucs = [roc_auc_score(targets == c, class_log_odds(lp, c))
            for c in range(k) if c in present and len(np.unique(targets == c)) == 2]
    return float(np.mean(aucs)) if aucs else float("nan")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def rates(is_positive: np.ndarray, called_positive: np.ndarray) -> dict:
    """Accuracy, sensitivity, specificity, PPV, NPV and the four counts of a binary decision."""
    t, p = np.asarray(is_positive, bool), np.asarray(called_positive, bool)
    tp, tn = int((p & t).sum()), int((~p & ~t).sum())
    fp, fn = int((p & ~t).sum()), int((~p & t).sum())
    return {"accuracy": _ratio(tp + tn, len(t)), "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp), "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn),
            "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def headline_metrics(targets: np.ndarray, lp: np.ndarray, pred: np.ndarray, positive: int | None) -> dict:
    """Accuracy and ROC AUC, plus sensitivity/specificity/PPV/NPV of the positive class (one-vs-rest for
    more than two classes) at the decisions ``pred``."""
    targets, pred = np.asarray(targets), np.asarray(pred)
    if positive is None:
        out = {"accuracy": float(np.mean(pred == targets))}
    else:
        out = rates(targets == positive, pred == positive)
        out["accuracy"] = float(np.mean(pred == targets))
    out["roc_auc"] = roc_auc(targets, lp, positive)
    return out


def patient_resamples(groups: np.ndarray, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Image indices of ``n_resamples`` bootstrap resamples that draw whole patients (``groups``) with replacement:
    every image of a drawn patient, once per draw. Deterministic in ``seed``."""
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    members = [order[bounds[i]:bounds[i + 1]] for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])


def bootstrap_ci(targets: np.ndarray, lp: np.ndarray, pred: np.ndarray, groups: np.ndarray, positive: int | None,
                 n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile confidence intervals, resampling patients (groups) with replacement, not images.

    Returns {metric: [low, high]} for every scalar of :func:`headline_metrics` except counts.
    """
    samples: dict[str, list[float]] = {}
    for idx in patient_resamples(groups, n_resamples, seed):
        m = headline_metrics(targets[idx], lp[idx], pred[idx], positive)
        for k, v in m.items():
            if k not in ("tp", "tn", "fp", "fn"):
                samples.setdefault(k, []).append(v)
    alpha = (1 - level) / 2
    out = {}
    for k, vals in samples.items():
        arr = np.asarray([v for v in vals if not math.isnan(v)])
        out[k] = [float(np.quantile(arr, alpha)), float(np.quantile(arr, 1 - alpha))] if len(arr) else [
            float("nan"), float("nan")]
    return out


def auc_with_ci(targets: np.ndarray, lp: np.ndarray, groups: np.ndarray, positive: int | None,
                n_resamples: int, seed: int, level: float = 0.95) -> dict:
    """{"auc", "ci95"}: ROC AUC and its percentile interval from resampling patients (None if 0 resamples)."""
    targets, groups = np.asarray(targets), np.asarray(groups)
    auc = roc_auc(targets, lp, positive)
    if not n_resamples or math.isnan(auc):
        return {"auc": auc, "ci95": None}
    vals = []
    for idx in patient_resamples(groups, n_resamples, seed):
        v = roc_auc(targets[idx], lp[idx], positive)
        if not math.isnan(v):
            vals.append(v)
    alpha = (1 - level) / 2
    ci = [float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha))] if vals else None
    return {"auc": auc, "ci95": ci}


def per_class_report(targets: np.ndarray, pred: np.ndarray, labels: list[str]) -> tuple[str, dict]:
    """scikit-learn's classification report: the study's text format (class indices as names) and a dict."""
    idx = list(range(len(labels)))
    text = classification_report(targets, pred, labels=idx, target_names=[str(i) for i in idx], digits=2,
                                 zero_division=0)
    as_dict = classification_report(targets, pred, labels=idx, target_names=labels, output_dict=True,
                                    zero_division=0)
    return text, as_dict


def confusion(targets: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return confusion_matrix(targets, pred, labels=list(range(k)))


def sensitivity_at_specificity(targets: np.ndarray, scores: np.ndarray, specificity: float = 0.95) -> float:
    """Highest sensitivity with specificity >= ``specificity`` (binary targets, higher score = positive)."""
    t = np.asarray(targets, bool)
    s = np.asarray(scores, dtype=np.float64)
    neg = np.sort(s[~t])
    if not len(neg) or not t.any():
        return float("nan")
    k = math.ceil(specificity * len(neg))  # at least k negatives must score below the threshold
    thr = neg[k - 1] if k >= 1 else -math.inf
    return float(np.mean(s[t] > thr))
