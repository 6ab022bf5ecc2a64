"""What the Python API returns, and the images it accepts: :class:`Prediction`, :class:`Explanation` and
:func:`as_gray_image`.

:meth:`covid_cxr.model.inference.Predictor.predict` takes file paths (PNG, JPEG, DICOM; folders are searched),
Pillow images and NumPy arrays, and turns each into the (H, W) uint8 grayscale image that
:func:`covid_cxr.imaging.images.load_image` gives for a file, so a picture predicts the same from a file, from
Pillow or from an array. NumPy and Pillow only (the ONNX path needs no PyTorch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from covid_cxr.errors import ImageReadError
from covid_cxr.imaging.images import _to_gray_uint8, list_images, load_image
from covid_cxr.model.meta import format_probability

PathLike = (str, Path)


@dataclass
class Outputs:
    """What a forward pass gives for N images."""

    logits: np.ndarray
    """(N, K) float32 raw logits."""
    scope: np.ndarray | None = None
    """(N,) out-of-scope distances (None: the model has no gate)."""
    features: np.ndarray | None = None
    """(N, C) penultimate features, when asked for (PyTorch backend only)."""
    lungs: list | None = None
    """(N,) :class:`~covid_cxr.imaging.lung_masks.LungCheck` per image when the model carries a lung segmenter."""
    views: np.ndarray | None = None
    """(N, 112) the gate's image views of the network input (:func:`covid_cxr.model.gate.image_views`), with ``features``."""


@dataclass(frozen=True)
class Prediction:
    """One image's result: what ``covid-cxr predict`` writes in a row, typed."""

    source: str
    """The file path, or ``<array N>`` / ``<PIL image N>`` for in-memory images (N: position in the input)."""
    probabilities: dict[str, float]
    """Calibrated class probabilities (temperature applied), by label."""
    label: str
    """The decision: the positive class when P(positive) reaches ``threshold`` (two classes), else the argmax."""
    threshold: float | None
    """The operating threshold on P(positive class) fitted on validation; None for argmax models."""
    threshold_text: str
    """The decision rule in words, e.g. ``P(covid) >= 0.42``."""
    positive_class: str | None
    log_odds: float | None
    """log(P(positive) / P(other)), the score thresholds and AUCs are computed on (two classes)."""
    in_scope: bool | None
    """False when the image is unlike the training chest X-rays (its output is then not meaningful); None
    when the model has no out-of-scope gate."""
    scope_score: float | None
    """The gate's distance (larger: less like the training images)."""
    explanation: str = ""
    """The decision in one sentence: the probability against the threshold, and how the threshold was chosen
    (``out of scope: ...`` first when the gate flags the image)."""
    lung_fields: str | None = None
    """What the lung segmenter found (``two lung fields``, or why not), for a model that carries one (None
    otherwise); anything but two plausible fields makes the image out of scope."""

    @property
    def probability(self) -> float | None:
        """P(positive class), or None for a model without one."""
        return None if self.positive_class is None else self.probabilities[self.positive_class]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if self.explanation:
            return f"{self.source}: {self.explanation}"
        if self.positive_class is not None:
            what = (f"{self.label} (P({self.positive_class}) {format_probability(self.probability)}; decision at "
                    f"{self.threshold_text})")
        else:
            what = f"{self.label} (P {format_probability(self.probabilities[self.label])})"
        scope = {True: "", False: "; OUT OF SCOPE: unlike the training images, not meaningful", None: ""}[self.in_scope]
        return f"{self.source}: {what}{scope}"


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM of one image (research use only: where evidence for a class was found, not why)."""

    source: str
    heatmap: np.ndarray
    """(h, w) float32 in [0, 1], scaled per image, at the display resolution of ``image``."""
    image: np.ndarray
    """(h, w) uint8 grayscale image the heatmap goes with (longer side at most 768 px)."""
    target: str
    """The class whose evidence is shown."""
    layer: str
    """The feature map Grad-CAM used."""
    prediction: Prediction
    overlay_png: str | None = None
    """Where the overlay was written (when an output folder was given)."""


def as_gray_image(item: Any, index: int = 0) -> tuple[np.ndarray, str]:
    """(the (H, W) uint8 grayscale image, a name for it) for a path, a Pillow image or a NumPy array.

    Arrays: (H, W) uint8 as is; (H, W, 3|4) uint8 RGB(A) and (H, W) uint16 go through the same conversion as
    files (alpha composited on black, 16 bits stretched to their range); (H, W, 1) and (1, H, W) are squeezed.
    Floating-point arrays are refused: their range (0..1? 0..255? Hounsfield?) cannot be guessed.

    Raises:
        ImageReadError: an unreadable file or an array that is not an image (naming the input).
    """
    if isinstance(item, PathLike):
        path = Path(item)
        return load_image(path), str(path)
    if isinstance(item, Image.Image):
        name = f"<PIL image {index}>"
        arr = _to_gray_uint8(item)
    elif isinstance(item, np.ndarray):
        name = f"<array {index}>"
        arr = _array_to_gray(item, name)
    else:
        raise ImageReadError(f"<input {index}>", f"a {type(item).__name__} is not an image: pass a file path, a "
                                                 "PIL.Image or a (H, W) uint8 NumPy array")
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise ImageReadError(name, f"an image needs at least 8x8 pixels, got shape {arr.shape}")
    return arr, name


def _array_to_gray(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    if np.issubdtype(a.dtype, np.floating) or a.dtype == bool:
        raise ImageReadError(name, f"{a.dtype} pixels: their range cannot be guessed; pass uint8 (0..255) pixels, "
                                   "e.g. (x * 255).round().astype(np.uint8) for values in [0, 1]")
    if a.ndim == 2 and a.dtype == np.uint8:
        return a
    if a.ndim == 2 and a.dtype in (np.uint16, np.int16, np.int32, np.uint32):
        return _to_gray_uint8(Image.fromarray(a.astype(np.int32), mode="I"))
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8:
        return _to_gray_uint8(Image.fromarray(a, mode="RGB" if a.shape[-1] == 3 else "RGBA"))
    raise ImageReadError(name, f"a {a.dtype} array of shape {a.shape} is not one image: pass (H, W) grayscale or "
                               "(H, W, 3) RGB uint8; for several images pass a list")


def expand_inputs(images_or_paths: Any) -> list[Any]:
    """The input as a list: one image (path, PIL image or array) becomes a list of one; folders are replaced by
    the image files inside them (recursively, sorted)."""
    if isinstance(images_or_paths, (str, Path, Image.Image, np.ndarray)):
        items: Iterable[Any] = [images_or_paths]
    else:
        items = images_or_paths
    out: list[Any] = []
    for item in items:
        if isinstance(item, PathLike) and Path(item).is_dir():
            out.extend(list_images([str(item)]))
        else:
            out.append(item)
    return out


def chunks(items: list[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    """(offset, chunk) over ``items`` in slices of ``size``."""
    for start in range(0, len(items), size):
        yield start, items[start:start + size]
