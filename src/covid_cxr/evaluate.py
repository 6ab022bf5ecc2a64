"""``covid-cxr evaluate``: metrics, the study's classification report and pictures for one split.

Writes ``RUN_DIR/eval-<split>/``: classification_report.txt, metrics.json,
predictions.csv, confusion_matrix.png, roc.png, class_distribution.png, samples.png.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.data import DataLoader

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.config import EvalConfig
from covid_cxr.data import EpochSampler, StackDataset, load_rows
from covid_cxr.errors import DatasetError
from covid_cxr.manifest import atomic_write_text, read_manifest
from covid_cxr.metrics import bootstrap_ci, confusion, headline_metrics, per_class_report, predicted_labels
from covid_cxr.model import load_checkpoint, resolve_checkpoint
from covid_cxr.plots import class_distribution_png, confusion_matrix_png, roc_png, samples_png
from covid_cxr.runtime import Runtime, setup_runtime
from covid_cxr.calibration import expected_calibration_error, reliability_diagram_png
from covid_cxr.predict import probabilities
from covid_cxr.train import predict_loader

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


def _dataset_dir(cfg: EvalConfig, meta: dict) -> Path:
    if cfg.data:
        return Path(cfg.data)
    run_cfg = Path(cfg.run) / "config.yaml"
    data = meta.get("config", {}).get("data")
    if not data and run_cfg.is_file():
        data = yaml.safe_load(run_cfg.read_text()).get("data")
    if not data:
        raise DatasetError(f"cannot tell which dataset {cfg.run} was trained on; pass --data DATASET_DIR")
    return Path(data)


def _sample_grid(rows: pd.DataFrame, images: np.ndarray, labels: list[str], seed: int, per_class: int = 6):
    rng = np.random.default_rng(seed)
    grid = {}
    for lab in labels:
        idx = np.flatnonzero(rows["target"].to_numpy() == lab)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        grid[lab] = [(images[i], f"{rows['source'].iloc[i]}") for i in pick]
    return grid


@dataclass
class SplitData:
    """A run's model and one manifest split's images, as evaluate and audit both need them."""

    rt: Runtime
    ckpt_path: Path
    model: torch.nn.Module
    meta: dict
    data_dir: Path
    df: pd.DataFrame
    dmeta: dict
    rows: pd.DataFrame
    images: np.ndarray
    targets: np.ndarray


def load_split(cfg) -> SplitData:
    """Load ``cfg.run``'s checkpoint and the model pixels of ``cfg.split`` (``cfg`` has run, data, split,
    checkpoint, device, workers). Every image is decoded; an unreadable one stops with its name.

    Raises:
        DatasetError: the dataset's labels differ from the model's, or the split is empty.
    """
    rt = setup_runtime(cfg.device)
    ckpt_path = resolve_checkpoint(cfg.run, cfg.checkpoint)
    model, meta = load_checkpoint(ckpt_path, rt.device)
    labels, spec = list(meta["labels"]), meta["preprocess_spec"]
    data_dir = _dataset_dir(cfg, meta)
    df, dmeta = read_manifest(data_dir)
    if list(dmeta["labels"]) != labels:
        raise DatasetError(f"{data_dir} has labels {dmeta['labels']} but the model predicts {labels}")
    rows = df[(df["split"] == cfg.split) & df["target"].isin(labels)].reset_index(drop=True)
    if rows.empty:
        raise DatasetError(f"{data_dir}/manifest.csv has no {cfg.split!r} images")
    images = load_rows(rows, data_dir, spec, workers=max(1, cfg.workers))
    targets = rows["target"].map({lab: i for i, lab in enumerate(labels)}).to_numpy()
    return SplitData(rt, ckpt_path, model, meta, data_dir, df, dmeta, rows, images, targets)


def run(cfg: EvalConfig) -> dict:
    """Evaluate a run's checkpoint on a manifest split and write the reports; returns metrics.json's content."""
    d = load_split(cfg)
    rt, ckpt_path, model, meta, data_dir, df, dmeta, rows, images, targets = (
        d.rt, d.ckpt_path, d.model, d.meta, d.data_dir, d.df, d.dmeta, d.rows, d.images, d.targets)
    labels, spec, threshold = list(meta["labels"]), meta["preprocess_spec"], float(meta["threshold"])
    loader = DataLoader(StackDataset(images, targets, spec), batch_size=cfg.batch_size,
                        sampler=EpochSampler(targets, 0, shuffle=False), num_workers=0)
    with torch.inference_mode():
        logits, _ = predict_loader(model, loader, rt.device)
    probs = probabilities(torch.from_numpy(logits), float(meta.get("temperature", 1.0))).numpy()
    out = Path(cfg.run) / f"eval-{cfg.split}"
    out.mkdir(parents=True, exist_ok=True)
    result = _metrics(cfg, rows, targets, probs, labels, threshold, data_dir, dmeta, ckpt_path, meta)
    result["calibration"] = {"temperature": float(meta.get("temperature", 1.0)),
                             "fitted_on_validation": meta.get("calibration"),
                             "ece": expected_calibration_error(probs, targets)["ece"]}
    reliability_diagram_png(probs, targets, out / "reliability.png",
                            f"{cfg.split} split, temperature {result['calibration']['temperature']:.2f}")
    result["by_source"] = breakdown(rows["source"].to_numpy(), targets, probs, threshold, labels)
    result["by_view"] = breakdown(rows["view"].to_numpy(), targets, probs, threshold, labels)
    _write_outputs(out, result, rows, targets, probs, labels, threshold, df, images, cfg)
    result["output_dir"] = str(out)
    return result


def breakdown(keys: np.ndarray, targets: np.ndarray, probs: np.ndarray, threshold: float, labels: list[str]) -> dict:
    """Metrics per value of ``keys`` (source or view), with counts: one pooled number can hide a model
    that only works on one hospital's images."""
    positive = labels.index("covid") if "covid" in labels else 1
    out = {}
    for key in sorted(set(keys)):
        m = keys == key
        h = headline_metrics(targets[m], probs[m], threshold, positive)
        out[str(key)] = {"n": int(m.sum()), "n_covid": int((targets[m] == positive).sum()),
                         **{k: h[k] for k in ("accuracy", "roc_auc", "sensitivity", "specificity")}}
    return out


