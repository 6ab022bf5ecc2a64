"""Reading chest X-ray image files into 8-bit grayscale arrays.

Every stage (data build, training, evaluation, prediction) reads images through
:func:`load_image`, so one file decodes to the same pixels everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from covid_cxr.errors import ImageReadError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
"""File endings of DICOM files, decoded by :func:`covid_cxr.dicom.load_dicom`."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg") + DICOM_SUFFIXES
"""File endings treated as images (compared case-insensitively)."""

MAX_PIXELS = 100_000_000
"""Largest width*height we decode (10k x 10k). Larger headers are rejected before
decoding, so a decompression bomb cannot exhaust memory."""


def is_image_file(path: Path) -> bool:
    """True for a file whose ending is one of :data:`IMAGE_SUFFIXES`, ignoring macOS resource forks."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("._")


def _is_dicom(path: Path) -> bool:
    """A DICOM ending, or the 'DICM' marker at byte 128 (PACS exports often have no ending)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, hex encoded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _to_gray_uint8(img: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to an 8-bit grayscale array, scaling high bit depths."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            return np.zeros(arr.shape, dtype=np.uint8)
        # Stretch the stored range: 12/16-bit radiographs rarely use the full type range.
        return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA"):
        # Composite transparency over black, the background of a radiograph.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8).copy()


def read_image_size(path: str | Path) -> tuple[int, int]:
    """Return (width, height) from the file header without decoding the pixels.

    Raises:
        ImageReadError: the file is missing or not a recognised image.
    """
    if _is_dicom(Path(path)):
        from covid_cxr.dicom import read_dicom_size  # imported here: pydicom costs ~0.5 s to import

        return read_dicom_size(path)
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file into an 8-bit grayscale array of shape (H, W).

    Handles grayscale, RGB, RGBA (composited on black), palette and 16-bit images,
    and applies the EXIF orientation. DICOM files (see :func:`_is_dicom`) are decoded by
    :func:`covid_cxr.dicom.load_dicom`.

    Raises:
        ImageReadError: the file is missing, truncated, not an image, or its header
            claims more than :data:`MAX_PIXELS` pixels (a decompression bomb).
    """
    path = Path(path)
    if _is_dicom(path):
        from covid_cxr.dicom import load_dicom  # imported here: pydicom costs ~0.5 s to import

        return load_dicom(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and 2x; we
            # enforce our own limit below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageReadError(
                        path, f"header claims {w}x{h} pixels, more than the {MAX_PIXELS:,} allowed "
                        "(possible decompression bomb); downscale the file if it is a real radiograph")
                if img.format == "JPEG":
                    img.draft("L", (w, h))
                img.load()
                img = ImageOps.exif_transpose(img)
                arr = _to_gray_uint8(img)
    except ImageReadError:
        raise
    except FileNotFoundError as exc:
        raise ImageReadError(path, "file not found") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc
    if arr.ndim != 2 or arr.shape[0] < 8 or arr.shape[1] < 8:
        raise ImageReadError(path, f"decoded to an unusable shape {arr.shape}")
    return arr


BASE_SHORT_SIDE = 256
"""Stage 1 of preprocessing: images whose shorter side is longer than this are first shrunk
(aspect kept) to it. The preprocessed cache stores exactly this stage, so cached and uncached
paths give identical pixels."""


def _check_gray_u8(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 image, got {image.dtype} {image.shape}")


def shrink_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """Shrink a (H, W) uint8 image so its shorter side is ``short_side`` (never enlarges)."""
    _check_gray_u8(image)
    h, w = image.shape
    if min(h, w) <= short_side:
        return image
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if h <= w:
        size = (size[0], short_side)
    else:
        size = (short_side, size[1])
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a (H, W) uint8 image to (size, size) with antialiasing.

    The whole image is kept (aspect ratio is not preserved): cropping could cut off
    lung fields and padding would add artificial borders a model can learn from.
    """
    _check_gray_u8(image)
    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR,
                                                    reducing_gap=3.0))


def to_model_pixels(image: np.ndarray, size: int, base_short_side: int = BASE_SHORT_SIDE) -> np.ndarray:
    """Both resizing stages: shrink the shorter side to ``base_short_side``, then squash to (size, size)."""
    return resize_uint8(shrink_short_side(image, base_short_side), size)


def _load_resized(args: tuple[str, int, int]) -> np.ndarray:
    path, size, base = args
    return to_model_pixels(load_image(path), size, base)


def load_resized_stack(paths: Sequence[str | Path], size: int, base_short_side: int = BASE_SHORT_SIDE,
                       workers: int | None = None, progress: bool = False, desc: str = "decoding") -> np.ndarray:
    """Decode many images into one (N, size, size) uint8 array of model pixels (:func:`to_model_pixels`).

    Used so that training epochs do not decode full-resolution files again.
    Any unreadable file raises :class:`ImageReadError` naming it; nothing is skipped.
    """
    from tqdm.auto import tqdm

    paths = [str(p) for p in paths]
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), 8)
    args = [(p, size, base_short_side) for p in paths]
    if workers <= 1 or len(paths) < 32:
        for i, arr in enumerate(tqdm(map(_load_resized, args), total=len(paths), desc=desc, disable=not progress)):
            out[i] = arr
        return out
    with ProcessPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(_load_resized, args, chunksize=8)
        for i, arr in enumerate(tqdm(jobs, total=len(paths), desc=desc, disable=not progress)):
            out[i] = arr
    return out
