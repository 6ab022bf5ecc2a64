"""``covid-cxr predict``: class probabilities, decisions and the out-of-scope flag for image files and folders.

One path for both backends, the Python API's: :func:`covid_cxr.deploy.api.load_run` (a run folder, checkpoint,
ONNX file or ``export --format hf`` folder) then :meth:`~covid_cxr.model.inference.Predictor.predict_files`
(decode with ``images.load_image``, the pixel pipeline, the model, ``ModelMeta``'s decision rule and gate).
With ``--dicom-out`` each DICOM input also gets a Structured Report and a Secondary Capture for the PACS
(:mod:`covid_cxr.deploy.dicom_results`), sent with STOW-RS by ``--stow``.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from covid_cxr import DISCLAIMER
from covid_cxr.deploy.api import load_run
from covid_cxr.deploy.options import PredictConfig
from covid_cxr.errors import PacsError
from covid_cxr.files import atomic_write, to_json
from covid_cxr.imaging.dicom_quiet import quiet_pydicom
from covid_cxr.imaging.images import list_images
from covid_cxr.model.meta import format_probability

log = logging.getLogger(__name__)


def _csv(rows: list[dict]) -> str:
    import csv

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def output_format(cfg: PredictConfig, terminal: bool) -> str:
    """``cfg.format``, with ``auto`` resolved: a table for a person at a terminal, CSV for a pipe or file (JSON for
    an --out ending in .json)."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.out:
        return "json" if Path(cfg.out).suffix.lower() == ".json" else "csv"
    return "table" if terminal else "csv"


def explanation(row: dict, meta) -> str:
    """The decision of one flat row in one sentence (:meth:`~covid_cxr.model.meta.ModelMeta.explain_decision`), or
    the reason an unreadable file has none."""
    if row["error"]:
        return f"unreadable: {row['error']}"
    return meta.explain_decision({lab: row[f"prob_{lab}"] for lab in meta.labels}, row["predicted_label"],
                                 row.get("in_scope"))


def summary_line(rows: list[dict], labels: Sequence[str]) -> str:
    """``7 images: 5 covid, 2 normal; 2 of them out of scope; 1 unreadable``."""
    decided = [r for r in rows if not r["error"]]
    counts = ", ".join(f"{sum(1 for r in decided if r['predicted_label'] == lab)} {lab}" for lab in labels)
    text = f"{len(rows)} image{'s' if len(rows) != 1 else ''}: {counts}"
    out = sum(1 for r in decided if r.get("in_scope") is False)
    if out:
        text += f"; {out} of them out of scope (their decision is not meaningful)"
    if len(decided) < len(rows):
        text += f"; {len(rows) - len(decided)} unreadable"
    return text


def format_table(rows: list[dict], meta) -> str:
    """The predictions as a person reads them: one line per image (shortest distinct path, the decision, or 'out of
    scope' with the probability in brackets, the scope score), then the summary and the decision rule in words."""
    shown = meta.positive if meta.binary else None
    names = [r["path"] for r in rows]
    base = Path(os.path.commonpath(names)) if len(names) > 1 else Path(names[0]).parent if names else Path(".")
    if len(names) > 1 and base in {Path(n) for n in names}:
        base = base.parent
    head = ["image", "decision", f"P({shown})" if shown else "P(decision)", "scope score"]
    table = []
    for r in rows:
        name = os.path.relpath(r["path"], base) if names else r["path"]
        if r["error"]:
            table.append([name, "unreadable", "-", r["error"]])
            continue
        p = r[f"prob_{shown}"] if shown else r[f"prob_{r['predicted_label']}"]
        score = "-" if r.get("scope_score") is None else f"{r['scope_score']:.3g}"
        if r.get("in_scope") is False:
            table.append([name, "out of scope", f"({format_probability(p)})",
                          f"{score} > {meta.gate.threshold:.3g}"])
        else:
            table.append([name, r["predicted_label"], format_probability(p), score])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *table]]
    rule = (f"decision: {meta.positive} when P({meta.positive}) >= {format_probability(meta.threshold, min_digits=3)}"
            f", a threshold {meta.threshold_reason()}" if meta.binary and meta.threshold_reason().startswith("set")
            else f"decision: {meta.threshold_text()} ({meta.threshold_reason()})")
    scope = (f"; out of scope: a scope score above {meta.gate.threshold:.3g} (unlike the training chest X-rays)"
             if meta.gate else "")
    return "\n".join(lines + ["", summary_line(rows, meta.labels), rule + scope]) + "\n"


