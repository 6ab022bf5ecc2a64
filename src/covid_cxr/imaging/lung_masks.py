"""Lung-field masks without PyTorch: the segmenter's input pixels, the clean-up of what it predicts, and the check
that a mask shows two lung fields where lungs are.

Shared by training (``covid-cxr lungs train``), prediction (``covid-cxr lungs predict``) and everything that uses the
lungs later (crop, audit, gate), so that each sees exactly the same pixels and the same verdict.

A mask is *implausible* when it does not show two lung fields of plausible area side by side: a lateral film, a CT
slice, a document or a photograph gets no trustworthy lung fields, and :func:`check_lungs` says why instead of
letting a crop or an audit trust them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

LUNG_INPUT_SIZE = 256
"""Side of the square the segmenter sees (the whole image, resized without keeping its aspect: lungs reach the
image's sides, so a centre crop would cut them)."""

MASK_THRESHOLD = 0.5
"""A pixel is lung when the segmenter's probability reaches this (and, for a mask file, when its 8-bit value reaches
128: some masks have anti-aliased edges)."""

# What two lung fields look like on a frontal chest film, as fractions of the image (deliberately wide: they reject
# what is not a frontal chest film, not unusual lungs). Measured bounds are in the tests, on phantoms and real masks.
FIELD_AREA = (0.02, 0.45)
"""Each lung field covers 2-45 % of the image."""
TOTAL_AREA = (0.08, 0.75)
"""Both together cover 8-75 % of the image."""
FIELD_BALANCE = 0.25
"""The smaller field has at least a quarter of the larger one's area."""
FIELD_CENTRE_Y = (0.15, 0.85)
"""Each field's centre lies between 15 % and 85 % of the image height."""


def lung_input(gray: np.ndarray, size: int = LUNG_INPUT_SIZE) -> np.ndarray:
    """The segmenter's input for one image: float32 ``(size, size)``, the whole image resized (bilinear) and
    standardised to zero mean and unit variance (sources differ in brightness and contrast, lungs do not).

    ``gray``: a 2-D array (any integer or float type) or ``(H, W, C)`` (channels averaged)."""
    a = np.asarray(gray)
    if a.ndim == 3:
        a = a.astype(np.float32).mean(axis=2)
    if a.ndim != 2 or min(a.shape) < 1:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    img = Image.fromarray(a.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32)
    std = float(x.std())
    return ((x - float(x.mean())) / (std if std > 1e-6 else 1.0)).astype(np.float32)


def mask_from_file_values(values: np.ndarray) -> np.ndarray:
    """A mask file's pixels as a boolean mask (8-bit: >= 128; boolean or 0/1 as they are)."""
    a = np.asarray(values)
    if a.ndim == 3:
        a = a.max(axis=2)
    if a.dtype == bool:
        return a
    return a >= (128 if a.max(initial=0) > 1 else 1)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` resized to ``shape`` (height, width) by nearest neighbour."""
    if mask.shape == tuple(shape):
        return mask.astype(bool)
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(img) >= 128


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Keep the two largest connected parts of ``mask`` (the lung fields) and fill their holes."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:2] + 1
    return ndimage.binary_fill_holes(np.isin(labels, keep))


@dataclass(frozen=True)
class LungCheck:
    """Whether a mask shows two plausible lung fields, and why not."""

    plausible: bool
    reason: str
    """``two lung fields`` when plausible; otherwise what is wrong, in plain words."""
    fields: int
    area: float
    """Both fields' share of the image."""
    left_area: float
    right_area: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_lungs(mask: np.ndarray) -> LungCheck:
    """Judge a (cleaned) mask: two fields, one in each half of the image, each of plausible area and height, of
    comparable size. The image's left half holds the patient's right lung on a PA film; either way one field
    each side."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    labels, n = ndimage.label(mask)
    total = float(mask.mean())
    if n == 0:
        return LungCheck(False, "no lung field found", 0, 0.0, 0.0, 0.0)
    sizes = np.bincount(labels.ravel())[1:] / float(h * w)
    order = np.argsort(sizes)[::-1][:2]
    centres = ndimage.center_of_mass(mask, labels, order + 1)
    halves = {"left": 0.0, "right": 0.0}
    for k, (cy, cx) in zip(order, centres):
        side = "left" if cx < w / 2 else "right"
        halves[side] = max(halves[side], float(sizes[k]))

    def verdict(reason: str) -> LungCheck:
        return LungCheck(reason == "two lung fields", reason, int(n), round(total, 4), round(halves["left"], 4),
                         round(halves["right"], 4))

    if n < 2 or sizes[order[1]] < FIELD_AREA[0]:
        return verdict("one lung field, not two side by side (a lateral film, or not a frontal chest X-ray)")
    (cy0, cx0), (cy1, cx1) = centres
    if (cx0 < w / 2) == (cx1 < w / 2):
        return verdict("both fields lie on the same side of the image (not a frontal chest X-ray)")
    if not TOTAL_AREA[0] <= total <= TOTAL_AREA[1]:
        return verdict(f"the fields cover {total:.0%} of the image, outside {TOTAL_AREA[0]:.0%}-{TOTAL_AREA[1]:.0%}")
    big, small = sizes[order[0]], sizes[order[1]]
    if big > FIELD_AREA[1]:
        return verdict(f"one field covers {big:.0%} of the image, more than a lung does ({FIELD_AREA[1]:.0%})")
    if small < FIELD_BALANCE * big:
        return verdict(f"one field is {small / big:.0%} of the other's size (lungs are comparable)")
    for cy in (cy0, cy1):
        if not FIELD_CENTRE_Y[0] <= cy / h <= FIELD_CENTRE_Y[1]:
            return verdict(f"a field is centred at {cy / h:.0%} of the image height, not where lungs are")
    return verdict("two lung fields")


def cleaned_masks(probabilities: np.ndarray) -> np.ndarray:
    """(N, L, L) bool: each P(lung) map thresholded at :data:`MASK_THRESHOLD` and cleaned (:func:`clean_mask`),
    whichever backend computed the maps."""
    probabilities = np.asarray(probabilities)
    if not len(probabilities):
        return np.zeros(probabilities.shape, bool)
    return np.stack([clean_mask(p >= MASK_THRESHOLD) for p in probabilities])


def lung_checks(probabilities: np.ndarray) -> list[LungCheck]:
    """The plausibility verdict of each P(lung) map (thresholded at :data:`MASK_THRESHOLD`, cleaned): what a model
    that carries the segmenter adds to every prediction, whichever backend computed the maps."""
    return [check_lungs(m) for m in cleaned_masks(probabilities)]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    den = p.sum() + t.sum()
    return 1.0 if den == 0 else float(2.0 * np.logical_and(p, t).sum() / den)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)


# ----------------------------------------------------------------------------- the lung view (train --lung-view)

LUNG_VIEWS = ("none", "crop", "mask")
"""What a classifier that carries a segmenter sees (``train --lung-view``): ``none``, the whole image; ``crop``, the
lung fields' bounding box widened by :data:`LUNG_MARGIN`; ``mask``, that crop with everything outside the (slightly
widened, :data:`MASK_GROWTH`) lung fields set to black. Text markers, borders, collimation and burned-in labels
outside the lungs then cannot decide."""
LUNG_MARGIN = 0.08
"""The crop's margin on each side, as a fraction of the lung fields' box height (top, bottom) and width (sides):
a segmenter's edge may miss the periphery, where COVID-19 opacities often lie."""
MASK_GROWTH = 0.02
"""``mask`` view: the lung fields are grown by this fraction of the mask side before the rest is blacked out."""


def lung_box(mask: np.ndarray, margin: float = LUNG_MARGIN) -> tuple[float, float, float, float]:
    """The bounding box of ``mask``'s lung pixels widened by ``margin``: (top, bottom, left, right) as fractions of
    the mask's height and width, clipped to [0, 1] (the whole frame for an empty mask)."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return 0.0, 1.0, 0.0, 1.0
    top, bottom, left, right = rows[0] / h, (rows[-1] + 1) / h, cols[0] / w, (cols[-1] + 1) / w
    dy, dx = margin * (bottom - top), margin * (right - left)
    return max(0.0, top - dy), min(1.0, bottom + dy), max(0.0, left - dx), min(1.0, right + dx)


def view_lungs(image: np.ndarray, mask: np.ndarray, view: str, margin: float = LUNG_MARGIN) -> tuple[np.ndarray,
                                                                                                     LungCheck]:
    """The lung view of a stage-1 image (:func:`covid_cxr.imaging.pixels.shrink_short_side`), before the
    classifier's resize, and the verdict on its lung fields.

    ``mask``: the image's cleaned lung mask at the segmenter's square (:func:`clean_mask` of its thresholded P(lung)
    of :func:`lung_input`), which covers the whole image. An implausible mask gives the whole image back (the image is
    out of scope whatever the classifier says: no crop is trusted). One pure function for training, prediction,
    both backends and Grad-CAM, so that each sees the same pixels.
    """
    if view not in LUNG_VIEWS:
        raise ValueError(f"lung view must be one of {LUNG_VIEWS}, got {view!r}")
    mask = np.asarray(mask, dtype=bool)
    check = check_lungs(mask)
    if view == "none" or not check.plausible:
        return image, check
    h, w = image.shape[:2]
    top, bottom, left, right = lung_box(mask, margin)
    y0, y1 = int(np.floor(top * h)), max(int(np.ceil(bottom * h)), int(np.floor(top * h)) + 1)
    x0, x1 = int(np.floor(left * w)), max(int(np.ceil(right * w)), int(np.floor(left * w)) + 1)
    crop = image[y0:y1, x0:x1]
    if view == "mask":
        from scipy import ndimage

        grow = max(1, round(MASK_GROWTH * mask.shape[0]))
        inside = resize_mask(ndimage.binary_dilation(mask, iterations=grow), (h, w))[y0:y1, x0:x1]
        crop = np.where(inside, crop, np.zeros((), crop.dtype))
    return np.ascontiguousarray(crop), check
