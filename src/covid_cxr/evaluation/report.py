"""``covid-cxr report``: one self-contained HTML file (images embedded) per run.

It gathers what train, evaluate, audit, crossval and data build wrote, so a reader sees in one place
how good the model is, how sure we are, how it should do on a hospital it has not seen, and whether
it learned the disease. Synthetic data get a banner on every screen of the page.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pandas as pd

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.config import UNLEARNED_OPTIONS
from covid_cxr.errors import CovidCxrError
from covid_cxr.evaluation.calibration import ECE_BINS
from covid_cxr.evaluation.evaluate import STUDY_BASELINE
from covid_cxr.evaluation.local import expected_text, local_section
from covid_cxr.evaluation.metrics import with_ci
from covid_cxr.evaluation.options import AuditConfig, EvalConfig, ReportConfig
from covid_cxr.evaluation.page import METRIC_NAMES
from covid_cxr.evaluation.page import breakdown_table as _breakdown
from covid_cxr.evaluation.page import esc as _esc
from covid_cxr.evaluation.page import fmt as _fmt
from covid_cxr.evaluation.page import img as _img
from covid_cxr.evaluation.page import table as _table
from covid_cxr.evaluation.recalibrate import RECALIBRATION_PNG
from covid_cxr.files import atomic_write, read_json
from covid_cxr.model.inference import Predictor, load_predictor
from covid_cxr.model.meta import ModelMeta, TrainingData
from covid_cxr.paths import RunDir

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:0 auto;padding:0 16px 40px;
color:#1d2330;line-height:1.45}
.banner{background:#b3261e;color:#fff;padding:10px 14px;font-weight:600;border-radius:0 0 6px 6px;position:sticky;top:0;z-index:2}
.synthetic{background:#6b21a8;color:#fff;padding:10px 14px;font-weight:700;margin-top:6px;border-radius:6px}
h1{margin:.6em 0 .2em}h2{border-bottom:2px solid #e3e6ee;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;margin:8px 0;font-size:14px}td,th{border:1px solid #d5d9e3;padding:4px 8px;text-align:right}
th{background:#f2f4f8}td:first-child,th:first-child{text-align:left}
.side{display:flex;gap:24px;flex-wrap:wrap}.side>div{flex:1;min-width:320px}
pre{background:#f6f7fa;padding:10px;border-radius:6px;font-size:13px;overflow-x:auto}
img{max-width:100%;border:1px solid #e3e6ee;border-radius:4px}.grid{display:flex;flex-wrap:wrap;gap:12px}
.grid figure{margin:0;width:340px}.grid figcaption{font-size:12px;color:#555}
.cams figure{width:100%;max-width:660px}.cams img{width:100%}
.warn{background:#fff4e5;border-left:4px solid #f59e0b;padding:6px 10px;margin:6px 0}
.conf{background:#fdecea;border-left:4px solid #b3261e;padding:6px 10px;margin:6px 0}
.estimate{background:#e8f0fe;border-left:4px solid #1a56db;padding:8px 12px;margin:8px 0;font-size:15px}
.muted{color:#666;font-size:13px}
"""

# ----------------------------------------------------------------------------- inputs

def _of_other_data(dataset: str | None, cfg: ReportConfig, run: RunDir) -> bool:
    """An evaluation or audit was written for another dataset than the one asked for (it is then made again):
    ``--data``, else the run's own (an ``eval-all`` of a hospital's dataset is not the report of the training data)."""
    if cfg.data:
        wanted = Path(cfg.data)
    else:
        try:
            wanted = run.dataset().root
        except CovidCxrError:  # the run's dataset is not here: evaluate could not run again; report what there is
            return False
    return dataset != str(wanted.resolve())


