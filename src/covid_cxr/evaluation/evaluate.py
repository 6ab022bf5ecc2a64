"""``covid-cxr evaluate``: metrics, the study's classification report and pictures for one split.

Writes ``RUN_DIR/eval-<split>/``: classification_report.txt, metrics.json, predictions.csv,
confusion_matrix.png, roc.png, reliability.png, class_distribution.png, samples.png. ``--split all`` scores every
image of the model's classes whatever its split (``RUN_DIR/eval-all/``); on a dataset the run was not trained on,
metrics.json gains a ``local_validation`` section (:mod:`covid_cxr.evaluation.local`).
All rankings use float64 log-odds from the logits (never saturated float32 probabilities).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.data.card import class_distribution_png, samples_png
from covid_cxr.evaluation.calibration import ECE_BINS, expected_calibration_error, reliability_diagram_png
from covid_cxr.evaluation.local import format_local, local_validation, locality
from covid_cxr.evaluation.metrics import (MIN_PER_CLASS, bootstrap_ci, breakdown, confusion, format_breakdown,
                                          headline_metrics, per_class_report)
from covid_cxr.evaluation.options import EvalConfig
from covid_cxr.evaluation.plots import confusion_matrix_png, roc_png
from covid_cxr.evaluation.split import ALL, SplitData, load_split
from covid_cxr.files import atomic_write, write_json
from covid_cxr.model.inference import Predictor
from covid_cxr.model.meta import ModelMeta
from covid_cxr.model.results import Outputs

log = logging.getLogger(__name__)

STUDY_BASELINE = {
    "source": "the original notebook (DenseNet-121, all layers fine-tuned; 850 train, 200 test per class; "
              "split protocol not stated)",
    "classification_report": (
        "              precision    recall  f1-score   support\n\n"
        "           0       0.73      0.95      0.83       200\n"
        "           1       0.94      0.66      0.77       200\n\n"
        "    accuracy                           0.81       400\n"
        "   macro avg       0.84      0.80      0.80       400\n"
        "weighted avg       0.84      0.81      0.80       400\n"),
    "accuracy": 0.81, "sensitivity": 0.66, "specificity": 0.95,
}


def _sample_grid(rows: pd.DataFrame, pixels: np.ndarray, labels: list[str], seed: int, per_class: int = 6):
    rng = np.random.default_rng(seed)
    grid = {}
    for lab in labels:
        idx = np.flatnonzero(rows["target"].to_numpy() == lab)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        grid[lab] = [(pixels[i], f"{rows['source'].iloc[i]}") for i in pick]
    return grid


def in_scope_of(predictor: Predictor, out: Outputs) -> np.ndarray | None:
    """Per image, whether it is inside the model's scope, as predict decides it (the out-of-scope gate, and the lung
    segmenter's two-lung-fields check when the model carries one); None when the model has neither."""
    if out.scope is None and out.lungs is None:
        return None
    return np.array([r["in_scope"] is not False for r in predictor.results(out)], dtype=bool)


def run(cfg: EvalConfig) -> dict:
    """Evaluate a run's checkpoint on a manifest split and write the reports; returns metrics.json's content.

    On a dataset the run was not trained on (:func:`~covid_cxr.evaluation.local.locality`) the result carries a
    ``local_validation`` section; otherwise that key is None.
    """
    d = load_split(cfg.run, cfg.split, cfg.data, cfg.checkpoint, cfg.device, cfg.workers, cfg.source_roots)
    meta = d.predictor.meta
    log.info("evaluating %s on %d images (%s)", d.predictor.source.name, len(d.pixels),
             "every split" if cfg.split == ALL else f"{cfg.split} split")
    out = d.predictor.outputs(d.pixels, cfg.batch_size, lungs=d.lungs)
    lp = meta.log_probs(out.logits)
    pred = meta.decide(lp)
    in_scope = in_scope_of(d.predictor, out)
    if cfg.bootstrap:
        log.info("confidence intervals: %d bootstrap resamples of %d patients", cfg.bootstrap, d.rows["group"].nunique())
    result = metrics_document(cfg, d, lp, pred, in_scope)
    where = locality(d)
    result["local_validation"] = None
    if where["local"]:
        log.info("local validation: %s", where["why"])
        result["protocol"]["internal_split_warning"] = None  # not the training sources: no internal split
        result["local_validation"] = local_validation(d, result, lp, pred, in_scope, where, cfg.bootstrap, cfg.seed)
    elif cfg.split == ALL:
        result["protocol"]["internal_split_warning"] = (
            f"every split of a dataset the model was trained on ({where['why']}) includes the images it learned from: "
            "these numbers are optimistic; use --split test, or --data with a dataset of other sources")
    folder = d.run.eval_dir(cfg.split)
    folder.mkdir(parents=True, exist_ok=True)
    log.info("writing metrics, predictions and pictures to %s", folder)
    _write_outputs(folder, result, d, lp, pred, out.scope, in_scope, cfg)
    result["output_dir"] = str(folder)
    return result


