"""``covid-cxr audit``: does a trained model take shortcuts? (in the spirit of DeGrave et al., 2021)

COVID-19 chest X-ray classifiers often score well by recognising *where an image came from*
(hospital, scanner, text markers, borders) instead of lung findings, because the public
COVID-19 and normal images come from different sources. This audit runs a trained model on
its dataset's test split and asks four questions:

(a) **Masking.** ROC AUC on the original images, with the central lung field blacked out
    (:func:`lung_field_mask`) and with only the outer border band kept (:func:`border_mask`),
    each with a 95% patient-bootstrap interval. A model that reads the lungs should fall to
    chance (0.5) on both; an AUC well above 0.5 without the lungs means class information
    outside them (borders, markers, devices, source look).
(b) **Source probe.** A logistic regression on the model's frozen global-average-pooled
    DenseNet features predicting each image's source, cross-validated by patient group,
    against chance (the majority source) and against the label alone.
(c) **Per source.** n, AUC, sensitivity and specificity at the checkpoint threshold per source,
    and which sources contribute only one class (source and label confounded).
(d) **Verdicts** in plain words.

Writes ``RUN_DIR/audit-<split>/audit.json`` and ``masked_examples.png``. Research use only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.config import ConfigError, _default_workers
from covid_cxr.manifest import atomic_write_text
from covid_cxr.metrics import bootstrap_ci, headline_metrics, roc_auc
from covid_cxr.plots import _save
from covid_cxr.predict import probabilities
from covid_cxr.transforms import PreprocessSpec, normalize

log = logging.getLogger(__name__)

LUNG_FIELD_BOX = (0.08, 0.92, 0.06, 0.82)
"""(left, right, top, bottom) of the blacked-out lung field, as fractions of the input side.

One rectangle rather than two ellipses: on a frontal CXR squashed to a square the lungs
span roughly 10-90% of the width and 8-80% of the height, and ellipses would leave the
costophrenic angles (where COVID-19 opacities are common) visible. The rectangle also
hides the mediastinum and heart; what stays visible is the outer frame: shoulders, the
image edges and corners, where text markers and collimation borders usually are."""

BORDER_FRACTION = 0.12
"""Width of the band kept by the border-only test, as a fraction of the side."""

PROBE_MARGIN = 0.05
"""Probe accuracy must beat the label-only baseline by this much to count as encoding the source."""

PROBE_FOLDS = 5


def lung_field_mask(size: int) -> np.ndarray:
    """(size, size) bool, True inside the central lung-field rectangle :data:`LUNG_FIELD_BOX`.

    Pixel (r, c) is inside when its centre ``((c + 0.5) / size, (r + 0.5) / size)`` lies in the box.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    left, right, top, bottom = LUNG_FIELD_BOX
    centres = (np.arange(size) + 0.5) / size
    cols = (centres >= left) & (centres <= right)
    rows = (centres >= top) & (centres <= bottom)
    return rows[:, None] & cols[None, :]


def border_mask(size: int, fraction: float = BORDER_FRACTION) -> np.ndarray:
    """(size, size) bool, True in the outer band ``fraction`` of the side wide (at least 1 pixel)."""
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"fraction must be in (0, 0.5), got {fraction}")
    band = max(1, int(round(fraction * size)))
    keep = np.zeros((size, size), dtype=bool)
    keep[:band], keep[-band:], keep[:, :band], keep[:, -band:] = True, True, True, True
    return keep


def masked_variants(images: np.ndarray) -> dict[str, np.ndarray]:
    """{"original", "lungs_masked", "border_only"} versions of a (N, S, S) uint8 stack of model pixels."""
    size = images.shape[-1]
    return {"original": images, "lungs_masked": black_out(images, lung_field_mask(size)),
            "border_only": black_out(images, ~border_mask(size))}


def black_out(images: np.ndarray, hide: np.ndarray) -> np.ndarray:
    """Copy of (N, S, S) uint8 ``images`` with the pixels where ``hide`` is True set to 0 (black)."""
    if images.shape[1:] != hide.shape:
        raise ValueError(f"mask {hide.shape} does not fit images {images.shape[1:]}")
    out = images.copy()
    out[:, hide] = 0
    return out


