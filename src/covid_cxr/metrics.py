"""Classification metrics with patient-level bootstrap confidence intervals."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score


def roc_auc(targets: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of the positive class (2 classes) or one-vs-rest macro AUC; NaN if a class is absent."""
    targets = np.asarray(targets)
    k = probs.shape[1]
    present = np.unique(targets)
    if len(present) < 2:
        return float("nan")
    if k == 2:
        return float(roc_auc_score(targets, probs[:, 1]))
    aucs = [roc_auc_score(targets == c, probs[:, c]) for c in range(k) if c in present]
    return float(np.mean(aucs))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def binary_metrics(targets: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity, PPV, NPV (positive = class 1) at ``threshold`` on ``scores``."""
    pred = (scores >= threshold).astype(int)
    tp = int(((pred == 1) & (targets == 1)).sum())
    tn = int(((pred == 0) & (targets == 0)).sum())
    fp = int(((pred == 1) & (targets == 0)).sum())
    fn = int(((pred == 0) & (targets == 1)).sum())
    return {"accuracy": _ratio(tp + tn, len(targets)), "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp), "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn),
            "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def headline_metrics(targets: np.ndarray, probs: np.ndarray, threshold: float, positive: int = 1) -> dict:
    """Accuracy, ROC AUC, and sensitivity/specificity/PPV/NPV of the positive class (covid).

    Two classes: the positive class is predicted when its probability reaches ``threshold``.
    More classes: the predicted class is the argmax; the positive-class metrics are one-vs-rest and
    ``roc_auc`` is the one-vs-rest macro AUC.
    """
    if probs.shape[1] == 2:
        out = binary_metrics(targets, probs[:, 1], threshold)
    else:
        pred = probs.argmax(1)
        out = binary_metrics((targets == positive).astype(int), (pred == positive).astype(float), 0.5)
        out["accuracy"] = float(np.mean(pred == targets))
    out["roc_auc"] = roc_auc(targets, probs)
    return out


def predicted_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Class 1 when its probability reaches ``threshold`` (2 classes), else the argmax."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(1)


def bootstrap_ci(targets: np.ndarray, probs: np.ndarray, groups: np.ndarray, threshold: float,
                 n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile confidence intervals, resampling patients (groups) with replacement, not images.

    Returns {metric: [low, high]} for every scalar of :func:`headline_metrics` except counts.
    """
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[i] for i in pick])
        m = headline_metrics(targets[idx], probs[idx], threshold)
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