def _rows_not_scored(d: SplitData) -> int:
    """Manifest rows of the evaluated split(s) whose target is not one of the model's classes (counted, not hidden)."""
    df = d.dataset.df
    in_split = df["split"].isin(set(df["split"]) if d.split == ALL else {d.split})
    return int((in_split & ~df["target"].isin(d.predictor.meta.labels)).sum())


def metrics_document(cfg: EvalConfig, d: SplitData, lp: np.ndarray, pred: np.ndarray,
                     in_scope: np.ndarray | None) -> dict:
    """metrics.json: the protocol, headline metrics with CIs, per-class report, calibration, breakdowns."""
    meta: ModelMeta = d.predictor.meta
    labels, targets, rows = list(meta.labels), d.targets, d.rows
    positive = meta.positive_index
    report_text, per_class = per_class_report(targets, pred, labels)
    pred_half = meta.replace(threshold_log_odds=0.0).decide(lp)
    groups = rows["group"].to_numpy()
    ci = bootstrap_ci(targets, lp, pred, groups, positive, cfg.bootstrap, seed=cfg.seed) if cfg.bootstrap else {}
    synthetic = [s for s in d.dataset.info.synthetic_sources if s in set(rows["source"])]
    cal = meta.calibration
    probs = np.exp(lp)
    doc = {
        "disclaimer": DISCLAIMER,
        "protocol": {
            "dataset": str(d.dataset.dir.root.resolve()), "task": d.dataset.info.task, "split": cfg.split,
            "split_protocol": d.dataset.info.protocol,
            "sources": sorted(rows["source"].unique().tolist()), "synthetic_sources": synthetic,
            "images": int(len(rows)), "patients": int(rows["group"].nunique()),
            "rows_not_scored": _rows_not_scored(d),
            "images_per_class": {lab: int((targets == i).sum()) for i, lab in enumerate(labels)},
            "images_per_source": {k: int(v) for k, v in rows["source"].value_counts().items()},
            "confidence_intervals": f"95% percentile bootstrap, {cfg.bootstrap} resamples of patients (not images)"
            if cfg.bootstrap else "not computed (--bootstrap 0)",
            "internal_split_warning": "this split comes from the same sources as the training data; expect lower "
                                      "performance on a hospital the model has not seen (see `covid-cxr crossval`)"
            if d.dataset.info.protocol.get("name") != "leave-source-out" else None,
        },
        "checkpoint": str(d.predictor.source), "epoch": meta.epoch, "labels": labels,
        "positive_class": meta.positive, "threshold": meta.threshold, "threshold_log_odds": meta.threshold_log_odds,
        "threshold_text": meta.threshold_text(),
        "operating_point": {"rule": cal.threshold_rule if cal else "default 0.5",
                            "target_sensitivity": cal.target_sensitivity if cal else None,
                            "val_sensitivity": cal.val_sensitivity if cal else None,
                            "val_specificity": cal.val_specificity if cal else None},
        "metrics": headline_metrics(targets, lp, pred, positive), "ci95": ci,
        "metrics_at_0.5": headline_metrics(targets, lp, pred_half, positive),
        "per_class": {lab: per_class[lab] for lab in labels}, "macro_avg": per_class["macro avg"],
        "confusion_matrix": confusion(targets, pred, len(labels)).tolist(),
        "classification_report": report_text,
        "calibration": {"temperature": meta.temperature, "status": cal.status if cal else "not fitted",
                        "warnings": list(cal.warnings) if cal else [],
                        "ece": expected_calibration_error(probs, targets)["ece"]},
        "by_source": breakdown(rows["source"].to_numpy(), targets, lp, pred, meta, groups, cfg.bootstrap, cfg.seed),
        "by_view": breakdown(rows["view"].to_numpy(), targets, lp, pred, meta, groups, cfg.bootstrap, cfg.seed),
        "subgroups": f"per source and per view: Wilson 95% intervals for proportions, patient bootstrap for AUC; "
                     f"flagged 'too few to judge' below {MIN_PER_CLASS} images of a class",
        "scope": None if in_scope is None else {"in_scope": int(in_scope.sum()),
                                                "out_of_scope": int((~in_scope).sum())},
        "estimate": meta.estimate,
        "study_baseline": STUDY_BASELINE,
        "covid_cxr_version": __version__,
    }
    return doc


