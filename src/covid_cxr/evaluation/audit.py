"""``covid-cxr audit``: does a trained model take shortcuts? (in the spirit of DeGrave et al., 2021)

COVID-19 chest X-ray classifiers often score well by recognising *where an image came from*
(hospital, scanner, text markers, borders) instead of lung findings, because the public
COVID-19 and normal images come from different sources. This audit runs a trained model on
its dataset's test split and asks four questions:

(a) **Masking.** ROC AUC on the original images, with each image's predicted lung fields blacked out (a lung
    segmenter: ``--lungs``, or the model's own; without one the central rectangle :func:`lung_field_mask`) and
    with only the outer border band kept (:func:`border_mask`),
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

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.evaluation.metrics import auc_with_ci, breakdown, patient_resamples, with_ci
from covid_cxr.evaluation.options import AuditConfig
from covid_cxr.evaluation.split import load_split
from covid_cxr.figures import save_figure
from covid_cxr.files import write_json
from covid_cxr.model.meta import ModelMeta, format_probability

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


def masked_variants(images: np.ndarray, lungs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{"original", "lungs_masked", "border_only"} versions of a (N, S, S) uint8 stack of model pixels.

    ``lungs``: (N, S, S) bool, each image's own lung fields to hide (predicted); None: the central rectangle
    :data:`LUNG_FIELD_BOX` for every image."""
    size = images.shape[-1]
    if lungs is None:
        masked = black_out(images, lung_field_mask(size))
    else:
        if lungs.shape != images.shape:
            raise ValueError(f"lung masks {lungs.shape} do not fit images {images.shape}")
        masked = np.where(lungs, np.uint8(0), images)
    return {"original": images, "lungs_masked": masked, "border_only": black_out(images, ~border_mask(size))}


def predicted_lungs(d, cfg) -> tuple[np.ndarray | None, dict]:
    """Each image's predicted lung fields (N, S, S) for the lungs-masked test, and how they were found: by
    ``--lungs``, else by the segmenter the model carries, else None (the rectangle). An image whose mask is
    implausible gets the rectangle instead (counted)."""
    size = d.pixels.shape[-1]
    rectangle = {"method": "rectangle", "box": dict(zip(("left", "right", "top", "bottom"), LUNG_FIELD_BOX)),
                 "note": "no lung segmenter: pass --lungs, or train with --lungs, to hide each image's own lungs"}
    net, origin = None, None
    if cfg.lungs:
        from covid_cxr.model.lungs import load_segmenter

        seg = load_segmenter(cfg.lungs)
        net, origin = seg.model, getattr(seg, "description", None) or str(cfg.lungs)
    elif d.predictor.backend == "torch" and getattr(d.predictor.model, "lungs", None) is not None:
        net, origin = d.predictor.model.lungs, "the model's own segmenter (train --lungs)"
    if net is None:
        return None, rectangle
    from covid_cxr.model.lungs import lung_masks_of

    found = lung_masks_of(net, list(d.pixels), d.predictor.device if origin.startswith("the model") else "cpu")
    box = lung_field_mask(size)
    masks = np.stack([m.mask if m.check.plausible else box for m in found])
    fallback = sum(not m.check.plausible for m in found)
    method = {"method": "predicted", "segmenter": origin, "images": len(found),
              "implausible_used_rectangle": int(fallback), "mean_area": round(float(masks.mean()), 4)}
    predictor = getattr(d, "predictor", None)  # with --lungs only the pixels are needed
    view = predictor.meta.preprocess.lung_view if predictor is not None else "none"
    if view != "none":
        method["lung_view"] = (f"the model sees the {view!r} lung view (the lung fields' box): these masks were "
                               "found on that view, so the border outside them is the crop's margin")
    return masks, method


