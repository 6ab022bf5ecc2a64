"""``covid-cxr report``: one self-contained HTML file (images embedded) per run.

It gathers what evaluate, audit, explain and data build wrote, so a reader sees in one place
how good the model is, how sure we are, and whether it learned the disease.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

import pandas as pd
import yaml

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.manifest import atomic_write_text

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:0 auto;padding:0 16px 40px;
color:#1d2330;line-height:1.45}
.banner{background:#b3261e;color:#fff;padding:10px 14px;font-weight:600;border-radius:0 0 6px 6px;position:sticky;top:0}
h1{margin:.6em 0 .2em}h2{border-bottom:2px solid #e3e6ee;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;margin:8px 0;font-size:14px}td,th{border:1px solid #d5d9e3;padding:4px 8px;text-align:right}
th{background:#f2f4f8}td:first-child,th:first-child{text-align:left}
.side{display:flex;gap:24px;flex-wrap:wrap}.side>div{flex:1;min-width:320px}
pre{background:#f6f7fa;padding:10px;border-radius:6px;font-size:13px;overflow-x:auto}
img{max-width:100%;border:1px solid #e3e6ee;border-radius:4px}.grid{display:flex;flex-wrap:wrap;gap:10px}
.grid figure{margin:0;width:250px}.grid figcaption{font-size:12px;color:#555}
.warn{background:#fff4e5;border-left:4px solid #f59e0b;padding:6px 10px;margin:6px 0}
.muted{color:#666;font-size:13px}
"""


def _img(path: Path | bytes, alt: str) -> str:
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.3f}"
    return str(v)


def _ensure_eval(run: Path, split: str) -> dict:
    path = run / f"eval-{split}" / "metrics.json"
    if not path.is_file():
        from covid_cxr import evaluate
        from covid_cxr.config import EvalConfig

        log.info("no %s; running evaluate first", path)
        evaluate.run(EvalConfig(run=str(run), split=split))
    return json.loads(path.read_text())


def _ensure_audit(run: Path, split: str, allowed: bool) -> dict | None:
    path = run / f"audit-{split}" / "audit.json"
    if not path.is_file():
        if not allowed:
            return None
        from covid_cxr import audit

        log.info("no %s; running the audit first", path)
        audit.run(audit.AuditConfig(run=str(run), split=split))
    return json.loads(path.read_text())


def _gradcam_examples(run: Path, split: str, metrics: dict, per_kind: int = 3) -> list[tuple[str, bytes, str]]:
    """Overlays for the most confident true positives, false positives and false negatives (2 classes)."""
    from covid_cxr.explain import heatmap_for_image, overlay_png
    from covid_cxr.images import load_image
    from covid_cxr.model import load_checkpoint

    labels = metrics["labels"]
    pos = metrics.get("positive_class")
    if pos is None:
        return []
    preds = pd.read_csv(run / f"eval-{split}" / "predictions.csv", keep_default_na=False)
    model, meta = load_checkpoint(metrics["checkpoint"])
    t = preds["target"] == pos
    p = preds["predicted_label"] == pos
    kinds = {"true positive": preds[t & p].sort_values(f"prob_{pos}", ascending=False),
             "false positive": preds[~t & p].sort_values(f"prob_{pos}", ascending=False),
             "false negative": preds[t & ~p].sort_values(f"prob_{pos}")}
    out = []
    for kind, rows in kinds.items():
        for _, r in rows.head(per_kind).iterrows():
            image = load_image(r["path"])
            heat = heatmap_for_image(model, meta, image, pos)
            buf = io.BytesIO()
            overlay_png(image, heat, buf, f"{kind}: P({pos}) = {r[f'prob_{pos}']:.2f}")
            out.append((kind, buf.getvalue(), f"{r['source']} · {Path(r['path']).name}"))
    del labels
    return out


def _metrics_section(m: dict) -> str:
    rows = []
    for k in ("accuracy", "roc_auc", "sensitivity", "specificity", "ppv", "npv"):
        if k in m["metrics"]:
            ci = m["ci95"].get(k)
            rows.append([k, _fmt(m["metrics"][k]), f"{_fmt(ci[0])} – {_fmt(ci[1])}" if ci else "n/a",
                         _fmt(m["metrics_at_0.5"].get(k))])
    op = m.get("operating_point", {})
    p = m["protocol"]
    return (f"<p>Protocol: split <b>{html.escape(p['split'])}</b>, {p['images']} images from {p['patients']} patients; "
            f"sources {html.escape(', '.join(p['sources']))}. {html.escape(str(p.get('split_protocol', {}).get('description', '')))}. "
            f"Confidence intervals: {html.escape(p['confidence_intervals'])}.</p>"
            f"<p>Operating point: threshold {_fmt(m['threshold'])} on P({html.escape(str(m.get('positive_class')))}), "
            f"rule {html.escape(str(op.get('rule')))}"
            + (f", target sensitivity {op.get('target_sensitivity')} on validation" if op.get("target_sensitivity") else "")
            + f". Temperature {_fmt(m.get('calibration', {}).get('temperature'))}, test ECE "
            f"{_fmt(m.get('calibration', {}).get('ece'))}.</p>"
            + _table(["metric", "at chosen threshold", "95% CI (patient bootstrap)", "at threshold 0.5"], rows))


def _breakdown(title: str, d: dict) -> str:
    rows = [[k, v["n"], v["n_covid"], _fmt(v["accuracy"]), _fmt(v["roc_auc"]), _fmt(v["sensitivity"]),
             _fmt(v["specificity"])] for k, v in d.items()]
    return f"<h3>{title}</h3>" + _table([title.split()[-1], "n", "covid", "accuracy", "AUC", "sensitivity",
                                         "specificity"], rows)


