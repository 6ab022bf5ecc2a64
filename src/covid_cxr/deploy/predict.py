"""``covid-cxr predict``: class probabilities, decisions and the out-of-scope flag for image files and folders.

One path for both backends, the Python API's: :func:`covid_cxr.deploy.api.load_run` (a run folder, checkpoint,
ONNX file or ``export --format hf`` folder) then :meth:`~covid_cxr.model.inference.Predictor.predict_files`
(decode with ``images.load_image``, the pixel pipeline, the model, ``ModelMeta``'s decision rule and gate).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from covid_cxr import DISCLAIMER
from covid_cxr.deploy.api import load_run
from covid_cxr.deploy.options import PredictConfig
from covid_cxr.files import atomic_write, to_json
from covid_cxr.imaging.images import list_images

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


def run(cfg: PredictConfig) -> dict:
    """Predict every image in ``cfg.inputs``; write CSV/JSON to ``cfg.out`` or return it as text."""
    predictor = load_run(cfg.run, cfg.backend, cfg.device, cfg.checkpoint)
    paths = list_images(cfg.inputs)
    rows = predictor.predict_files(paths, cfg.batch_size, cfg.skip_unreadable,
                                   progress=cfg.progress and len(paths) > cfg.batch_size)
    if cfg.heatmaps:
        from covid_cxr.deploy.explain import explain_images

        readable = [Path(r["path"]) for r in rows if not r["error"]]
        by_path = {r["path"]: r["heatmap_png"] for r in explain_images(predictor, readable, Path(cfg.heatmaps),
                                                                       progress=cfg.progress)}
        for r in rows:
            r["heatmap_png"] = by_path.get(r["path"], "")
    meta = predictor.meta
    if cfg.format == "json":
        text = to_json({"disclaimer": DISCLAIMER, "model": str(predictor.source), "backend": cfg.backend,
                        "labels": list(meta.labels), "positive_class": meta.positive,
                        "threshold": meta.threshold, "threshold_text": meta.threshold_text(),
                        "out_of_scope_gate": meta.gate.to_dict() if meta.gate else None,
                        "predictions": rows})
    else:
        text = _csv(rows)
    if cfg.out:
        atomic_write(Path(cfg.out), text)
    return {"images": len(rows), "unreadable": sum(1 for r in rows if r["error"]),
            "out_of_scope": sum(1 for r in rows if r.get("in_scope") is False), "out": cfg.out,
            "text": None if cfg.out else text}

