"""The model card of an ``export --format hf`` folder: ``README.md`` with YAML front matter.

Generated from the model's :class:`~covid_cxr.model.meta.ModelMeta` (what it is, what it was trained on, its
decision rule, its out-of-source estimate from crossval) and the run's ``eval-test/metrics.json`` (the
internal test results with their patient-bootstrap CIs and protocol). The front matter follows the
Hugging Face model card metadata (``model-index`` results, ``datasets``, ``tags``); every number in it
is also in the text, with the protocol it was measured under. Nothing is invented: a result that was
not measured is said to be missing.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.config import TASKS
from covid_cxr.model.meta import ModelMeta, TrainingData

SOURCE_DATASETS = {
    "cohen": "ieee8023/covid-chestxray-dataset",
    "mooney": "paultimothymooney/chest-xray-pneumonia",
    "radiography": "tawsifurrahman/covid19-radiography-database",
    "actualmed": "agchung/Actualmed-COVID-chestxray-dataset",
    "figure1": "agchung/Figure1-COVID-chestxray-dataset",
}
"""covid-cxr source name -> the public collection's usual identifier (GitHub or Kaggle)."""

METRICS = (("roc_auc", "roc_auc", "ROC AUC"), ("accuracy", "accuracy", "accuracy"),
           ("sensitivity", "recall", "sensitivity (recall of the positive class)"),
           ("specificity", "specificity", "specificity"), ("ppv", "precision", "positive predictive value"),
           ("npv", "npv", "negative predictive value"))
"""(key in metrics.json, model-index metric type, name in words)."""

INTENDED_USE = ("Research on chest X-ray classification methods, teaching, and studying dataset bias and shortcut "
                "learning in the public COVID-19 chest X-ray collections.")


def _lung_lines(meta) -> list[str]:
    """What the card says about a segmenter the model carries (nothing without one)."""
    if meta.lungs is None:
        return []
    dice = f"held-out Dice {meta.lungs.dice:.3f}" if meta.lungs.dice is not None else "Dice not recorded"
    return [f"* Lung fields: the model carries a lung segmenter (U-Net, {meta.lungs.size} px, {dice}); an image "
            "without two plausible lung fields is out of scope whatever the gate says. Dense consolidation can hide "
            "a lung's border: on the public collections this turned away COVID-19 films several times more often "
            "than normal ones (docs/lungs.md, benchmarks/bench_lung_scope.py), so send out-of-scope images to a "
            "person."
            + (f" The classifier sees only the {meta.preprocess.lung_view} lung view." if meta.preprocess.needs_lungs
               else "")]


def out_of_scope_uses(meta: ModelMeta) -> str:
    """The card's out-of-scope uses: the kinds of image named match what the model was trained on (children are
    named only when no training source had children; otherwise the age caveat says why they still are)."""
    data = meta.data or TrainingData(task="", sources=())
    text = ("Diagnosis, triage, screening or any other decision about a patient, or use as a medical device; "
            f"images unlike the training sources ({data.images_out_of_scope()}) without an external validation of "
            "their own; comparing patients or sites by its scores.")
    caveat = data.age_caveat()
    return text + (f" {caveat}" if caveat else "")
LIMITATIONS = (
    "The public COVID-19 collections differ by hospital, scanner, processing and patient age as much as by "
    "disease: a model can learn where an image came from instead of what it shows. The internal test split "
    "comes from the same sources as the training data and overstates performance on a new hospital; the "
    "out-of-source (crossval) estimate, when given, is the number to quote.",
    "Labels come from the collections' metadata, not from a reference standard; some sources' 'normal' "
    "images are children (Kermany/Mooney), the COVID-19 images mostly adults.",
    "Probabilities are calibrated by one temperature fitted on the validation split; they are not calibrated "
    "for another population or prevalence.",
    "Grad-CAM heatmaps show where evidence for a class was found, not why, and are not a localisation of disease.",
)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _r(v: float) -> float:
    return round(float(v), 4)


def datasets_of(meta: ModelMeta) -> list[str]:
    """Identifiers of the public collections the model was trained on (source names when unknown)."""
    if not meta.data:
        return []
    synthetic = set(meta.data.synthetic_sources)
    return [f"{s} (synthetic phantoms, covid-cxr)" if s in synthetic else SOURCE_DATASETS.get(s, s)
            for s in meta.data.sources]


def _task_name(meta: ModelMeta) -> str:
    task = meta.data.task if meta.data else ""
    return TASKS[task].description if task in TASKS else f"chest X-ray classification: {', '.join(meta.labels)}"