def gradcam_in_lungs(d, lungs: np.ndarray | None, lung_method: dict, bootstrap: int, seed: int) -> dict | None:
    """The share of each image's Grad-CAM mass (of the positive class) that falls inside its lung fields (the
    predicted ones, else the fixed rectangle), per true class, with a patient-bootstrap 95% CI; beside it the
    share a heatmap spread evenly over the image would give (the region's area). None for the ONNX backend or a
    model without a positive class (Grad-CAM needs the PyTorch checkpoint)."""
    meta = d.predictor.meta
    if d.predictor.backend != "torch" or meta.positive_index is None:
        return None
    import torch

    from covid_cxr.imaging.pixels import finish
    from covid_cxr.model.gradcam import grad_cam

    size = d.pixels.shape[-1]
    region = lungs if lungs is not None else np.broadcast_to(lung_field_mask(size), d.pixels.shape)
    shares = np.full(len(d.pixels), np.nan)
    log.info("audit: Grad-CAM of %d images (share of the heatmap inside the %s)", len(d.pixels),
             "predicted lungs" if lungs is not None else "lung-field rectangle")
    for i, px in enumerate(d.pixels):
        x = torch.from_numpy(finish(px, meta.preprocess))[None].to(d.predictor.device)
        h = grad_cam(d.predictor.model, x, meta.positive_index)
        total = float(h.sum(dtype=np.float64))
        if total > 0:
            shares[i] = float((h * region[i]).sum(dtype=np.float64) / total)
    groups = d.rows["group"].to_numpy()
    per_class = {}
    for k, lab in enumerate(meta.labels):
        idx = np.flatnonzero((d.targets == k) & np.isfinite(shares))
        if not len(idx):
            per_class[lab] = {"n": 0, "mean": None, "ci95": None}
            continue
        means = [float(shares[idx][r].mean()) for r in patient_resamples(groups[idx], bootstrap, seed)]
        per_class[lab] = {"n": int(len(idx)), "mean": round(float(shares[idx].mean()), 4),
                          "ci95": [round(float(np.quantile(means, 0.025)), 4), round(float(np.quantile(means, 0.975)),
                                                                                   4)] if means else None,
                          "area": round(float(region[idx].mean()), 4)}
    return {"target": meta.positive, "region": "predicted lungs" if lungs is not None else "lung-field rectangle",
            "segmenter": lung_method.get("segmenter"), "per_class": per_class,
            "no_heatmap": int(np.isnan(shares).sum()),
            "note": f"share of the Grad-CAM mass of P({meta.positive}) inside each image's lung fields, mean per true "
                    "class with a patient-bootstrap 95% CI; 'area' is what a heatmap spread evenly would give"}


def black_out(images: np.ndarray, hide: np.ndarray) -> np.ndarray:
    """Copy of (N, S, S) uint8 ``images`` with the pixels where ``hide`` is True set to 0 (black)."""
    if images.shape[1:] != hide.shape:
        raise ValueError(f"mask {hide.shape} does not fit images {images.shape[1:]}")
    out = images.copy()
    out[:, hide] = 0
    return out


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
    log.info("audit: source probe: can the model's features tell %d sources apart? (logistic regression, %d folds "
             "that keep each patient's images together)", len(names), k)
    for i, (train, test) in enumerate(GroupKFold(n_splits=k).split(features, sources, groups), 1):
        log.info("audit: source probe fold %d/%d", i, k)
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


def per_source_metrics(sources: np.ndarray, targets: np.ndarray, lp: np.ndarray, pred: np.ndarray,
                       meta: ModelMeta, groups: np.ndarray | None = None, n_resamples: int = 0,
                       seed: int = 0) -> list[dict]:
    """One row per source: n, images per class, and the source's metrics at the model's threshold with their CIs
    and a "too few to judge" flag (:func:`covid_cxr.evaluation.evaluate.breakdown`, the one subgroup rule)."""
    rows = []
    log.info("audit: metrics for each of %d sources%s", len(np.unique(sources)),
             f" with {n_resamples} patient bootstrap resamples each" if n_resamples else "")
    table = breakdown(sources, targets, lp, pred, meta, groups, n_resamples, seed)
    for src in sorted(np.unique(sources)):
        idx = np.flatnonzero(sources == src)
        row = {"source": str(src), "per_class": {lab: int((targets[idx] == i).sum()) for i, lab in enumerate(meta.labels)},
               **table[str(src)]}
        if not meta.binary:  # sensitivity/specificity are shown for two classes only
            for k in ("sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95"):
                row.pop(k, None)
        rows.append(row)
    return rows