def _ensure_eval(run: RunDir, cfg: ReportConfig) -> dict:
    path = run.eval_dir(cfg.split) / "metrics.json"
    if path.is_file():
        doc = read_json(path, "evaluation")
        if not _of_other_data(doc.get("protocol", {}).get("dataset"), cfg, run):
            return doc
        log.info("%s is of another dataset than %s; running evaluate again", path,
                 "--data" if cfg.data else "the run's own")
    else:
        log.info("no %s; running evaluate first", path)
    from covid_cxr.evaluation import evaluate

    evaluate.run(EvalConfig(run=str(run.root), split=cfg.split, data=cfg.data, device=cfg.device,
                            source_roots=cfg.source_roots))
    return read_json(path, "evaluation")


def _ensure_audit(run: RunDir, cfg: ReportConfig) -> dict | None:
    path = run.audit_dir(cfg.split) / "audit.json"
    if path.is_file():
        doc = read_json(path, "audit")
        if not _of_other_data(doc.get("dataset"), cfg, run):
            return doc
    if not cfg.audit:
        return None
    from covid_cxr.evaluation import audit

    log.info("no audit of this dataset in %s; running the audit first", path.parent)
    audit.run(AuditConfig(run=str(run.root), split=cfg.split, data=cfg.data, device=cfg.device,
                          source_roots=cfg.source_roots))
    return read_json(path, "audit")


def _crossval(cfg: ReportConfig, run: RunDir, meta: ModelMeta) -> dict | None:
    """The out-of-source estimate: from --crossval, else the crossval recorded in the model, else None."""
    folder = None
    if cfg.crossval:
        folder = Path(cfg.crossval)
    elif meta.estimate and meta.estimate.get("crossval"):
        cand = Path(meta.estimate["crossval"])
        folder = cand if cand.is_absolute() else run.root / cand
    if folder is None:
        return None
    path = folder / "crossval.json"
    if not path.is_file():
        if cfg.crossval:
            raise CovidCxrError(f"{path} not found; run `covid-cxr crossval --out {folder}` first")
        return None
    return read_json(path, "crossval result")


# ----------------------------------------------------------------------------- sections

