"""Local validation: a run measured on images it was not trained on, usually a hospital's own
(``covid-cxr evaluate --run RUN --data LOCAL --split all``). See docs/local-validation.md.

When is an evaluation local? When the evaluated dataset folder is not the one the run was trained on AND none of
its sources is one of the model's training sources (``ModelMeta.data.sources``). The folder alone is not enough: a
copy of the training dataset, or a rebuild of the same collections, is another folder holding the same images.
The sources alone are not enough either: the training dataset's own test split shares its sources by design.
When the training folder cannot be found (a run copied to a hospital without its data), the sources decide; when
the model does not record its sources (covid-cxr 0.1), a dataset passed with ``--data`` that is not the training
folder counts as local, and the section says that its sources could not be checked.

The section reuses what evaluate computed (metrics with patient-bootstrap CIs, ECE, per source and per view) and
adds: the numbers at a threshold chosen on these images (reaching the model's own target sensitivity; optimistic
for these images), subgroups by acquisition (modality, manufacturer, photometric interpretation), the share of
images out of scope, and the local AUC beside the model's out-of-source estimate (``ModelMeta.estimate``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from covid_cxr import DISCLAIMER
from covid_cxr.errors import CalibrationError, CovidCxrError
from covid_cxr.evaluation.calibration import ECE_BINS, THRESHOLD_RULES, choose_threshold
from covid_cxr.evaluation.metrics import (MIN_PER_CLASS, bootstrap_ci, breakdown, format_breakdown, headline_metrics,
                                          wilson_ci, with_ci)
from covid_cxr.evaluation.page import METRIC_NAMES, breakdown_table, esc, fmt, table
from covid_cxr.evaluation.split import ALL, SplitData
from covid_cxr.model.meta import ModelMeta, format_probability

ACQUISITION_SUBGROUPS = ("modality", "manufacturer", "photometric")
"""Manifest columns (from a DICOM header; '' for other sources) the local section breaks metrics down by, besides
source and view (which evaluate already breaks down for every split)."""
NOT_RECORDED = "(not recorded)"
"""The subgroup of images whose manifest leaves an acquisition column empty."""
OPTIMISM_NOTE = ("this threshold was chosen on these same images, so its sensitivity and specificity here are "
                 "optimistic for them (the confidence intervals do not include the choice); expect less on the next "
                 "images from this hospital")
RECALIBRATED_NOTE = ("the model's temperature and threshold were refitted on these same images (covid-cxr calibrate): "
                     "its sensitivity, specificity and calibration error here are optimistic; measure it on other "
                     "images of this hospital (a later period) for an honest number")
RECALIBRATED_SOME_NOTE = ("{overlap} of these {images} images are among those the model's temperature and threshold "
                          "were refitted on (covid-cxr calibrate): its sensitivity, specificity and calibration error "
                          "here are optimistic; measure it on images it was not refitted on for an honest number")
FINGERPRINT_DIGITS = 16
"""``covid-cxr calibrate`` records the first 16 hex digits of the sha256 of each image it fitted on
(``ModelMeta.recalibration["image_fingerprints"]``): enough to tell which evaluated images were among them (a chance
match is 1 in 2**64), in a quarter of the room."""
VERDICTS = ("inside", "overlapping", "below", "above", "not measurable")


# ----------------------------------------------------------------------------- is it local?

def _resolved(path: str | Path) -> str:
    return str(Path(path).resolve())


def locality(d: SplitData) -> dict:
    """Whether ``d``'s dataset is one the run was not trained on (see the module docstring for the rule).

    Returns:
        ``{"local", "why", "dataset", "training_dataset" (None when not found), "training_sources" (None when the
        model does not record them), "shared_sources"}``.
    """
    meta: ModelMeta = d.predictor.meta
    here = _resolved(d.dataset.dir.root)
    try:
        trained_on = _resolved(d.run.dataset().root)
    except CovidCxrError:  # a run copied without its dataset: the sources decide
        trained_on = None
    sources = sorted(set(d.rows["source"]))
    training_sources = sorted(meta.data.sources) if meta.data and meta.data.sources else None
    shared = sorted(set(sources) & set(training_sources or ()))
    out = {"dataset": here, "training_dataset": trained_on, "training_sources": training_sources,
           "shared_sources": shared}
    if trained_on == here:
        return {**out, "local": False, "why": "this is the dataset the model was trained on"}
    if shared:
        return {**out, "local": False,
                "why": f"source(s) {', '.join(shared)} of this dataset are among the model's training sources"}
    if training_sources is None:
        return {**out, "local": True,
                "why": "this is not the dataset folder the model was trained on; the model does not record its "
                       "training sources, so whether these images share a source with them could not be checked"}
    folder = ("another dataset folder than the one the model was trained on" if trained_on else
              "the dataset the model was trained on is not here to compare folders")
    return {**out, "local": True,
            "why": f"{folder}, and none of its sources ({', '.join(sources)}) is among the model's training "
                   f"sources ({', '.join(training_sources)})"}


def recalibrated_on(rec: dict | None, where: dict, split: str, rows) -> int | None:
    """How many of the evaluated ``rows`` the model's temperature and threshold were refitted on (``covid-cxr
    calibrate``'s record ``rec``); None: some or all of them, the record cannot tell which.

    By the images' sha256 when the record has their fingerprints, so a copy of the data in another folder counts and
    ``calibrate --split val`` then ``evaluate --split test`` of one dataset does not. An older record (no
    fingerprints) has only the dataset and the split: the same folder and split, or ``all`` on either side, is
    taken as the same images.
    """
    if not rec:
        return 0
    fingerprints = rec.get("image_fingerprints")
    if fingerprints is not None and "sha256" in rows:
        recorded = set(fingerprints)
        return int(sum(str(h)[:FINGERPRINT_DIGITS] in recorded for h in rows["sha256"] if h))
    if rec.get("dataset") != where["dataset"]:
        return 0
    same = rec.get("split") in (None, ALL, split) or split == ALL
    return None if same else 0


# ----------------------------------------------------------------------------- the pieces

def _point(meta: ModelMeta, threshold_log_odds: float | None, m: dict, ci: dict) -> dict:
    """One operating point: the threshold and AUC, sensitivity and specificity with their bootstrap CIs."""
    shown = meta.replace(threshold_log_odds=threshold_log_odds) if threshold_log_odds is not None else meta
    out = {"threshold": shown.threshold, "threshold_log_odds": threshold_log_odds if meta.binary else None,
           "threshold_text": shown.threshold_text()}
    for k in ("roc_auc", "sensitivity", "specificity", "accuracy"):
        if k in m:
            out[k] = m[k]
            out[f"{k}_ci95"] = ci.get(k)
    out.update({k: m[k] for k in ("tp", "fn", "tn", "fp") if k in m})
    return out


def _apart(meta: ModelMeta, a: float, b: float) -> tuple[str, str]:
    """Two thresholds on P(positive) as text, with the digits that tell them apart (0.4883 and 0.4877, not 0.488
    twice)."""
    for digits in range(3, 10):
        ta, tb = format_probability(a, min_digits=digits), format_probability(b, min_digits=digits)
        if ta != tb:
            break
    return f"P({meta.positive}) >= {ta}", f"P({meta.positive}) >= {tb}"


def local_threshold(meta: ModelMeta, targets: np.ndarray, lp: np.ndarray, groups: np.ndarray, n_resamples: int,
                    seed: int) -> dict:
    """The operating point a threshold chosen on these images gives: the model's own rule (its target sensitivity,
    or Youden's J) applied here with :func:`~covid_cxr.evaluation.calibration.choose_threshold`, the function
    training uses. Optimistic for these images (:data:`OPTIMISM_NOTE`)."""
    if not meta.binary:
        return {"available": False, "reason": "the model decides by argmax (no threshold to choose)"}
    cal = meta.calibration
    rule = cal.threshold_rule if cal and cal.threshold_rule in THRESHOLD_RULES else "youden"
    target = cal.target_sensitivity if rule == "sensitivity" and cal.target_sensitivity else None
    if rule == "sensitivity" and target is None:
        rule = "youden"
    positive = meta.positive_index
    try:
        op = choose_threshold(meta.positive_log_odds(lp), (targets == positive).astype(int), rule,
                              target if target is not None else 1.0)
    except CalibrationError as exc:
        return {"available": False, "reason": str(exc)}
    pred = meta.replace(threshold_log_odds=op["threshold"]).decide(lp)
    m = headline_metrics(targets, lp, pred, positive)
    ci = bootstrap_ci(targets, lp, pred, groups, positive, n_resamples, seed) if n_resamples else {}
    chosen = (f"the highest threshold reaching the model's own target sensitivity ({target:g}) on these images"
              if rule == "sensitivity" else
              "the threshold maximising sensitivity + specificity on these images (the model's rule"
              + (")" if cal and cal.threshold_rule == "youden" else ", as it records no target sensitivity)"))
    return {"available": True, **_point(meta, op["threshold"], m, ci), "rule": rule, "target_sensitivity": target,
            "chosen_as": chosen, "note": OPTIMISM_NOTE}


def compare_with_expected(auc: float, ci: list[float] | None, estimate: dict | None) -> dict:
    """The local AUC beside the model's out-of-source estimate (``ModelMeta.estimate`` from crossval, or a crossval's
    ``pooled`` result as ``{"pooled_auc", "ci95"}``), in plain words.

    The verdict compares the local AUC's 95% CI (the point when there is none) with the estimate's 95% CI:
    ``below`` or ``above`` (no overlap), ``inside`` (the local CI lies within it), ``overlapping`` (neither), or
    ``not measurable`` (no local AUC: a class is missing).
    """
    est = estimate or {}
    expected = est.get("pooled_auc")
    if expected is None:
        note = est.get("note") or ("it was trained with a test split from its own sources; `covid-cxr train "
                                   "--all-images --estimate-from CV_DIR` records one, and `covid-cxr report --crossval "
                                   "CV_DIR` shows a crossval beside these numbers")
        return {"available": False, "text": f"Nothing to compare with: the model carries no out-of-source estimate "
                                            f"({note})."}
    e_lo, e_hi = est.get("ci95") or (expected, expected)
    out = {"available": True, "auc": expected, "ci95": [e_lo, e_hi], "source": est.get("source", "crossval"),
           "crossval": est.get("crossval")}
    if auc is None or (isinstance(auc, float) and math.isnan(auc)):
        return {**out, "verdict": "not measurable",
                "text": "The local AUC cannot be measured (these images lack one of the classes)."}
    lo, hi = ci or (auc, auc)
    here = f"The local AUC {with_ci(auc, ci)}"
    rng = f"the range expected on a hospital the model has not seen ({e_lo:.3f}-{e_hi:.3f}, from crossval)"
    if hi < e_lo:
        verdict, text = "below", (f"{here} lies below {rng}: the model does worse here than its out-of-source "
                                  "estimate predicts. Find out why (scanners, patients, views, how the labels were "
                                  "made) before relying on it at all.")
    elif lo > e_hi:
        verdict, text = "above", (f"{here} lies above {rng}: better than the estimate predicts. Check that none of "
                                  "these images or patients were in the training data and that the labels were not "
                                  "made with the model's help.")
    elif e_lo <= lo and hi <= e_hi:
        verdict, text = "inside", f"{here} lies inside {rng}: the model does here about as well as expected."
    else:
        verdict, text = "overlapping", (f"{here} overlaps {rng} without lying inside it: consistent with the "
                                        "estimate, but these images cannot tell whether the model does better or worse "
                                        "here (more images narrow the interval).")
    return {**out, "verdict": verdict, "text": text}


def _scope(in_scope: np.ndarray | None) -> dict | None:
    if in_scope is None:
        return None
    n, k = int(len(in_scope)), int((~in_scope).sum())
    return {"images": n, "out_of_scope": k, "share_out_of_scope": k / n if n else None,
            "share_out_of_scope_ci95": wilson_ci(k, n),
            "note": "images the model's out-of-scope gate finds unlike its training images: their outputs are not "
                    "meaningful. They are scored above like every other image; the 'scope' subgroup shows both parts"}


def _subgroups(d: SplitData, doc: dict, lp: np.ndarray, pred: np.ndarray, in_scope: np.ndarray | None,
               n_resamples: int, seed: int) -> tuple[dict, list[str]]:
    meta = d.predictor.meta
    rows, targets, groups = d.rows, d.targets, d.rows["group"].to_numpy()
    out = {"source": doc["by_source"], "view": doc["by_view"]}
    not_recorded = []
    for column in ACQUISITION_SUBGROUPS:
        values = rows[column].astype(str).to_numpy()
        if not (values != "").any():
            not_recorded.append(column)
            continue
        keys = np.where(values == "", NOT_RECORDED, values)
        out[column] = breakdown(keys, targets, lp, pred, meta, groups, n_resamples, seed)
    if in_scope is not None:
        keys = np.where(in_scope, "in scope", "out of scope")
        out["scope"] = breakdown(keys, targets, lp, pred, meta, groups, n_resamples, seed)
    return out, not_recorded


# ----------------------------------------------------------------------------- the section

def local_validation(d: SplitData, doc: dict, lp: np.ndarray, pred: np.ndarray, in_scope: np.ndarray | None,
                     where: dict, n_resamples: int, seed: int) -> dict:
    """The ``local_validation`` section of metrics.json (see docs/local-validation.md for its shape).

    Args:
        d: the run's model and the evaluated images.
        doc: the rest of metrics.json (its metrics, CIs, calibration and breakdowns are reused, not recomputed).
        lp, pred: calibrated log-probabilities and decisions at the model's threshold.
        in_scope: per image, inside the model's scope (None when the model has no gate).
        where: :func:`locality`'s answer.
        n_resamples, seed: the patient bootstrap (0: no intervals).
    """
    meta: ModelMeta = d.predictor.meta
    targets, groups = d.targets, d.rows["group"].to_numpy()
    p = doc["protocol"]
    at_model = {**_point(meta, meta.threshold_log_odds, doc["metrics"], doc["ci95"]),
                "chosen_as": f"the model's own threshold, {meta.threshold_reason()}"}
    at_local = local_threshold(meta, targets, lp, groups, n_resamples, seed)
    if at_local.get("available"):
        at_model["threshold_text"], at_local["threshold_text"] = _apart(meta, at_model["threshold"],
                                                                        at_local["threshold"])
    subgroups, not_recorded = _subgroups(d, doc, lp, pred, in_scope, n_resamples, seed)
    cal = meta.calibration
    overlap = recalibrated_on(meta.recalibration, where, d.split, d.rows)
    recalibrated_here = overlap != 0
    warnings_ = []
    if recalibrated_here:
        some = overlap is not None and overlap < len(d.rows)
        warnings_.append(RECALIBRATED_SOME_NOTE.format(overlap=overlap, images=len(d.rows)) if some else
                         RECALIBRATED_NOTE)
    if p.get("synthetic_sources"):
        warnings_.append(f"SYNTHETIC DATA ({', '.join(p['synthetic_sources'])}): these numbers show that the "
                         "pipeline works, not how the model does on patients")
    return {
        "disclaimer": DISCLAIMER,
        "why": where["why"],
        "protocol": {
            "dataset": where["dataset"], "split": p["split"], "images": p["images"], "patients": p["patients"],
            "images_per_class": p["images_per_class"], "sources": p["sources"],
            "rows_not_scored": p.get("rows_not_scored", 0),
            "training_dataset": where["training_dataset"], "training_sources": where["training_sources"],
            "confidence_intervals": p["confidence_intervals"],
            "subgroup_intervals": f"Wilson 95% intervals for proportions, patient bootstrap for AUC; flagged 'too few "
                                  f"to judge' below {MIN_PER_CLASS} images of a class",
        },
        "at_model_threshold": at_model,
        "at_local_threshold": at_local,
        "calibration": {"ece": doc["calibration"]["ece"], "n_bins": ECE_BINS, "temperature": meta.temperature,
                        "ece_on_validation": cal.ece_after if cal else None, "reliability_png": "reliability.png",
                        "definition": f"expected calibration error, top-label, {ECE_BINS} equal-width bins (the one "
                                      "covid-cxr reports)"},
        "subgroups": subgroups,
        "not_recorded": not_recorded,
        "scope": _scope(in_scope),
        "expected": compare_with_expected(doc["metrics"].get("roc_auc"), doc["ci95"].get("roc_auc"), meta.estimate),
        "recalibrated_on_these_images": recalibrated_here,
        "warnings": warnings_,
    }


def format_local(lv: dict) -> list[str]:
    """Terminal lines of the local validation section."""
    p = lv["protocol"]
    lines = [f"LOCAL VALIDATION on {p['dataset']}: {p['images']} images, {p['patients']} patients "
             f"({', '.join(f'{k} {v}' for k, v in p['images_per_class'].items())}); {lv['why']}"]
    if p.get("rows_not_scored"):
        lines.append(f"  {p['rows_not_scored']} manifest rows not scored: their target is not one of the model's "
                     "classes")
    lines += [f"  WARNING: {w}" for w in lv["warnings"]]

    def point(name: str, op: dict) -> str:
        text = f"  {name} ({op['threshold_text']}): AUC {with_ci(op.get('roc_auc'), op.get('roc_auc_ci95'))}"
        if "sensitivity" in op:
            text += (f"  sensitivity {with_ci(op['sensitivity'], op.get('sensitivity_ci95'))}"
                     f"  specificity {with_ci(op['specificity'], op.get('specificity_ci95'))}")
        return text

    lines.append(point("at the model's threshold", lv["at_model_threshold"]))
    loc = lv["at_local_threshold"]
    if loc.get("available"):
        lines.append(point("at a local threshold", loc) + f", {loc['chosen_as']}")
        lines.append(f"    note: {loc['note']}")
    else:
        lines.append(f"  no local threshold: {loc['reason']}")
    lines.append(f"  expected: {lv['expected']['text']}")
    c = lv["calibration"]
    on_val = f"; {c['ece_on_validation']:.3f} on its validation split" if c.get("ece_on_validation") is not None else ""
    lines.append(f"  calibration here: ECE (top-label, {c['n_bins']} bins) {c['ece']:.3f} at temperature "
                 f"{c['temperature']:.3g}{on_val} (reliability.png)")
    s = lv.get("scope")
    if s:
        ci = s["share_out_of_scope_ci95"]
        share = 100 * s["share_out_of_scope"]
        lines.append(f"  out of scope: {s['out_of_scope']} of {s['images']} images ({share:.1f}%"
                     + (f", 95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%" if ci else "") + ")")
    else:
        lines.append("  out of scope: the model has no out-of-scope gate")
    for kind, rows in lv["subgroups"].items():
        if kind not in ("source", "view"):  # evaluate's summary prints those two for every split
            lines += format_breakdown(kind, rows)
    if lv["not_recorded"]:
        lines.append(f"  not recorded for these images (no subgroups): {', '.join(lv['not_recorded'])}")
    lines.append(f"  protocol: {p['confidence_intervals']}; subgroups: {p['subgroup_intervals']}")
    return lines


# ----------------------------------------------------------------------------- the report's section

def expected_text(m: dict, cv: dict | None) -> dict:
    """The local AUC beside the out-of-source estimate: the model's own (``ModelMeta.estimate``), else the crossval
    given to ``covid-cxr report --crossval``."""
    expected = m["local_validation"]["expected"]
    pooled = (cv or {}).get("pooled") or {}
    if expected.get("available") or pooled.get("auc") is None:
        return expected
    return compare_with_expected(m["metrics"].get("roc_auc"), m["ci95"].get("roc_auc"),
                                 {"pooled_auc": pooled["auc"], "ci95": pooled.get("ci95"), "source": "crossval"})


def _point_rows(at_model: dict, at_local: dict) -> tuple[list[str], list[list]]:
    points = [at_model] + ([at_local] if at_local.get("available") else [])
    head = ["measure", f"at the model's threshold ({at_model['threshold_text']})"]
    if at_local.get("available"):
        head.append(f"at a local threshold ({at_local['threshold_text']})")
    names = {"roc_auc": "Area under the ROC curve", "sensitivity": METRIC_NAMES["sensitivity"],
             "specificity": METRIC_NAMES["specificity"], "accuracy": METRIC_NAMES["accuracy"]}
    rows = [[name] + [with_ci(op.get(k), op.get(f"{k}_ci95")) for op in points]
            for k, name in names.items() if k in at_model]
    return head, rows


def local_section(m: dict, cv: dict | None, positive: str | None) -> str:
    """The report's "Local validation" section ('' when the evaluation is not one)."""
    lv = m.get("local_validation")
    if not lv:
        return ""
    p = lv["protocol"]
    at_model, at_local = lv["at_model_threshold"], lv["at_local_threshold"]
    which = "every split" if p["split"] == "all" else f"the {p['split']} split"
    parts = [f"<div class='estimate'>{esc(expected_text(m, cv)['text'])}</div>",
             f"<p>Why this is a local validation: {esc(lv['why'])}.</p>",
             f"<p>Protocol: <code>{esc(p['dataset'])}</code>, {which}: {p['images']} images from {p['patients']} "
             f"patients ({esc(', '.join(f'{k} {v}' for k, v in p['images_per_class'].items()))}); sources "
             f"{esc(', '.join(p['sources']))}. Confidence intervals: {esc(p['confidence_intervals'])}; subgroups: "
             f"{esc(p['subgroup_intervals'])}."
             + (f" {p['rows_not_scored']} manifest rows were not scored: their target is not one of the model's "
                "classes." if p.get("rows_not_scored") else "") + "</p>"]
    parts += [f"<div class='conf'>{esc(w)}</div>" for w in lv["warnings"]]
    parts.append(table(*_point_rows(at_model, at_local)))
    parts.append(f"<p>The model's threshold: {esc(at_model['chosen_as'])}.</p>")
    if at_local.get("available"):
        parts.append(f"<p class='warn'>The local threshold is {esc(at_local['chosen_as'])}: {esc(at_local['note'])}. "
                     "To use a threshold chosen here, <code>covid-cxr calibrate</code> writes a new run with it; "
                     "measure that run on other images.</p>")
    else:
        parts.append(f"<p class='muted'>No local threshold: {esc(at_local['reason'])}.</p>")
    c = lv["calibration"]
    on_val = (f" ({fmt(c['ece_on_validation'])} on the model's validation split)"
              if c.get("ece_on_validation") is not None else "")
    parts.append(f"<p>Calibration on these images: {esc(c['definition'])} <b>{fmt(c['ece'])}</b> at temperature "
                 f"{fmt(c['temperature'])}{on_val}; its reliability plot is under Calibration.</p>")
    s = lv.get("scope")
    if s:
        parts.append(f"<p>Out of scope: <b>{s['out_of_scope']} of {s['images']}</b> images (share "
                     f"{with_ci(s['share_out_of_scope'], s['share_out_of_scope_ci95'])}): {esc(s['note'])}.</p>")
    else:
        parts.append("<p class='muted'>The model has no out-of-scope gate: no image is flagged.</p>")
    for kind, rows in lv["subgroups"].items():
        if kind not in ("source", "view"):  # the report shows those under "Per source and per view"
            parts.append(breakdown_table(f"by {kind}", rows, positive))
    if lv["not_recorded"]:
        parts.append(f"<p class='muted'>Not recorded for these images (no subgroups): "
                     f"{esc(', '.join(lv['not_recorded']))}.</p>")
    parts.append(f"<p><b>{esc(lv['disclaimer'])}</b></p>")
    return "<h2>Local validation</h2>" + "".join(parts)