def _audit_section(a: dict | None) -> str:
    if a is None:
        return "<p class='muted'>The shortcut audit was not run (covid-cxr audit --run RUN).</p>"
    parts = ["<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in a.get("verdicts", [])) + "</ul>"]
    ex = Path(a.get("output_dir", "")) / "masked_examples.png"
    if ex.is_file():
        parts.append(_img(ex, "original, lungs masked, border only"))
    return "".join(parts)


def _dataset_section(run: Path) -> tuple[str, list[str]]:
    cfg_path = run / "config.yaml"
    data = yaml.safe_load(cfg_path.read_text()).get("data") if cfg_path.is_file() else None
    if not data or not (Path(data) / "ingest_report.json").is_file():
        return "<p class='muted'>Dataset report not found.</p>", []
    d = Path(data)
    rep = json.loads((d / "ingest_report.json").read_text())
    rows = [[n, s["images_read"], s["in_manifest"], ", ".join(f"{k} {v}" for k, v in s["labels_in_manifest"].items())]
            for n, s in rep["sources"].items()]
    warn = "".join(f"<div class='warn'>{html.escape(w)}</div>" for w in rep["warnings"])
    pics = "".join(_img(d / f, f) for f in ("source_mix.png", "samples.png") if (d / f).is_file())
    nd = rep.get("near_duplicates", {})
    dup = (f"<p>Near-duplicates: {nd.get('pairs', 0)} pairs removed before splitting ({html.escape(nd.get('method', ''))}).</p>"
           if nd.get("enabled") else "<p>Near-duplicates were not removed.</p>")
    body = (f"<p>Dataset <code>{html.escape(str(d))}</code> (full card: dataset_card.md), task {html.escape(rep['task'])}, "
            f"protocol {html.escape(rep['protocol']['name'])}.</p>" + warn + dup
            + _table(["source", "images read", "in manifest", "labels"], rows) + pics)
    return body, rep["warnings"]


def _model_card(m: dict, warnings_: list[str]) -> str:
    conf = "".join(f"<li>{html.escape(w)}</li>" for w in warnings_) or "<li>none flagged by the data build</li>"
    return (f"<p><b>Model:</b> DenseNet-121 (torchvision), classes {html.escape(', '.join(m['labels']))}; checkpoint "
            f"<code>{html.escape(m['checkpoint'])}</code>; covid-cxr {__version__}.</p>"
            "<p><b>Intended use:</b> research on chest X-ray classification methods, teaching, and studying dataset "
            "bias in public COVID-19 collections.</p>"
            "<p><b>Out of scope:</b> diagnosis, triage, screening or any decision about a patient; use on images unlike "
            "the training sources (other hospitals, pediatric or lateral views, CT) without external validation.</p>"
            f"<p><b>Data:</b> the public sources listed above.</p><p><b>Known confounders:</b></p><ul>{conf}</ul>"
            f"<p><b>{html.escape(DISCLAIMER)}</b></p>")


def run(run_dir: str | Path, split: str = "test", audit: bool = True) -> Path:
    """Write ``RUN_DIR/report.html`` (running evaluate, and the audit unless ``audit=False``, when missing)."""
    from covid_cxr.evaluate import STUDY_BASELINE

    run = Path(run_dir)
    m = _ensure_eval(run, split)
    a = _ensure_audit(run, split, audit)
    ev = run / f"eval-{split}"
    dataset_html, warnings_ = _dataset_section(run)
    examples = _gradcam_examples(run, split, m)
    grid = "".join(f"<figure>{_img(png, kind)}<figcaption>{html.escape(kind)} · {html.escape(cap)}</figcaption></figure>"
                   for kind, png, cap in examples) or "<p class='muted'>No examples.</p>"
    pics = "".join(f"<div>{_img(ev / f, f)}</div>" for f in ("roc.png", "confusion_matrix.png") if (ev / f).is_file())
    calib = "".join(f"<div>{_img(p, p.name)}</div>" for p in (run / "calibration_val.png", ev / "reliability.png")
                    if p.is_file())
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>covid-cxr report: {html.escape(run.name)}</title>
<style>{CSS}</style></head><body>
<div class="banner">Research use only — not a diagnostic device.</div>
<h1>covid-cxr report: {html.escape(run.name)}</h1>
<p class="muted">{html.escape(m['protocol']['dataset'])} · split {html.escape(split)} · covid-cxr {__version__}</p>
<h2>The study and this model</h2>
<div class="side"><div><h3>Original study</h3><pre>{html.escape(STUDY_BASELINE['classification_report'])}</pre>
<p class="muted">{html.escape(STUDY_BASELINE['source'])}</p></div>
<div><h3>This model (at the chosen threshold)</h3><pre>{html.escape(m['classification_report'])}</pre></div></div>
<h2>Metrics with 95% confidence intervals</h2>{_metrics_section(m)}
<div class="side">{pics}</div>
<h2>Calibration</h2><div class="side">{calib}</div>
<h2>Per source and per view</h2>{_breakdown('by source', m.get('by_source', {}))}{_breakdown('by view', m.get('by_view', {}))}
<h2>Shortcut audit</h2>{_audit_section(a)}
<h2>Grad-CAM examples</h2><div class="grid">{grid}</div>
<h2>Data</h2>{dataset_html}
<h2>Model card</h2>{_model_card(m, warnings_)}
</body></html>"""
    out = run / "report.html"
    atomic_write_text(out, doc)
    return out
