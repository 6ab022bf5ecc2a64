"""Pieces of the HTML report shared by its sections (:mod:`covid_cxr.evaluation.report` and the local validation
section of :mod:`covid_cxr.evaluation.local`): escaped text, tables, embedded pictures, numbers with their CIs."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from covid_cxr.evaluation.metrics import with_ci

METRIC_NAMES = {"accuracy": "Accuracy", "roc_auc": "Area under the ROC curve",
                "sensitivity": "Sensitivity (share of COVID-19 images called COVID-19)",
                "specificity": "Specificity (share of other images called not COVID-19)",
                "ppv": "Positive predictive value (share of COVID-19 calls that are right)",
                "npv": "Negative predictive value (share of other calls that are right)"}


def img(path: Path | bytes, alt: str) -> str:
    """A PNG embedded in the page (the report is one self-contained file)."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def fmt(v) -> str:
    """A number with three decimals, ``n/a`` for a missing one."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.3f}"
    return str(v)


def esc(v) -> str:
    return html.escape(str(v))


def breakdown_table(title: str, d: dict, positive: str | None) -> str:
    """A breakdown (per source, view, manufacturer...) as a table: every number with its CI, and the caveat of a
    subgroup too small to judge."""
    rows = [[k, v["n"], v.get("n_positive"), with_ci(v.get("accuracy"), v.get("accuracy_ci95")),
             with_ci(v.get("roc_auc"), v.get("roc_auc_ci95")), with_ci(v.get("sensitivity"), v.get("sensitivity_ci95")),
             with_ci(v.get("specificity"), v.get("specificity_ci95")), v.get("caveat") or ""] for k, v in d.items()]
    return f"<h3>{esc(title)}</h3>" + table([title.split()[-1], "images", f"{positive} images", "accuracy (95% CI)",
                                             "area under ROC (95% CI)", "sensitivity (95% CI)",
                                             "specificity (95% CI)", "note"], rows)
