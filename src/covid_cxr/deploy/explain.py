"""``covid-cxr explain``: Grad-CAM overlays of where the model looks, for image files and folders.

Built on the Python API: :func:`covid_cxr.deploy.api.load_run` then
:meth:`~covid_cxr.model.inference.Predictor.explain`. The Grad-CAM method itself (layer choice, upsampling,
overlays, captions) is :mod:`covid_cxr.model.gradcam`, re-exported here. Research use only: a heatmap shows
where evidence for a class was found, not why, and is not a localisation of disease.
"""

from __future__ import annotations

import logging
from pathlib import Path

from covid_cxr import DISCLAIMER
from covid_cxr.deploy.options import ExplainConfig
from covid_cxr.errors import CovidCxrError
from covid_cxr.files import write_json
from covid_cxr.imaging.images import list_images
from covid_cxr.model.gradcam import CAVEAT, COLORMAP, MIN_CAM_SIDE, resolve_target

log = logging.getLogger(__name__)

__all__ = ["explain_images", "run"]


def explain_images(predictor, paths: list[Path], out_dir: Path, target: str | None = None,
                   progress: bool = False) -> list[dict]:
    """Write ``<out_dir>/<stem>_gradcam.png`` for every image and return one row per image.

    Rows hold ``path``, ``heatmap_png``, ``target``, ``layer``, ``prob_<label>``..., ``predicted_label``,
    ``threshold`` and ``in_scope`` (the same numbers as ``covid-cxr predict``).

    Raises:
        ImageReadError: an unreadable file (named in the message); nothing is skipped.
        ConfigError: an unknown target class.
    """
    rows = []
    for e in predictor.explain([Path(p) for p in paths], target, out_dir, progress=progress):
        p = e.prediction
        rows.append({"path": e.source, "heatmap_png": e.overlay_png, "target": e.target, "layer": e.layer,
                     **{f"prob_{lab}": v for lab, v in p.probabilities.items()}, "predicted_label": p.label,
                     "threshold": p.threshold_text, "in_scope": p.in_scope})
    return rows


def run(cfg: ExplainConfig) -> dict:
    """Explain every image in ``cfg.inputs``; writes the PNGs and ``explanations.json`` to ``cfg.out``.

    Returns:
        {"images", "out", "target", "results": rows of :func:`explain_images`, "disclaimer"}.
    """
    from covid_cxr.deploy.api import load_run

    predictor = load_run(cfg.run, "torch", device=cfg.device, checkpoint=cfg.checkpoint)
    meta = predictor.meta
    if cfg.target is not None:
        resolve_target(meta, cfg.target)
    paths = list_images(cfg.inputs)
    if not paths:
        raise CovidCxrError("no images to explain")
    out = Path(cfg.out)
    rows = explain_images(predictor, paths, out, cfg.target, progress=cfg.progress)
    result = {"disclaimer": DISCLAIMER, "caveat": CAVEAT, "model": str(predictor.source), "labels": list(meta.labels),
              "target": cfg.target or (f"{meta.positive} (positive class)" if meta.positive else "predicted class"),
              "method": f"Grad-CAM on the deepest candidate layer with at least {MIN_CAM_SIDE}x{MIN_CAM_SIDE} cells "
                        f"({rows[0]['layer']} at {meta.preprocess.size} px), bilinear upsampling, scaled to [0, 1] "
                        f"per image, colour map {COLORMAP}",
              "images": len(rows), "out": str(out), "results": rows}
    write_json(out / "explanations.json", result)
    return result