def _write_outputs(out: Path, result: dict, d: SplitData, lp, pred, scope, in_scope, cfg: EvalConfig) -> None:
    meta: ModelMeta = d.predictor.meta
    labels, targets, rows = list(meta.labels), d.targets, d.rows
    synthetic = bool(result["protocol"]["synthetic_sources"])
    atomic_write(out / "classification_report.txt", result["classification_report"])
    write_json(out / "metrics.json", result)
    preds = rows[["path", "source", "patient_id", "view", "label", "target"]].copy()
    probs = np.exp(lp)
    for i, lab in enumerate(labels):
        preds[f"prob_{lab}"] = probs[:, i]
    if meta.binary:
        preds["log_odds"] = meta.positive_log_odds(lp)
    preds["predicted_label"] = [labels[i] for i in pred]
    if scope is not None:
        preds["scope_score"] = scope
    if in_scope is not None:
        preds["in_scope"] = in_scope
    atomic_write(out / "predictions.csv", preds.to_csv(index=False))
    p = result["protocol"]
    which = "all images" if cfg.split == ALL else f"{cfg.split} split"
    title = (f"{which}, {p['images']} images, {p['patients']} patients; {meta.threshold_text()}"
             + (" - SYNTHETIC DATA" if synthetic else ""))
    confusion_matrix_png(np.asarray(result["confusion_matrix"]), labels, out / "confusion_matrix.png", title)
    m, ci = result["metrics"], result["ci95"].get("roc_auc")
    auc_text = f"AUC {m['roc_auc']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, patient bootstrap)" if ci else "")
    point = None
    if meta.binary and not np.isnan(m.get("specificity", np.nan)):
        point = (1 - m["specificity"], m["sensitivity"], f"operating point ({meta.threshold_text()})")
    roc_png(targets, lp, labels, meta.positive_index, out / "roc.png", title, auc_text, point, synthetic)
    reliability_diagram_png(probs, targets, out / "reliability.png",
                            f"{which}, temperature {meta.temperature:.3g}",
                            mode="positive" if meta.binary and meta.positive_index == 1 else "top_label")
    ds_rows = d.dataset.df[d.dataset.df["target"].isin(labels)]
    class_distribution_png(ds_rows, labels, out / "class_distribution.png")
    samples_png(_sample_grid(rows, d.pixels, labels, cfg.seed), out / "samples.png")


def format_summary(result: dict) -> str:
    """A short human-readable summary for the terminal."""
    m, ci = result["metrics"], result["ci95"]
    names = {"accuracy": "accuracy", "roc_auc": "ROC AUC", "sensitivity": "sensitivity (covid recall)",
             "specificity": "specificity", "ppv": "positive predictive value", "npv": "negative predictive value"}

    def fmt(k: str) -> str:
        v = m.get(k)
        if v is None or v != v:
            return ""
        s = f"  {names[k]:<28} {v:.3f}"
        if k in ci and ci[k][0] == ci[k][0]:
            s += f"  (95% CI {ci[k][0]:.3f}-{ci[k][1]:.3f})"
        return s

    p = result["protocol"]
    lines = []
    if p.get("synthetic_sources"):
        lines.append(f"SYNTHETIC DATA ({', '.join(p['synthetic_sources'])}): these numbers show that the pipeline "
                     "works, not that anything detects COVID-19")
    which = "every split" if p["split"] == ALL else f"the {p['split']} split"
    lines += [f"evaluation of {result['checkpoint']} on {which} of {p['dataset']}: {p['images']} images, "
              f"{p['patients']} patients, sources {', '.join(p['sources'])}",
              f"operating point: {result['threshold_text']}", result["classification_report"].rstrip()]
    lines += [fmt(k) for k in names if k in m]
    half = result.get("metrics_at_0.5", {})
    if result["positive_class"] and "sensitivity" in half and result.get("threshold") is not None:
        lines.append(f"  at P({result['positive_class']}) >= 0.5 instead: sensitivity {half['sensitivity']:.3f}, "
                     f"specificity {half['specificity']:.3f}, accuracy {half['accuracy']:.3f}")
    cal = result.get("calibration")
    if cal:
        lines.append(f"calibration: temperature {cal['temperature']:.3g} ({cal['status']}), ECE (top-label, {ECE_BINS} bins) {cal['ece']:.3f}")
        lines += [f"WARNING: {w}" for w in cal.get("warnings", [])]
    lines += format_breakdown("source", result.get("by_source", {}))
    lines += format_breakdown("view", result.get("by_view", {}))
    if result.get("scope"):
        s = result["scope"]
        lines.append(f"out-of-scope gate: {s['out_of_scope']} of {s['in_scope'] + s['out_of_scope']} images flagged")
    if p.get("internal_split_warning"):
        lines.append(f"note: {p['internal_split_warning']}")
    if result.get("local_validation"):
        lines += format_local(result["local_validation"])
    lines += [f"reports in {result.get('output_dir', '')}", DISCLAIMER]
    return "\n".join(line for line in lines if line)

