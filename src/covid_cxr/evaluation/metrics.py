"""Classification metrics with patient-level bootstrap confidence intervals.

Inputs are float64 log-probabilities (``ModelMeta.log_probs``) and the decided class per image
(``ModelMeta.decide``), never float32 probabilities: rankings (AUC, ROC) use log-odds, which do not
saturate, so confident images are never tied.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from statistics import NormalDist

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score

from covid_cxr.model.meta import ModelMeta, class_log_odds

MIN_PER_CLASS = 10
"""Fewest images of a class on which a subgroup's (a source's, a view's, a held-out fold's) sensitivity,
specificity or ROC AUC is judged. Below it the number is still shown, with its confidence interval, but flagged
"too few to judge", and no ROC curve is drawn for it: with 1-9 images of a class, one image moves it by 0.1-1."""


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


def wilson_ci(k: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval of a proportion ``k / n`` (None when ``n`` is 0). Unlike the normal approximation it
    stays inside [0, 1] and is not zero-width at 0/n or n/n, which is where small subgroups usually are."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


def enough_to_judge(n_positive: int, n_negative: int) -> bool:
    """Whether a subgroup has :data:`MIN_PER_CLASS` images of both classes (an AUC, a ROC curve)."""
    return n_positive >= MIN_PER_CLASS and n_negative >= MIN_PER_CLASS


def subgroup_metrics(is_positive: np.ndarray, called_positive: np.ndarray, scores: np.ndarray | None,
                     groups: np.ndarray, names: tuple[str, str] = ("negative", "positive"), n_resamples: int = 0,
                     seed: int = 0) -> dict:
    """A subgroup's numbers, each with its 95% CI: accuracy, sensitivity and specificity at the decisions given
    (Wilson intervals), ROC AUC of ``scores`` (patient-bootstrap interval, when both classes are present and
    ``n_resamples`` > 0), and the counts. Metrics resting on fewer than :data:`MIN_PER_CLASS` images of a class are
    flagged: ``too_few_to_judge`` and a ``caveat`` in words. A metric that cannot be computed (no image of a class)
    is None.

    Args:
        is_positive, called_positive: per image, the truth and the decision (booleans).
        scores: per image, higher = more positive (log-odds), or None for no AUC.
        groups: per image, the patient (the bootstrap draws patients).
        names: what the negative and the positive class are called (for the caveat).
    """
    t, c = np.asarray(is_positive, bool), np.asarray(called_positive, bool)
    r = rates(t, c)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    out = {"n": int(len(t)), "n_positive": n_pos, "n_negative": n_neg,
           "accuracy": r["accuracy"] if len(t) else None, "accuracy_ci95": wilson_ci(r["tp"] + r["tn"], len(t)),
           "sensitivity": r["sensitivity"] if n_pos else None, "sensitivity_ci95": wilson_ci(r["tp"], n_pos),
           "specificity": r["specificity"] if n_neg else None, "specificity_ci95": wilson_ci(r["tn"], n_neg),
           "roc_auc": None, "roc_auc_ci95": None}
    if scores is not None and n_pos and n_neg:
        s = np.asarray(scores, dtype=np.float64)
        a = auc_with_ci(t.astype(int), np.stack([np.zeros(len(s)), s], 1), np.asarray(groups), 1, n_resamples, seed)
        out["roc_auc"], out["roc_auc_ci95"] = a["auc"], a["ci95"]
    few = [f"{k} {name} image{'' if k == 1 else 's'}" for k, name in ((n_neg, names[0]), (n_pos, names[1]))
           if 0 < k < MIN_PER_CLASS]
    out["too_few_to_judge"] = bool(few)
    out["caveat"] = f"too few to judge: {' and '.join(few)} (fewer than {MIN_PER_CLASS})" if few else None
    return out


def breakdown(keys: np.ndarray, targets: np.ndarray, lp: np.ndarray, pred: np.ndarray, meta: ModelMeta,
              groups: np.ndarray | None = None, n_resamples: int = 0, seed: int = 0) -> dict:
    """Metrics per value of ``keys`` (source or view), each with its 95% CI and a "too few to judge" flag
    (:func:`~covid_cxr.evaluation.metrics.subgroup_metrics`): one pooled number can hide a model that only works on
    one hospital's images, and a subgroup of a few images can suggest a failure that is only chance."""
    positive = meta.positive_index
    groups = np.arange(len(keys)) if groups is None else np.asarray(groups)
    out = {}
    for key in sorted(set(keys)):
        m = keys == key
        if positive is None:  # no positive class: accuracy and the macro AUC only
            h = headline_metrics(targets[m], lp[m], pred[m], None)
            out[str(key)] = {"n": int(m.sum()), "n_positive": None, "accuracy": h["accuracy"],
                             "accuracy_ci95": wilson_ci(int((pred[m] == targets[m]).sum()), int(m.sum())),
                             "roc_auc": h["roc_auc"], "too_few_to_judge": False, "caveat": None}
            continue
        negative = "rest" if not meta.binary else meta.labels[1 - positive]
        out[str(key)] = subgroup_metrics(targets[m] == positive, pred[m] == positive,
                                         class_log_odds(lp[m], positive), groups[m],
                                         (negative, meta.labels[positive]), n_resamples, seed)
    return out


def with_ci(value: float | None, ci: list[float] | None, digits: int = 3) -> str:
    """``0.812 (0.71-0.89)``, ``n/a`` for a missing value: how every subgroup number is printed."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    return text + (f" ({ci[0]:.{min(digits, 2)}f}-{ci[1]:.{min(digits, 2)}f})" if ci else "")


def format_breakdown(kind: str, rows: dict) -> list[str]:
    """Terminal lines of a breakdown: each number with its CI, and the caveat of a subgroup too small to judge."""
    lines = []
    for name, b in rows.items():
        line = (f"  {kind} {name:<20} n={b['n']:<5} positives={b.get('n_positive')!s:<5} "
                f"AUC {with_ci(b.get('roc_auc'), b.get('roc_auc_ci95'))}")
        if "sensitivity" in b:
            line += (f"  sensitivity {with_ci(b['sensitivity'], b['sensitivity_ci95'])}"
                     f"  specificity {with_ci(b['specificity'], b['specificity_ci95'])}")
        lines.append(line + (f"  [{b['caveat']}]" if b.get("caveat") else ""))
    return lines