def _internal_result(meta: ModelMeta, ev: dict) -> dict:
    p = ev["protocol"]
    ci_text = p.get("confidence_intervals", "")
    metrics = []
    for key, kind, name in METRICS:
        v = ev["metrics"].get(key)
        if not _finite(v):
            continue
        entry: dict[str, Any] = {"type": kind, "value": _r(v), "name": name, "verified": False}
        ci = ev.get("ci95", {}).get(key)
        if ci and all(_finite(c) for c in ci):
            entry["args"] = {"ci95": [_r(ci[0]), _r(ci[1])], "ci_method": ci_text,
                             "operating_point": ev.get("threshold_text")}
        else:
            entry["args"] = {"operating_point": ev.get("threshold_text")}
        metrics.append(entry)
    split_protocol = p.get("split_protocol", {})
    return {"task": {"type": "image-classification", "name": _task_name(meta)},
            "dataset": {"type": "covid-cxr", "name": f"{p['split']} split of {', '.join(p['sources'])} "
                                                      f"({split_protocol.get('name', 'patient')} protocol)",
                        "split": p["split"],
                        "args": {"protocol": split_protocol.get("description", ""), "images": p["images"],
                                 "patients": p["patients"], "images_per_class": p.get("images_per_class"),
                                 "synthetic_sources": p.get("synthetic_sources", [])}},
            "metrics": metrics}


def _estimate_result(meta: ModelMeta, est: dict) -> dict | None:
    auc = est.get("pooled_auc")
    if est.get("source") != "crossval" or not _finite(auc):
        return None
    ci = est.get("ci95")
    entry: dict[str, Any] = {"type": "roc_auc", "value": _r(auc), "name": "ROC AUC on sources held out of training",
                             "verified": False}
    args: dict[str, Any] = {"per_source": {k: _r(v) for k, v in (est.get("per_source") or {}).items() if _finite(v)}}
    if ci and all(_finite(c) for c in ci):
        args["ci95"] = [_r(ci[0]), _r(ci[1])]
    entry["args"] = args
    protocol = est.get("protocol")
    return {"task": {"type": "image-classification", "name": _task_name(meta)},
            "dataset": {"type": "covid-cxr", "name": "leave-one-source-out cross-validation (each source scored by a "
                                                     "model that never saw it)", "split": "held-out sources",
                        "args": {"protocol": protocol if isinstance(protocol, str) else (protocol or {})}},
            "metrics": [entry]}


def front_matter(meta: ModelMeta, evaluation: dict | None, name: str) -> dict:
    """The YAML front matter: library, tags, datasets, and model-index results with their CIs and protocol."""
    results = []
    if evaluation:
        results.append(_internal_result(meta, evaluation))
    if meta.estimate:
        est = _estimate_result(meta, meta.estimate)
        if est:
            results.append(est)
    tags = ["image-classification", "medical-imaging", "chest-x-ray", "covid-19", "research-only",
            "not-for-clinical-use", meta.arch]
    if meta.data and meta.data.synthetic:
        tags.append("synthetic-data")
    doc: dict[str, Any] = {
        "library_name": "covid-cxr", "pipeline_tag": "image-classification", "license": "other",
        "license_name": "research-use-only",
        "tags": tags, "datasets": datasets_of(meta), "metrics": [k for _, k, _ in METRICS],
        "model-index": [{"name": f"covid-cxr-{meta.arch}-{name}", "results": results}],
    }
    return doc


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if _finite(v) else "n/a"


def _results_table(ev: dict) -> str:
    rows = ["| metric | value | 95% CI |", "| --- | --- | --- |"]
    for key, _, name in METRICS:
        v = ev["metrics"].get(key)
        if not _finite(v):
            continue
        ci = ev.get("ci95", {}).get(key)
        ci_text = f"{_fmt(ci[0])}-{_fmt(ci[1])}" if ci and all(_finite(c) for c in ci) else "not computed"
        rows.append(f"| {name} | {_fmt(v)} | {ci_text} |")
    return "\n".join(rows)