def _metrics(cfg, rows, targets, probs, labels, threshold, data_dir, dmeta, ckpt_path, meta) -> dict:
    pred = predicted_labels(probs, threshold)
    report_text, per_class = per_class_report(targets, pred, labels)
    positive = labels.index("covid") if "covid" in labels else 1
    headline = headline_metrics(targets, probs, threshold, positive)
    at_half = headline_metrics(targets, probs, 0.5, positive)
    ci = bootstrap_ci(targets, probs, rows["group"].to_numpy(), threshold, cfg.bootstrap,
                      seed=cfg.seed) if cfg.bootstrap else {}
    return {
        "disclaimer": DISCLAIMER,
        "protocol": {
            "dataset": str(Path(data_dir).resolve()), "task": dmeta.get("task"), "split": cfg.split,
            "split_protocol": dmeta.get("protocol"),
            "sources": sorted(rows["source"].unique().tolist()),
            "images": int(len(rows)), "patients": int(rows["group"].nunique()),
            "images_per_class": {lab: int((targets == i).sum()) for i, lab in enumerate(labels)},
            "images_per_source": {k: int(v) for k, v in rows["source"].value_counts().items()},
            "confidence_intervals": f"95% percentile bootstrap, {cfg.bootstrap} resamples of patients (not images)"
            if cfg.bootstrap else "not computed (--bootstrap 0)",
        },
        "checkpoint": str(ckpt_path), "epoch": meta.get("epoch"), "labels": labels,
        "positive_class": labels[1] if len(labels) == 2 else None,
        "threshold": threshold,
        "operating_point": (meta.get("calibration") or {}).get("operating_point",
                                                              {"rule": "default 0.5 (no validation calibration)"}),
        "metrics": headline, "ci95": ci, "metrics_at_0.5": at_half,
        "per_class": {lab: per_class[lab] for lab in labels},
        "macro_avg": per_class["macro avg"],
        "confusion_matrix": confusion(targets, pred, len(labels)).tolist(),
        "classification_report": report_text,
        "study_baseline": STUDY_BASELINE,
        "covid_cxr_version": __version__,
    }