def _plain(value):
    """YAML and JSON give lists where a config has tuples: compare them as lists."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def option_differences(cv_options: dict | None, run_options: dict) -> list[str] | None:
    """The training options a crossval and a run do not share, as ``name: crossval X, this run Y`` (options that do
    not change what a run learns aside); None when the crossval does not record its options."""
    if not cv_options:
        return None
    out = []
    for name, value in cv_options.items():
        if name in UNLEARNED_OPTIONS or name not in run_options:
            continue
        mine = run_options[name]
        if _plain(value) != _plain(mine):
            out.append(f"{name}: crossval {value}, this run {mine}")
    return out


def _comparison(differences: list[str] | None) -> str:
    """What the gap between the internal and the out-of-source number means, given how the two were trained."""
    if differences is None:
        return ("<p class='warn'>The crossval does not record its training options, so whether it trained like this "
                "run is unknown; the gap between the two numbers may be partly a difference of options.</p>")
    if differences:
        return ("<p class='warn'>The crossval was trained with other options than this run ("
                + _esc("; ".join(differences)) + "): the gap between the two numbers mixes the effect of those "
                "options with the optimism of the internal split. Run the crossval with this run's options to measure "
                "the optimism alone.</p>")
    return "<p>The crossval was trained with this run's options, so the gap between the two is how much the internal " \
           "number flatters the model.</p>"


def _estimate_section(m: dict, cv: dict | None, meta: ModelMeta, run_options: dict | None = None) -> str:
    internal = m["metrics"].get("roc_auc")
    ci = m["ci95"].get("roc_auc")
    if m.get("local_validation"):
        return ("<p>This page measures the model on a dataset it was not trained on: see <b>Local validation</b> "
                f"above.</p><div class='estimate'>{_esc(expected_text(m, cv)['text'])}</div>")
    internal_text = (f"On its own test split (images from the same sources as its training data) the model scores "
                     f"an area under the ROC curve of <b>{_fmt(internal)}</b>"
                     + (f" (95% CI {_fmt(ci[0])}–{_fmt(ci[1])})" if ci else "") + ".")
    if cv is None:
        return (f"<p>{internal_text}</p><div class='warn'>No out-of-source estimate: this number comes from the same "
                "hospitals and collections the model was trained on, and is optimistic. On X-rays from a hospital it "
                "has not seen, models trained on these public collections typically do much worse. Run "
                "<code>covid-cxr crossval</code> to measure it.</div>")
    pooled = cv.get("pooled", {})
    pci = pooled.get("ci95")
    rows = [[src, r.get("n"), ", ".join(f"{k} {v}" for k, v in (r.get("per_class") or {}).items()),
             with_ci(r.get("auc"), r.get("auc_ci95")), with_ci(r.get("sensitivity"), r.get("sensitivity_ci95")),
             with_ci(r.get("specificity"), r.get("specificity_ci95")), _fmt(r.get("in_scope")), r.get("caveat") or ""]
            for src, r in cv.get("per_source", {}).items()]
    return (f"<div class='estimate'>Expect about this on a hospital the model has not seen: an area under the ROC "
            f"curve of <b>{_fmt(pooled.get('auc'))}</b>"
            + (f" (95% CI {_fmt(pci[0])}–{_fmt(pci[1])}, patient bootstrap)" if pci else "")
            + f", measured by leaving out one whole source at a time ({_esc(cv.get('protocol', {}).get('description', ''))}).</div>"
            f"<p>{internal_text}</p>" + _comparison(option_differences(cv.get("training_options"), run_options or {}))
            + _table(["held-out source", "images", "per class", "AUC (95% CI)", "sensitivity (95% CI)",
                      "specificity (95% CI)", "share in scope", "note"], rows))


def _metrics_section(m: dict) -> str:
    rows = []
    for k, name in METRIC_NAMES.items():
        if k in m["metrics"]:
            ci = m["ci95"].get(k)
            rows.append([name, _fmt(m["metrics"][k]), f"{_fmt(ci[0])} – {_fmt(ci[1])}" if ci else "n/a",
                         _fmt(m["metrics_at_0.5"].get(k))])
    op = m.get("operating_point", {})
    p = m["protocol"]
    cal = m.get("calibration", {})
    rule = {"sensitivity": f"the highest threshold reaching {op.get('target_sensitivity')} sensitivity on the "
                           "validation split", "youden": "the threshold maximising sensitivity + specificity on "
                                                         "validation", "argmax": "the most probable class"}
    split_desc = p.get("split_protocol", {}).get("description", "")
    which = "<b>every split</b> (all images of the model's classes)" if p["split"] == "all" else \
        f"the <b>{_esc(p['split'])}</b> split"
    return (f"<p>Protocol: {which}, {p['images']} images from {p['patients']} patients; "
            f"sources {_esc(', '.join(p['sources']))}. {_esc(split_desc)}. Confidence intervals: "
            f"{_esc(p['confidence_intervals'])}.</p>"
            f"<p>Decision rule: <b>{_esc(m['threshold_text'])}</b>, chosen as {_esc(rule.get(op.get('rule'), op.get('rule')))}. "
            f"Probabilities are calibrated with temperature {_fmt(cal.get('temperature'))} ({_esc(cal.get('status', ''))}); "
            f"expected calibration error (ECE, top-label, {ECE_BINS} bins: the number in the reliability plot's "
            f"legend) on this split {_fmt(cal.get('ece'))}.</p>"
            + _table(["measure", "at the decision rule", "95% confidence interval (patients resampled)",
                      f"at P({m.get('positive_class')}) ≥ 0.5"], rows))


def _audit_section(run: RunDir, split: str, a: dict | None) -> str:
    if a is None:
        return "<p class='muted'>The shortcut audit was not run (covid-cxr audit --run RUN).</p>"
    parts = ["<ul>" + "".join(f"<li>{_esc(v)}</li>" for v in a.get("verdicts", [])) + "</ul>"]
    ex = run.audit_dir(split) / a.get("examples_png", "masked_examples.png")
    if ex.is_file():
        parts.append("<p class='muted'>One image per class as the model saw it: original, lung field blacked out, only "
                     "the border band visible, each with its probability of COVID-19.</p>")
        parts.append(_img(ex, "original, lungs masked, border only"))
    return "".join(parts)


def _gradcam_examples(run: RunDir, split: str, m: dict, predictor: Predictor, per_kind: int = 2
                      ) -> list[tuple[str, bytes, str]]:
    """Overlays for the most confident true positives, false positives, false negatives and true negatives."""
    from covid_cxr.imaging.images import load_image
    from covid_cxr.model.gradcam import caption_for, explain_array, overlay_png

    meta = predictor.meta
    pos = meta.positive
    if pos is None or not meta.binary:
        return []
    preds = pd.read_csv(run.eval_dir(split) / "predictions.csv", keep_default_na=False)
    score = "log_odds" if "log_odds" in preds else f"prob_{pos}"
    t = preds["target"] == pos
    p = preds["predicted_label"] == pos
    kinds = {"true positive": preds[t & p].sort_values(score, ascending=False),
             "false positive": preds[~t & p].sort_values(score, ascending=False),
             "false negative": preds[t & ~p].sort_values(score),
             "true negative": preds[~t & ~p].sort_values(score)}
    model = predictor.torch_model()
    synthetic = bool(meta.data and meta.data.synthetic)
    out = []
    for kind, rows in kinds.items():
        for _, r in rows.head(per_kind).iterrows():
            try:
                image = load_image(r["path"])
                e = explain_array(model, meta, image, pos, path=r["path"])
            except CovidCxrError as exc:
                log.warning("no Grad-CAM example for %s: %s", r["path"], exc)
                continue
            buf = io.BytesIO()
            overlay_png(e["display"], e["heatmap"], buf, caption_for(Path(r["path"]).name, meta, e["log_probs"],
                                                                     e["target"]), synthetic=synthetic)
            out.append((kind, buf.getvalue(), f"{r['source']} · {Path(r['path']).name}"))
    return out


def _dataset_section(run: RunDir, cfg: ReportConfig) -> tuple[str, list[str]]:
    try:
        d = run.dataset(cfg.data)
    except CovidCxrError as exc:
        return f"<p class='muted'>Dataset not found ({_esc(exc)}).</p>", []
    if not d.ingest_report.is_file():
        return "<p class='muted'>Dataset report not found.</p>", []
    rep = json.loads(d.ingest_report.read_text(encoding="utf-8"))
    rows = [[n, s.get("found", s["images_read"]), s.get("not_used_total", ""), s["in_manifest"],
             ", ".join(f"{k} {v}" for k, v in s["labels_in_manifest"].items())] for n, s in rep["sources"].items()]
    conf = "".join(f"<div class='conf'>{_esc(w)}</div>" for w in rep["warnings"])
    pics = "".join(_img(p, p.name) for p in (d.source_mix_png, d.samples_png) if p.is_file())
    nd = rep.get("near_duplicates", {})
    dup = (f"<p>Near-duplicates: {nd.get('pairs', 0)} pairs removed before splitting ({_esc(nd.get('method', ''))}).</p>"
           if nd.get("enabled") else "<p>Near-duplicates were not removed.</p>")
    body = (f"<p>Dataset <code>{_esc(d.root)}</code> (full card: dataset_card.md), task {_esc(rep['task'])}, protocol "
            f"{_esc(rep['protocol']['name'])}.</p><h3>Confounders the data build found</h3>"
            + (conf or "<p>None flagged.</p>") + dup
            + _table(["source", "found (files, rows)", "not used", "in the manifest", "labels"], rows) + pics)
    return body, rep["warnings"]


def _model_card(meta: ModelMeta, m: dict, cv: dict | None, confounders: list[str]) -> str:
    data = meta.data
    scope_data = data or TrainingData(task="", sources=())
    sources = ", ".join(data.sources) if data else "unknown"
    synthetic = (f" <b>Synthetic (not patients): {_esc(', '.join(data.synthetic_sources))}.</b>"
                 if data and data.synthetic else "")
    conf = "".join(f"<li>{_esc(w)}</li>" for w in confounders) or "<li>none flagged by the data build</li>"
    pooled = (cv or {}).get("pooled", {})
    est = (f"area under the ROC curve {_fmt(pooled.get('auc'))} on sources held out of training (crossval)"
           if cv else "not measured (no crossval)")
    measured = (f"{_fmt(m['metrics'].get('roc_auc'))} area under the ROC curve on {_esc(m['protocol']['dataset'])} "
                "(local validation: a dataset it was not trained on)" if m.get("local_validation") else
                f"internal test split {_fmt(m['metrics'].get('roc_auc'))} area under the ROC curve")
    rec = meta.recalibration or {}
    old, new = rec.get("old") or {}, rec.get("new") or {}
    recalibrated = (f"<p><b>Recalibrated</b> on {rec.get('images')} images of {_esc(rec.get('dataset'))} "
                    f"({_esc(rec.get('date'))}): temperature {_fmt(old.get('temperature'))} → "
                    f"{_fmt(new.get('temperature'))}, threshold {_esc(old.get('threshold_text'))} → "
                    f"{_esc(new.get('threshold_text'))}; {_esc(rec.get('note'))}.</p>" if rec else "")
    return (f"<p><b>Model:</b> {_esc(meta.arch)} (torchvision), classes {_esc(', '.join(meta.labels))}, positive class "
            f"{_esc(meta.positive)}; decision rule {_esc(meta.threshold_text())}; checkpoint "
            f"<code>{_esc(m['checkpoint'])}</code>; covid-cxr {__version__}; created {_esc(meta.created)}.</p>"
            f"<p><b>Preprocessing:</b> {_esc(meta.preprocess.describe())}.</p>"
            f"<p><b>Training data:</b> {data.n_train if data else '?'} training and {data.n_val if data else '?'} "
            f"validation images from {_esc(sources)}.{synthetic}</p>"
            f"<p><b>Performance:</b> {measured}; "
            f"on an unseen hospital: {_esc(est)}.</p>{recalibrated}"
            "<p><b>Intended use:</b> research on chest X-ray classification methods, teaching, and studying dataset "
            "bias in public COVID-19 collections.</p>"
            "<p><b>Out of scope:</b> diagnosis, triage, screening or any decision about a patient; images unlike the "
            f"training sources ({_esc(scope_data.images_out_of_scope())}) without external validation. "
            + (f"{_esc(scope_data.age_caveat())} " if scope_data.age_caveat() else "")
            + ("An out-of-scope gate flags images unlike the training images; it is not a guarantee." if meta.gate else "")
            + f"</p><p><b>Known confounders:</b></p><ul>{conf}</ul><p><b>{_esc(DISCLAIMER)}</b></p>")


def _run_warnings(m: dict, meta: ModelMeta, synthetic: list[str]) -> list[str]:
    out = []
    if synthetic:
        out.append(f"The images of {', '.join(synthetic)} are SYNTHETIC phantoms, not patients: every number on this "
                   "page shows that the pipeline runs, not that anything detects COVID-19.")
    out += list(m.get("calibration", {}).get("warnings", []))
    out += list((m.get("local_validation") or {}).get("warnings", []))
    if m["protocol"].get("internal_split_warning"):
        out.append(m["protocol"]["internal_split_warning"][0].upper() + m["protocol"]["internal_split_warning"][1:] + ".")
    return out


def _learning_curves(run: RunDir, synthetic: bool) -> str:
    from covid_cxr.evaluation.plots import learning_curves_png
    from covid_cxr.paths import read_metrics

    if not run.learning_curves_png.is_file():
        records = read_metrics(run)
        if not records:
            return "<p class='muted'>No metrics.jsonl in the run folder.</p>"
        best = max((r.get("best_epoch") or 0) for r in records)
        learning_curves_png(records, run.learning_curves_png, best or None, synthetic)
    return _img(run.learning_curves_png, "learning curves")


def run(cfg: ReportConfig) -> Path:
    """Write ``RUN_DIR/report.html`` (running evaluate, and the audit unless ``cfg.audit`` is False, when missing)."""
    predictor = load_predictor(cfg.run, "torch", cfg.device)
    rd = predictor.run
    meta = predictor.meta
    m = _ensure_eval(rd, cfg)
    a = _ensure_audit(rd, cfg)
    cv = _crossval(cfg, rd, meta)
    ev = rd.eval_dir(cfg.split)
    synthetic = sorted(set(m["protocol"].get("synthetic_sources", [])) | set(meta.data.synthetic_sources if meta.data else ()))
    dataset_html, confounders = _dataset_section(rd, cfg)
    log.info("report: drawing Grad-CAM examples (most confident of each outcome)")
    examples = _gradcam_examples(rd, cfg.split, m, predictor)
    grid = "".join(f"<figure>{_img(png, kind)}<figcaption>{_esc(kind)} · {_esc(cap)}</figcaption></figure>"
                   for kind, png, cap in examples) or "<p class='muted'>No examples.</p>"
    pics = "".join(f"<div>{_img(ev / f, f)}</div>" for f in ("roc.png", "confusion_matrix.png") if (ev / f).is_file())
    calib = "".join(f"<div>{_img(p, p.name)}</div>" for p in (rd.calibration_png, rd.root / RECALIBRATION_PNG,
                                                              ev / "reliability.png") if p.is_file())
    warnings_ = "".join(f"<div class='warn'>{_esc(w)}</div>" for w in _run_warnings(m, meta, synthetic))
    banner = (f"<div class='synthetic'>SYNTHETIC DATA ({_esc(', '.join(synthetic))}): not patients. These results show "
              "the pipeline works; they say nothing about detecting COVID-19.</div>" if synthetic else "")
    study_note = ("<p class='warn'>The study's numbers come from real radiographs; ours here come from synthetic "
                  "phantoms and cannot be compared with them.</p>" if synthetic else
                  "<p class='muted'>The study did not state whether its split kept patients apart; ours does.</p>")
    which = "every split" if cfg.split == "all" else f"split {_esc(cfg.split)}"
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>covid-cxr report: {_esc(rd.root.name)}</title>
<style>{CSS}</style></head><body>
<div class="banner">Research use only — not a diagnostic device.</div>{banner}
<h1>covid-cxr report: {_esc(rd.root.name)}</h1>
<p class="muted">{_esc(m['protocol']['dataset'])} · {which} · covid-cxr {__version__}</p>
<h2>Warnings</h2>{warnings_ or "<p>None.</p>"}
{local_section(m, cv, meta.positive)}
<h2>How it should do on a new hospital</h2>{_estimate_section(m, cv, meta, rd.training_options())}
<h2>The study and this model</h2>{study_note}
<div class="side"><div><h3>Original study</h3><pre>{_esc(STUDY_BASELINE['classification_report'])}</pre>
<p class="muted">{_esc(STUDY_BASELINE['source'])}. Classes: 0 = normal, 1 = covid.</p></div>
<div><h3>This model (at its decision rule)</h3><pre>{_esc(m['classification_report'])}</pre>
<p class="muted">Classes: {_esc(', '.join(f'{i} = {lab}' for i, lab in enumerate(m['labels'])))}.</p></div></div>
<h2>Measures with 95% confidence intervals</h2>{_metrics_section(m)}
<div class="side">{pics}</div>
<h2>Calibration</h2><div class="side">{calib}</div>
<h2>Learning curves</h2>{_learning_curves(rd, bool(synthetic))}
<h2>Per source and per view</h2>{_breakdown('by source', m.get('by_source', {}), meta.positive)}{_breakdown('by view', m.get('by_view', {}), meta.positive)}
<h2>Shortcut audit</h2>{_audit_section(rd, cfg.split, a)}
<h2>Grad-CAM examples</h2><p class="muted">Where the model found evidence for {_esc(meta.positive)}, for its most confident
right and wrong calls. A heatmap shows where, not why, and is not a localisation of disease.</p><div class="grid cams">{grid}</div>
<h2>Data</h2>{dataset_html}
<h2>Model card</h2>{_model_card(meta, m, cv, confounders)}
</body></html>"""
    atomic_write(rd.report, doc)
    return rd.report

