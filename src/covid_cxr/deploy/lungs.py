"""``covid-cxr lungs predict``: lung-field masks and overlays for images, each with its plausibility verdict.

An unreadable image is a row in lungs.csv with its error, never silently skipped.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from covid_cxr import DISCLAIMER
from covid_cxr.deploy.options import LungsPredictConfig
from covid_cxr.errors import ImageReadError
from covid_cxr.files import atomic_write

log = logging.getLogger(__name__)

COLUMNS = ("file", "plausible", "reason", "lung_area", "left_area", "right_area", "mask", "overlay", "error")


def overlay(gray: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The image in gray with the lung fields tinted green and their outline in yellow."""
    from scipy import ndimage

    rgb = np.repeat(np.asarray(gray, np.float32)[..., None], 3, axis=2)
    rgb[mask] = 0.6 * rgb[mask] + 0.4 * np.array([40.0, 200.0, 80.0])
    edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(mask.shape) // 200))
    rgb[edge] = (255.0, 220.0, 0.0)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def run(cfg: LungsPredictConfig) -> dict:
    from covid_cxr.imaging.images import list_images, load_image
    from covid_cxr.model.lungs import load_segmenter

    segmenter = load_segmenter(cfg.lungs, "cpu" if cfg.device == "auto" else cfg.device)
    files = list_images(cfg.inputs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, used = [], set()
    for path in files:
        row = dict.fromkeys(COLUMNS, "")
        row["file"] = str(path)
        try:
            gray = load_image(path)
        except ImageReadError as exc:
            row["error"] = str(exc)
            rows.append(row)
            continue
        found = segmenter.masks([gray])[0]
        stem = path.stem
        while stem in used:  # two inputs with one name: keep both
            stem += "_"
        used.add(stem)
        atomic_write(out / f"{stem}_mask.png", _png(Image.fromarray(found.mask.astype(np.uint8) * 255)))
        atomic_write(out / f"{stem}_overlay.png", _png(overlay(gray, found.mask)))
        row.update(plausible=found.check.plausible, reason=found.check.reason, lung_area=found.check.area,
                   left_area=found.check.left_area, right_area=found.check.right_area, mask=f"{stem}_mask.png",
                   overlay=f"{stem}_overlay.png")
        rows.append(row)
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "lungs.csv", text.getvalue().encode())
    implausible = sum(1 for r in rows if r["plausible"] is False)
    errors = sum(1 for r in rows if r["error"])
    return {"images": len(rows), "implausible": implausible, "unreadable": errors, "out": str(out)}


def format_summary(result: dict) -> str:
    return (f"{result['images']} images: {result['implausible']} without two plausible lung fields, "
            f"{result['unreadable']} unreadable; masks, overlays and lungs.csv in {result['out']}\n{DISCLAIMER}")