def _write_outputs(out: Path, result: dict, rows, targets, probs, labels, threshold, df, images, cfg) -> None:
    atomic_write_text(out / "classification_report.txt", result["classification_report"])
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    preds = rows[["path", "source", "patient_id", "view", "label", "target"]].copy()
    for i, lab in enumerate(labels):
        preds[f"prob_{lab}"] = probs[:, i]
    preds["predicted_label"] = [labels[i] for i in predicted_labels(probs, threshold)]
    atomic_write_text(out / "predictions.csv", preds.to_csv(index=False))
    m = result["metrics"]
    title = (f"{cfg.split} split, {result['protocol']['images']} images, {result['protocol']['patients']} patients, "
             f"threshold {threshold:.2f}")
    confusion_matrix_png(np.asarray(result["confusion_matrix"]), labels, out / "confusion_matrix.png", title)
    ci = result["ci95"].get("roc_auc")
    auc_text = f"AUC {m['roc_auc']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, patient bootstrap)" if ci else "")
    roc_png(targets, probs, labels, out / "roc.png", title, auc_text)
    class_distribution_png(df[df["target"].isin(labels)], labels, out / "class_distribution.png")
    samples_png(_sample_grid(rows, images, labels, cfg.seed), out / "samples.png")


def format_summary(result: dict) -> str:
    """A short human-readable summary for the terminal."""
    m, ci = result["metrics"], result["ci95"]

    def fmt(k: str) -> str:
        v = m.get(k)
        if v is None:
            return ""
        s = f"{k:<12} {v:.3f}"
        if k in ci:
            s += f"  (95% CI {ci[k][0]:.3f}-{ci[k][1]:.3f})"
        return s

    p = result["protocol"]
    lines = [f"evaluation of {result['checkpoint']} on split {p['split']!r}: {p['images']} images, "
             f"{p['patients']} patients, sources {', '.join(p['sources'])}",
             f"threshold {result['threshold']:.3f} on P({result['positive_class']})" if result["positive_class"] else "",
             result["classification_report"].rstrip()]
    lines += [fmt(k) for k in ("accuracy", "roc_auc", "sensitivity", "specificity", "ppv", "npv") if k in m]
    half = result.get("metrics_at_0.5", {})
    if "sensitivity" in half and result["positive_class"]:
        lines.append(f"at threshold 0.5: sensitivity {half['sensitivity']:.3f}, specificity {half['specificity']:.3f},"
                     f" accuracy {half['accuracy']:.3f}")
    cal = result.get("calibration")
    if cal:
        lines.append(f"calibration: temperature {cal['temperature']:.2f}, ECE {cal['ece']:.3f}")
    for name, b in result.get("by_source", {}).items():
        auc = "n/a" if b["roc_auc"] != b["roc_auc"] else f"{b['roc_auc']:.3f}"
        lines.append(f"  source {name:<14} n={b['n']:<4} covid={b['n_covid']:<4} AUC {auc:<6} "
                     f"sens {b['sensitivity']:.3f} spec {b['specificity']:.3f}")
    lines += [f"reports in {result.get('output_dir', '')}", DISCLAIMER]
    return "\n".join(line for line in lines if line)