@torch.inference_mode()
def forward_stack(model: nn.Module, images: np.ndarray, spec: PreprocessSpec, device: torch.device,
                  batch_size: int = 32, temperature: float = 1.0,
                  features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (N, K) for a (N, S, S) uint8 stack of model pixels, and optionally the frozen
    features (N, C): ``model.features`` -> ReLU -> global average pool, the classifier's input."""
    model.eval()
    pooled: list[torch.Tensor] = []

    def hook(module, inputs, output):
        pooled.append(F.adaptive_avg_pool2d(F.relu(output), 1).flatten(1).float().cpu())

    handle = model.features.register_forward_hook(hook) if features else None
    probs = []
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(torch.from_numpy(images[start:start + batch_size]), spec).to(device)
            probs.append(probabilities(model(x), temperature).cpu())
    finally:
        if handle is not None:
            handle.remove()
    feats = torch.cat(pooled).numpy() if features else None
    return torch.cat(probs).numpy(), feats


def auc_with_ci(targets: np.ndarray, probs: np.ndarray, groups: np.ndarray, threshold: float,
                n_resamples: int, seed: int) -> dict:
    """{"auc", "ci95"}: ROC AUC and its 95% percentile interval from resampling patients (None if 0)."""
    auc = roc_auc(targets, probs)
    ci = bootstrap_ci(targets, probs, groups, threshold, n_resamples, seed)["roc_auc"] if n_resamples else None
    return {"auc": auc, "ci95": ci}


def auc_retained(auc: float, baseline: float) -> float:
    """Share of the above-chance AUC kept: (auc - 0.5) / (baseline - 0.5); NaN if baseline <= 0.5."""
    if math.isnan(auc) or math.isnan(baseline) or baseline <= 0.5:
        return float("nan")
    return float((auc - 0.5) / (baseline - 0.5))


def source_probe(features: np.ndarray, sources: np.ndarray, groups: np.ndarray,
                 targets: np.ndarray | None = None, folds: int = PROBE_FOLDS, seed: int = 0) -> dict:
    """Cross-validated logistic regression predicting the source from frozen features.

    Folds never split a patient group. Compares the accuracy with chance (always guessing the
    majority source) and, when ``targets`` are given, with the best guess from the label alone
    (the majority source within each class): beating that means the features encode the source
    beyond what the label already tells.

    Returns:
        {"skipped": False, "accuracy", "chance", "label_only", "folds", "n", "sources"} or
        {"skipped": True, "reason"} with one source or fewer than two patient groups.
    """
    sources = np.asarray(sources).astype(str)
    groups = np.asarray(groups)
    names, counts = np.unique(sources, return_counts=True)
    per_source = {str(n): int(c) for n, c in zip(names, counts)}
    if len(names) < 2:
        return {"skipped": True, "reason": f"only one source ({', '.join(names)}) in these images; "
                                           "there is nothing to tell apart", "sources": per_source}
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        return {"skipped": True, "reason": "fewer than two patient groups; cannot cross-validate by patient",
                "sources": per_source}
    k = min(folds, n_groups)
    pred = np.empty(len(sources), dtype=object)
    for train, test in GroupKFold(n_splits=k).split(features, sources, groups):
        seen = np.unique(sources[train])
        if len(seen) < 2:  # a fold whose training part has one source can only guess that source
            pred[test] = seen[0]
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
        clf.fit(features[train], sources[train])
        pred[test] = clf.predict(features[test])
    out = {"skipped": False, "accuracy": float(np.mean(pred == sources)), "chance": float(counts.max() / len(sources)),
           "label_only": None, "folds": k, "n": int(len(sources)), "sources": per_source}
    if targets is not None:
        tab = pd.crosstab(np.asarray(targets), sources)
        out["label_only"] = float(tab.max(axis=1).sum() / len(sources))
    return out


def per_source_metrics(sources: np.ndarray, targets: np.ndarray, probs: np.ndarray, labels: list[str],
                       threshold: float) -> list[dict]:
    """One row per source: n, images per class, AUC, sensitivity/specificity (or accuracy) at ``threshold``."""
    rows = []
    for src in sorted(np.unique(sources)):
        idx = np.flatnonzero(sources == src)
        m = headline_metrics(targets[idx], probs[idx], threshold)
        row = {"source": str(src), "n": int(len(idx)),
               "per_class": {lab: int((targets[idx] == i).sum()) for i, lab in enumerate(labels)},
               "roc_auc": m["roc_auc"], "accuracy": m["accuracy"]}
        if len(labels) == 2:
            row.update(sensitivity=m["sensitivity"], specificity=m["specificity"])
        rows.append(row)
    return rows


def source_label_table(df: pd.DataFrame, labels: list[str]) -> dict[str, dict[str, int]]:
    """{source: {class: images}} over the train, val and test splits (the confounding that (c) looks for)."""
    used = df[df["split"].isin(("train", "val", "test")) & df["target"].isin(labels)]
    tab = pd.crosstab(used["source"], used["target"]).reindex(columns=labels, fill_value=0)
    return {str(s): {lab: int(tab.loc[s, lab]) for lab in labels} for s in tab.index}


@dataclass(frozen=True)
class AuditConfig:
    """Options of ``covid-cxr audit``."""

    run: str
    """Run folder written by ``covid-cxr train``."""
    data: str | None = None
    """Dataset folder; default: the one the run was trained on."""
    split: str = "test"
    """Which manifest split to audit."""
    checkpoint: str = "best"
    """'best' or 'last'."""
    bootstrap: int = 500
    """Bootstrap resamples (by patient) for the AUC intervals; 0 disables them."""
    device: str = "auto"
    seed: int = 0
    """Seed of the bootstrap and the probe."""
    batch_size: int = 32
    workers: int = field(default_factory=_default_workers)
    """Processes decoding images."""

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ConfigError("--split must be train, val or test")
        if self.checkpoint not in ("best", "last"):
            raise ConfigError("--checkpoint must be best or last")
        if self.bootstrap < 0 or self.batch_size < 1 or self.workers < 1:
            raise ConfigError("--bootstrap must be >= 0, --batch-size and --workers >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run(cfg: AuditConfig) -> dict:
    """Audit a run on a manifest split; writes audit.json and masked_examples.png; returns audit.json's content."""
    from covid_cxr.evaluate import load_split  # one way to load a run and a split, shared with evaluate

    d = load_split(cfg)
    rt, ckpt_path, model, meta, data_dir, df, rows, images, targets = (
        d.rt, d.ckpt_path, d.model, d.meta, d.data_dir, d.df, d.rows, d.images, d.targets)
    labels, spec, threshold = list(meta["labels"]), meta["preprocess_spec"], float(meta["threshold"])
    temperature = float(meta.get("temperature", 1.0))
    groups, sources = rows["group"].to_numpy(), rows["source"].astype(str).to_numpy()

    variants = masked_variants(images)
    probs, masking, feats = {}, {}, None
    for name, stack in variants.items():
        probs[name], f = forward_stack(model, stack, spec, rt.device, cfg.batch_size, temperature,
                                       features=name == "original")
        feats = f if f is not None else feats
        masking[name] = auc_with_ci(targets, probs[name], groups, threshold, cfg.bootstrap, cfg.seed)
    for name in ("lungs_masked", "border_only"):
        masking[name]["auc_retained"] = auc_retained(masking[name]["auc"], masking["original"]["auc"])

    result = {
        "disclaimer": DISCLAIMER,
        "checkpoint": str(ckpt_path), "dataset": str(Path(data_dir).resolve()), "split": cfg.split,
        "labels": labels, "threshold": threshold,
        "images": int(len(rows)), "patients": int(rows["group"].nunique()),
        "masking": masking,
        "masks": {"lung_field_box": {"left": LUNG_FIELD_BOX[0], "right": LUNG_FIELD_BOX[1],
                                     "top": LUNG_FIELD_BOX[2], "bottom": LUNG_FIELD_BOX[3],
                                     "units": "fraction of the model input side"},
                  "lung_field_area": float(lung_field_mask(spec.size).mean()),
                  "border_fraction": BORDER_FRACTION, "border_area": float(border_mask(spec.size).mean()),
                  "input_size": spec.size},
        "source_probe": source_probe(feats, sources, groups, targets, seed=cfg.seed),
        "per_source": per_source_metrics(sources, targets, probs["original"], labels, threshold),
        "source_label_counts": source_label_table(df, labels),
        "confidence_intervals": f"95% percentile bootstrap, {cfg.bootstrap} resamples of patients (not images)"
        if cfg.bootstrap else "not computed (bootstrap 0)",
        "config": cfg.to_dict(), "covid_cxr_version": __version__,
    }
    result["verdicts"] = verdicts(result)
    out = ckpt_path.parent / f"audit-{cfg.split}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "audit.json", json.dumps(result, indent=2) + "\n")
    pick = _example_indices(targets, len(labels), cfg.seed)
    masked_examples_png([{k: v[i] for k, v in variants.items()} for i in pick],
                        [{k: v[i] for k, v in probs.items()} for i in pick],
                        [f"{labels[targets[i]]} ({sources[i]})" for i in pick], labels, out / "masked_examples.png")
    result["output_dir"] = str(out)
    return result


def _example_indices(targets: np.ndarray, k: int, seed: int) -> list[int]:
    """One image per class (random, seeded), for the triptych."""
    rng = np.random.default_rng(seed)
    return [int(rng.choice(np.flatnonzero(targets == c))) for c in range(k) if (targets == c).any()]


def masked_examples_png(examples: list[dict[str, np.ndarray]], probs: list[dict[str, np.ndarray]],
                        captions: list[str], labels: list[str], path: Path) -> None:
    """One row per example: original, lungs masked, border only, each with P(positive class)."""
    titles = {"original": "original", "lungs_masked": "lung field masked", "border_only": "border only"}
    pos = labels.index("covid") if "covid" in labels else len(labels) - 1
    fig = Figure(figsize=(7.2, 2.8 * len(examples) + 0.4))
    for r, (ex, pr, cap) in enumerate(zip(examples, probs, captions)):
        for c, key in enumerate(titles):
            ax = fig.add_subplot(len(examples), 3, 3 * r + c + 1)
            ax.imshow(ex[key], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{titles[key]}\nP({labels[pos]}) {pr[key][pos]:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(cap, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path)


# ----------------------------------------------------------------------------- verdicts


def _ci_text(ci: list[float] | None, extra: str = "") -> str:
    parts = ([f"95% CI {ci[0]:.2f}-{ci[1]:.2f}"] if ci else []) + ([extra] if extra else [])
    return f" ({'; '.join(parts)})" if parts else ""


def _side_of_chance(auc: float, ci: list[float] | None) -> str:
    """'above', 'below' or 'near' 0.5: by the interval when there is one, else by a 0.1 band."""
    if math.isnan(auc):
        return "undefined"
    lo, hi = ci if ci else (auc - 0.1, auc + 0.1)
    return "above" if lo > 0.5 else "below" if hi < 0.5 else "near"


def _masking_verdict(what: str, outside: str, m: dict) -> str:
    auc, ci = m["auc"], m["ci95"]
    head = f"AUC {what} is {auc:.2f}{_ci_text(ci)}"
    side = _side_of_chance(auc, ci)
    if side == "above":
        kept = m.get("auc_retained")
        kept_text = "" if kept is None or math.isnan(kept) else f"; it keeps {kept:.0%} of its above-chance AUC"
        return (f"{head}: above chance (0.5), so the model finds class information in {outside} "
                f"(borders, text markers, devices, source-specific appearance){kept_text}. Treat its accuracy "
                "with suspicion until that is explained.")
    if side == "below":
        return (f"{head}: below chance; the masked images are unlike anything seen in training and push the "
                f"predictions the wrong way, which still means no usable class information in {outside}.")
    if side == "near":
        return (f"{head}: near chance (0.5), so this test finds no class information in {outside} "
                "(which does not show that the model uses the right findings inside the lungs).")
    return f"{head}: undefined (the split lacks one of the classes)."


def verdicts(result: dict) -> list[str]:
    """Plain-language conclusions from an audit result (see :func:`run`)."""
    out = []
    m = result["masking"]
    orig = m["original"]
    counts = f"{result['images']} images, {result['patients']} patients"
    out.append(f"AUC on the original {result['split']} images is {orig['auc']:.2f}{_ci_text(orig['ci95'], counts)}.")
    out.append(_masking_verdict("with the central lung field masked", "the image outside the lung fields",
                                m["lungs_masked"]))
    band = f"{result['masks']['border_fraction']:.0%}"
    out.append(_masking_verdict(f"with only the outer {band} border band visible", "the image border",
                                m["border_only"]))
    probe = result["source_probe"]
    if probe["skipped"]:
        out.append(f"Source probe skipped: {probe['reason']}.")
    else:
        base = f"source can be predicted from the model's features with {probe['accuracy']:.2f} accuracy " \
               f"(cross-validated by patient) vs {probe['chance']:.2f} chance (majority source)"
        label_only = probe["label_only"]
        if label_only is not None:
            base += f" and {label_only:.2f} from the label alone"
            beyond = probe["accuracy"] > label_only + PROBE_MARGIN
        else:
            beyond = probe["accuracy"] > probe["chance"] + PROBE_MARGIN
        out.append(base[0].upper() + base[1:] + (
            ": the features encode where an image came from, beyond its label, which a classifier can use as a "
            "shortcut." if beyond else ": no clear sign that the features encode the source beyond the label."))
    for src, counts in result["source_label_counts"].items():
        present = [lab for lab, n in counts.items() if n]
        if len(present) == 1 and len(result["source_label_counts"]) > 1:
            out.append(f"Source {src} contributes only '{present[0]}' images ({counts[present[0]]}): source and "
                       "label are confounded, so anything that identifies this source also predicts the label.")
    for row in result["per_source"]:
        if len(result["per_source"]) < 2:
            break
        if "sensitivity" in row:
            out.append(f"On {row['source']} ({row['n']} images): AUC {_fmt(row['roc_auc'])}, sensitivity "
                       f"{_fmt(row['sensitivity'])}, specificity {_fmt(row['specificity'])} at threshold "
                       f"{result['threshold']:.2f}.")
    return out


def _fmt(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.2f}"


def format_summary(result: dict) -> str:
    """A short human-readable summary for the terminal: the verdicts, where the files are, the disclaimer."""
    lines = [f"shortcut audit of {result['checkpoint']} on split {result['split']!r}:"]
    lines += [f"- {v}" for v in result["verdicts"]]
    lines += [f"reports in {result.get('output_dir', '')}", DISCLAIMER]
    return "\n".join(lines)