def run(cfg: PredictConfig) -> dict:
    """Predict every image in ``cfg.inputs``; write CSV/JSON to ``cfg.out`` or return it as text.

    Raises:
        PacsError: ``--stow`` failed; the predictions were written to ``cfg.out`` first and the DICOM results stay in
            ``cfg.dicom_out``.
    """
    predictor = load_run(cfg.run, cfg.backend, cfg.device, cfg.checkpoint)
    paths = list_images(cfg.inputs)
    with quiet_pydicom():  # pydicom's complaints about a DICOM input's header quote its values (UIDs, names)
        rows = predictor.predict_files(paths, cfg.batch_size, cfg.skip_unreadable,
                                       progress=cfg.progress and len(paths) > cfg.batch_size)
        if cfg.heatmaps:
            from covid_cxr.deploy.explain import explain_images

            readable = [Path(r["path"]) for r in rows if not r["error"]]
            by_path = {r["path"]: r["heatmap_png"] for r in explain_images(predictor, readable, Path(cfg.heatmaps),
                                                                           progress=cfg.progress)}
            for r in rows:
                r["heatmap_png"] = by_path.get(r["path"], "")
        dicom = write_dicom_results(predictor, rows, cfg) if cfg.dicom_out else None
    meta = predictor.meta
    fmt = output_format(cfg, sys.stdout.isatty())
    text = _text(rows, predictor, cfg, fmt, dicom)
    if cfg.out:  # before sending: a PACS that is down must not cost the predictions
        atomic_write(Path(cfg.out), text)
    if dicom is not None and cfg.stow:
        send_dicom_results(dicom, cfg)
        if fmt == "table" and not cfg.out:  # the table a person reads says what was sent
            text = _text(rows, predictor, cfg, fmt, dicom)
    summary = summary_line(rows, meta.labels) + (f"\n{dicom['summary']}" if dicom else "")
    return {"images": len(rows), "unreadable": sum(1 for r in rows if r["error"]),
            "out_of_scope": sum(1 for r in rows if r.get("in_scope") is False), "out": cfg.out,
            "text": None if cfg.out else text, "format": fmt, "summary": summary,
            "dicom": None if dicom is None else {k: v for k, v in dicom.items() if k != "files"}}


def _text(rows: list[dict], predictor, cfg: PredictConfig, fmt: str, dicom: dict | None) -> str:
    """The predictions as ``fmt`` (table, json or csv)."""
    meta = predictor.meta
    if fmt == "table":
        text = format_table(rows, meta)
        if dicom:  # the table is what a person reads: the DICOM results are part of it
            text += dicom["summary"] + "\n"
        return text
    if fmt == "json":
        return to_json({"disclaimer": DISCLAIMER, "model": str(predictor.source), "backend": cfg.backend,
                        "labels": list(meta.labels), "positive_class": meta.positive,
                        "threshold": meta.threshold, "threshold_text": meta.threshold_text(),
                        "threshold_reason": meta.threshold_reason(),
                        "out_of_scope_gate": meta.gate.to_dict() if meta.gate else None,
                        "predictions": [{**r, "explanation": explanation(r, meta)} for r in rows]})
    return _csv(rows)


def write_dicom_results(predictor, rows: list[dict], cfg: PredictConfig) -> dict:
    """Write the SR and SC of every DICOM input to ``cfg.dicom_out`` (each row gets a ``dicom_result`` column).
    Returns the counts and a ``summary`` line (no patient data); :func:`send_dicom_results` sends them."""
    from covid_cxr.deploy.dicom_results import describe, write_results

    counts = write_results(predictor, rows, Path(cfg.dicom_out))
    counts["summary"] = describe(counts)
    return counts


def send_dicom_results(counts: dict, cfg: PredictConfig) -> None:
    """Send the files of :func:`write_dicom_results` with STOW-RS to ``cfg.stow`` (``counts`` gains ``stored`` and
    a new ``summary``).

    Raises:
        PacsError: the PACS refused them or cannot be reached (the files stay in ``cfg.dicom_out``).
    """
    from covid_cxr.deploy.dicom_results import describe, stow

    try:
        counts["stored"] = stow(counts["files"], cfg.stow)
    except PacsError as exc:
        kept = f"; the DICOM results are in {cfg.dicom_out}"
        if cfg.out:
            kept += f" and the predictions in {cfg.out}"
        raise PacsError(f"{exc}{kept}") from None
    counts["summary"] = describe(counts)