def model_card(meta: ModelMeta, evaluation: dict | None, note: str, name: str, onnx: bool) -> str:
    """README.md for an hf export folder."""
    fm = yaml.safe_dump(front_matter(meta, evaluation, name), sort_keys=False, allow_unicode=True, width=100)
    data = meta.data
    synthetic = bool(data and data.synthetic)
    lines = ["---", fm.rstrip(), "---", "", f"# covid-cxr {meta.arch}: {', '.join(meta.labels)}", "",
             f"> **{DISCLAIMER}** Nothing this model outputs may be used to diagnose, triage or treat anyone.", ""]
    if synthetic:
        lines += [f"> **SYNTHETIC DATA.** Trained on synthetic phantoms ({', '.join(data.synthetic_sources)}), not "
                  "patients: every number below shows that the pipeline runs, not that anything detects COVID-19.", ""]
    spec = meta.preprocess
    gate = (f"an out-of-scope gate flags images whose features are unlike the training images (score above "
            f"{meta.gate.threshold:.4g}; {meta.gate.quantile:.0%} of validation images in scope); it is a warning, "
            "not a guarantee" if meta.gate else "no out-of-scope gate")
    lines += ["## Model", "",
              f"* Network: torchvision `{meta.arch}` with a {len(meta.labels)}-class linear head, trained with "
              f"covid-cxr {meta.versions.get('covid_cxr', '?')} (exported with {__version__}); created {meta.created}.",
              f"* Classes (index order): {', '.join(f'{i} = {lab}' for i, lab in enumerate(meta.labels))}; positive "
              f"class: {meta.positive or 'none (argmax)'}.",
              f"* Decision rule: {meta.threshold_text()}"
              + (f" ({meta.calibration.threshold_rule} rule on the validation split)" if meta.calibration else "")
              + f"; temperature {meta.temperature:.4g}"
              + (f" ({meta.calibration.status})" if meta.calibration else "") + ".",
              f"* Preprocessing: {spec.describe()}.",
              f"* Out of scope detection: {gate}.", *_lung_lines(meta), ""]
    if meta.calibration and meta.calibration.warnings:
        lines += ["Calibration warnings:", ""] + [f"* {w}" for w in meta.calibration.warnings] + [""]
    lines += ["## Intended use", "", INTENDED_USE, "", "## Out-of-scope uses", "", out_of_scope_uses(meta), ""]
    lines += ["## Training data", ""]
    if data:
        lines += [f"{data.n_train} training and {data.n_val} validation images, task `{data.task}`, from: "
                  f"{', '.join(datasets_of(meta))}. Split protocol: {data.protocol or 'not recorded'}."
                  + ("" if data.test_split else " Final model: trained on every image except validation (no "
                                                "internal test split)."), ""]
    else:
        lines += ["Not recorded.", ""]
    lines += ["## Evaluation", ""]
    if evaluation:
        p = evaluation["protocol"]
        lines += [f"Internal {p['split']} split: {p['images']} images of {p['patients']} patients from "
                  f"{', '.join(p['sources'])}; {p.get('confidence_intervals', '')}; operating point "
                  f"{evaluation.get('threshold_text')}.", "", _results_table(evaluation), ""]
        if p.get("internal_split_warning"):
            lines += [f"Note: {p['internal_split_warning']}.", ""]
    else:
        lines += [f"Internal test results: {note}.", ""]
    est = meta.estimate or {}
    if est.get("source") == "crossval" and _finite(est.get("pooled_auc")):
        ci = est.get("ci95")
        ci_text = f" (95% CI {_fmt(ci[0])}-{_fmt(ci[1])})" if ci and all(_finite(c) for c in ci) else ""
        per = ", ".join(f"{k} {_fmt(v)}" for k, v in (est.get("per_source") or {}).items())
        lines += [f"Out-of-source estimate (leave-one-source-out crossval): ROC AUC {_fmt(est['pooled_auc'])}{ci_text}"
                  + (f"; per held-out source: {per}" if per else "") + ".", ""]
    elif est.get("note"):
        lines += [f"Out-of-source estimate: {est['note']}.", ""]
    else:
        lines += ["Out-of-source estimate: not measured (see `covid-cxr crossval`): expect lower performance on a "
                  "hospital whose images were not in training.", ""]
    lines += ["## Limitations", ""] + [f"* {t}" for t in LIMITATIONS] + [""]
    lines += ["## How to use", "", "```python", "import covid_cxr", "",
              'model = covid_cxr.load_run("path/to/this/folder")' + ('  # backend="onnx" without PyTorch' if onnx
                                                                     else ""),
              'for r in model.predict(["chest_xray.png"]):',
              "    print(r.label, r.probabilities, r.in_scope)", "```", "",
              "or `covid-cxr predict --run path/to/this/folder IMAGES...`. Images are read as 8-bit grayscale "
              "(PNG, JPEG, DICOM) and preprocessed as above; the same pixels go into every backend.", "",
              "## Files", "",
              "* `model.safetensors`: the weights (`net.*` backbone, `head.*`, `gate.*`) with the model description "
              "in its metadata.",
              "* `config.json`: labels, positive class, decision rule, temperature, preprocessing, gate, architecture.",
              ]
    if onnx:
        lines.append("* `model.onnx`, `model.json`: the same model as an ONNX graph (input `image`, outputs `logits` "
                     "and `scope`) and its metadata, for ONNX Runtime without PyTorch.")
    lines += ["", f"**{DISCLAIMER}**", ""]
    return "\n".join(lines)
