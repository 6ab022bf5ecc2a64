"""Stored DICOM pixel values -> 8-bit display grayscale, bone bright: the Modality LUT (or Rescale
Slope/Intercept), then the first VOI LUT or window mapped onto 0..255; without one, 8-bit data kept as stored and
deeper data stretched from its minimum to its maximum; MONOCHROME1 inverted; colour reduced to luma as for PNGs.

:mod:`covid_cxr.imaging.dicom` decides whether a file may be decoded at all and decodes it; this module only maps
the decoded values.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

log = logging.getLogger(__name__)


def scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255 (either order), clipping; a flat range gives black."""
    if hi == lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.round(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def voi_to_uint8(arr: np.ndarray, ds: Dataset, path: Path) -> np.ndarray | None:
    """Apply the first VOI LUT (preferred) or window; None when the file has neither (or a broken one)."""
    voi_luts = ds.get("VOILUTSequence")
    if voi_luts and "LUTDescriptor" in voi_luts[0] and "LUTData" in voi_luts[0]:
        n, first = voi_luts[0].LUTDescriptor[:2]
        domain = np.arange(first, first + (n or 2**16))
        # Clip to the LUT's domain first (the standard maps values outside it to the end entries);
        # pydicom would wrap values past 16 bits.
        inputs = np.clip(np.rint(arr), domain[0], domain[-1]).astype(np.int64)
        lut = apply_voi(domain, ds, 0)
        # The LUT's own extremes are its black and white: the descriptor's bit depth is often wrong.
        return scale(apply_voi(inputs, ds, 0), float(lut.min()), float(lut.max()))
    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        try:
            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds, 0)
            return scale(apply_windowing(arr, ds, 0), lo, hi)
        except (ValueError, TypeError) as exc:
            log.warning("%s: ignoring unusable window (%s); stretching the stored range instead", path, exc)
    return None


def gray_to_uint8(arr: np.ndarray, ds: Dataset, path: Path, photometric: str) -> np.ndarray:
    """Stored grayscale values -> display values 0..255, bone bright."""
    has_modality_lut = bool(ds.get("ModalityLUTSequence")) or (
        float(ds.get("RescaleSlope", 1) or 1) != 1 or float(ds.get("RescaleIntercept", 0) or 0) != 0)
    values = apply_modality_lut(arr, ds)
    out = voi_to_uint8(values, ds, path)
    if out is None:
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        if bits <= 8 and not has_modality_lut and ds.get("PixelRepresentation", 0) == 0:
            # 8-bit data is already display values; kept as stored, like an 8-bit PNG.
            out = scale(values, 0, 2**bits - 1)
        else:
            out = scale(values, float(values.min()), float(values.max()))
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def colour_to_uint8(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.uint8)  # same luma as PNGs
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return scale(luma, float(luma.min()), float(luma.max()))