def source_label_table(df: pd.DataFrame, labels: list[str]) -> dict[str, dict[str, int]]:
    """{source: {class: images}} over the train, val and test splits (the confounding that (c) looks for)."""
    used = df[df["split"].isin(("train", "val", "test")) & df["target"].isin(labels)]
    tab = pd.crosstab(used["source"], used["target"]).reindex(columns=labels, fill_value=0)
    return {str(s): {lab: int(tab.loc[s, lab]) for lab in labels} for s in tab.index}


def run(cfg: AuditConfig) -> dict:
    """Audit a run on a manifest split; writes audit.json and masked_examples.png; returns audit.json's content."""
    d = load_split(cfg.run, cfg.split, cfg.data, cfg.checkpoint, cfg.device, cfg.workers, cfg.source_roots)
    meta = d.predictor.meta
    labels, targets, rows = list(meta.labels), d.targets, d.rows
    groups, sources = rows["group"].to_numpy(), rows["source"].astype(str).to_numpy()
    positive = meta.positive_index

    lungs, lung_method = predicted_lungs(d, cfg)
    variants = masked_variants(d.pixels, lungs)
    lps, masking, feats, preds = {}, {}, None, {}
    for name, stack in variants.items():
        log.info("audit: scoring %d %s images (%s)%s", len(stack), cfg.split, name.replace("_", " "),
                 f", {cfg.bootstrap} bootstrap resamples" if cfg.bootstrap else "")
        out = d.predictor.outputs(stack, cfg.batch_size, features=name == "original", lungs=d.lungs)
        feats = out.features if out.features is not None else feats
        lps[name] = meta.log_probs(out.logits)
        preds[name] = meta.decide(lps[name])
        masking[name] = auc_with_ci(targets, lps[name], groups, positive, cfg.bootstrap, cfg.seed)
    for name in ("lungs_masked", "border_only"):
        masking[name]["auc_retained"] = auc_retained(masking[name]["auc"], masking["original"]["auc"])

    out_dir = d.run.audit_dir(cfg.split)
    result = {
        "disclaimer": DISCLAIMER,
        "checkpoint": str(d.predictor.source), "dataset": str(d.dataset.dir.root.resolve()), "split": cfg.split,
        "synthetic_sources": [s for s in d.dataset.info.synthetic_sources if s in set(sources)],
        "labels": labels, "positive_class": meta.positive, "threshold": meta.threshold,
        "threshold_text": meta.threshold_text(),
        "images": int(len(rows)), "patients": int(rows["group"].nunique()),
        "scores": "AUCs are computed on float64 log-odds from the logits, so confident images are never tied",
        "masking": masking,
        "masks": {"lung_fields": lung_method,
                  "lung_field_box": {"left": LUNG_FIELD_BOX[0], "right": LUNG_FIELD_BOX[1],
                                     "top": LUNG_FIELD_BOX[2], "bottom": LUNG_FIELD_BOX[3],
                                     "units": "fraction of the model input side"},
                  "lung_field_area": (lung_method["mean_area"] if lungs is not None
                                      else float(lung_field_mask(meta.preprocess.size).mean())),
                  "border_fraction": BORDER_FRACTION, "border_area": float(border_mask(meta.preprocess.size).mean()),
                  "input_size": meta.preprocess.size},
        "gradcam_in_lungs": gradcam_in_lungs(d, lungs, lung_method, cfg.bootstrap, cfg.seed),
        "source_probe": source_probe(feats, sources, groups, targets, seed=cfg.seed),
        "per_source": per_source_metrics(sources, targets, lps["original"], preds["original"], meta, groups,
                                         cfg.bootstrap, cfg.seed),
        "source_label_counts": source_label_table(d.dataset.df, labels),
        "confidence_intervals": f"95% percentile bootstrap, {cfg.bootstrap} resamples of patients (not images)"
        if cfg.bootstrap else "not computed (bootstrap 0)",
        "config": cfg.to_dict(), "covid_cxr_version": __version__,
        "output_dir": str(out_dir), "examples_png": "masked_examples.png",
    }
    result["verdicts"] = verdicts(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    pick = _example_indices(targets, len(labels), cfg.seed)
    masked_examples_png([{k: v[i] for k, v in variants.items()} for i in pick],
                        [{k: np.exp(v[i]) for k, v in lps.items()} for i in pick],
                        [f"{labels[targets[i]]} ({sources[i]})" for i in pick], meta, out_dir / "masked_examples.png",
                        synthetic=bool(result["synthetic_sources"]))
    write_json(out_dir / "audit.json", result)
    return result


def _example_indices(targets: np.ndarray, k: int, seed: int) -> list[int]:
    """One image per class (random, seeded), for the triptych."""
    rng = np.random.default_rng(seed)
    return [int(rng.choice(np.flatnonzero(targets == c))) for c in range(k) if (targets == c).any()]


def masked_examples_png(examples: list[dict[str, np.ndarray]], probs: list[dict[str, np.ndarray]],
                        captions: list[str], meta: ModelMeta, path: Path, synthetic: bool = False) -> None:
    """One row per example: original, lungs masked, border only, each with P(positive class)."""
    titles = {"original": "original", "lungs_masked": "lung field masked", "border_only": "border only"}
    labels = list(meta.labels)
    pos = meta.positive_index if meta.positive_index is not None else len(labels) - 1
    fig = Figure(figsize=(7.2, 2.8 * len(examples) + 0.4))
    for r, (ex, pr, cap) in enumerate(zip(examples, probs, captions)):
        for c, key in enumerate(titles):
            ax = fig.add_subplot(len(examples), 3, 3 * r + c + 1)
            ax.imshow(ex[key], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{titles[key]}\nP({labels[pos]}) {format_probability(pr[key][pos])}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(cap, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path, synthetic)


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
    which = "images of every split" if result["split"] == "all" else f"{result['split']} images"
    out.append(f"AUC on the original {which} is {orig['auc']:.2f}{_ci_text(orig['ci95'], counts)}.")
    how = result["masks"].get("lung_fields", {}).get("method", "rectangle")
    out.append(_masking_verdict("with each image's predicted lung fields masked" if how == "predicted"
                                else "with the central lung field masked (a fixed rectangle, not each image's lungs)",
                                "the image outside the lung fields", m["lungs_masked"]))
    cam = result.get("gradcam_in_lungs")
    if cam:
        parts = [f"{lab} {with_ci(r['mean'], r['ci95'], 2)} (even spread: {r['area']:.2f}, {r['n']} images)"
                 for lab, r in cam["per_class"].items() if r["mean"] is not None]
        if parts:
            out.append(f"Share of the Grad-CAM mass of P({cam['target']}) inside the {cam['region']}, by true class: "
                       + "; ".join(parts) + ". Above the even spread, the heatmap concentrates on the lungs; at or "
                       "below it, the model's evidence lies as much outside them.")
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
            out.append(f"On {row['source']} ({row['n']} images): AUC {with_ci(row['roc_auc'], row.get('roc_auc_ci95'), 2)}, "
                       f"sensitivity {with_ci(row['sensitivity'], row.get('sensitivity_ci95'), 2)}, specificity "
                       f"{with_ci(row['specificity'], row.get('specificity_ci95'), 2)} at {result['threshold_text']}"
                       + (f"; {row['caveat']}." if row.get("caveat") else "."))
    return out


