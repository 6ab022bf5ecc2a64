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
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from covid_cxr.errors import ImageReadError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""File endings treated as images (compared case-insensitively)."""

MAX_PIXELS = 100_000_000
"""Largest width*height we decode (10k x 10k). Larger headers are rejected before
decoding, so a decompression bomb cannot exhaust memory."""


def is_image_file(path: Path) -> bool:
    """True for a file whose ending is one of :data:`IMAGE_SUFFIXES`, ignoring macOS resource forks."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("._")


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
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file into an 8-bit grayscale array of shape (H, W).

    Handles grayscale, RGB, RGBA (composited on black), palette and 16-bit images,
    and applies the EXIF orientation.

    Raises:
        ImageReadError: the file is missing, truncated, not an image, or its header
            claims more than :data:`MAX_PIXELS` pixels (a decompression bomb).
    """
    path = Path(path)
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


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a (H, W) uint8 image to (size, size) with antialiasing.

    The whole image is kept (aspect ratio is not preserved): cropping could cut off
    lung fields and padding would add artificial borders a model can learn from.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 image, got {image.dtype} {image.shape}")
    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR,
                                                    reducing_gap=3.0))


def _load_resized(args: tuple[str, int]) -> np.ndarray | tuple[str, str]:
    path, size = args
    try:
        return resize_uint8(load_image(path), size)
    except ImageReadError as exc:
        # ImageReadError(path, reason) cannot be unpickled in the parent process (which
        # breaks the whole pool), so a worker returns (path, reason) and the caller raises.
        return exc.path, exc.reason


def _checked(arr: np.ndarray | tuple[str, str]) -> np.ndarray:
    if isinstance(arr, tuple):
        raise ImageReadError(*arr)
    return arr


def load_resized_stack(paths: Sequence[str | Path], size: int, workers: int | None = None,
                       progress: bool = False, desc: str = "decoding") -> np.ndarray:
    """Decode and resize many images into one (N, size, size) uint8 array.

    Used so that training epochs do not decode full-resolution files again.
    Any unreadable file raises :class:`ImageReadError` naming it; nothing is skipped.
    """
    paths = [str(p) for p in paths]
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), 8)
    jobs: Iterable[np.ndarray]
    from tqdm.auto import tqdm

    if workers <= 1 or len(paths) < 32:
        jobs = map(_load_resized, ((p, size) for p in paths))
        for i, arr in enumerate(tqdm(jobs, total=len(paths), desc=desc, disable=not progress)):
            out[i] = _checked(arr)
        return out
    with ProcessPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(_load_resized, ((p, size) for p in paths), chunksize=8)
        for i, arr in enumerate(tqdm(jobs, total=len(paths), desc=desc, disable=not progress)):
            out[i] = _checked(arr)
    return out
