"""Decoding chest X-ray image files into 8-bit grayscale arrays (decoding only: the pixel pipeline
that follows is :mod:`covid_cxr.imaging.pixels`).

Every stage (data build, training, evaluation, prediction, the web app) reads images through
:func:`load_image`, so one file decodes to the same pixels everywhere. The file type is decided by
its first bytes, not its name: PNG, JPEG, WebP and DICOM only, and Pillow is only ever asked to open
the format the bytes show (a TIFF, an EPS or anything else named ``.png`` is refused, never handed to
another decoder). WebP is read because public collections hold some (COVID-CXNet has a WebP named
``.png``).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from covid_cxr.errors import ImageReadError
from covid_cxr.limits import MAX_DECODED_BYTES, MAX_PIXELS

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp") + DICOM_SUFFIXES
"""File endings listed as images in folders (compared case-insensitively); files without an ending are
listed when they are DICOM (PACS exports often have none)."""


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET = 128
"""A DICOM Part 10 file has a 128-byte preamble, then ``DICM``."""
SNIFF_BYTES = DICOM_MAGIC_OFFSET + 4
WEBP_MAGIC = (b"RIFF", b"WEBP")
"""A WebP file: ``RIFF``, a 4-byte size, ``WEBP``."""
ACCEPTED = "PNG, JPEG, WebP or DICOM"
_PILLOW_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def sniff_bytes(head: bytes) -> str | None:
    """``png``, ``jpeg``, ``webp`` or ``dicom`` from a file's first :data:`SNIFF_BYTES` bytes, or None."""
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[:4] == WEBP_MAGIC[0] and head[8:12] == WEBP_MAGIC[1]:
        return "webp"
    if head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    return None


def sniff(path: str | Path) -> str | None:
    """The kind of an image file by its first bytes (None: not PNG, JPEG, WebP or Part-10 DICOM, or unreadable)."""
    try:
        with open(path, "rb") as f:
            return sniff_bytes(f.read(SNIFF_BYTES))
    except OSError:
        return None


def is_image_file(path: Path) -> bool:
    """True for a file with an image ending, or without an ending but with the DICOM marker; macOS
    resource forks (``._name``) are not images."""
    if path.name.startswith("._"):
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    return suffix == "" and sniff(path) == "dicom"


def list_images(inputs: list[str] | tuple[str, ...]) -> list[Path]:
    """Expand files and folders (recursively) into image paths, in a stable order.

    Folders contribute files ending in :data:`IMAGE_SUFFIXES` and DICOM files without an ending.

    Raises:
        CovidCxrError: a path does not exist, or a folder holds no image file.
    """
    from covid_cxr.errors import CovidCxrError

    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not files:
                raise CovidCxrError(f"folder {p} holds no PNG, JPEG, WebP or DICOM files")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise CovidCxrError(f"{p} does not exist; pass image files or folders")
    return found


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, hex encoded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _decoded_bytes_per_pixel(mode: str) -> int:
    """Bytes per pixel Pillow holds for an image of ``mode`` once decoded (several bands: 4, as Pillow stores them)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


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


def _kind(path: Path) -> str:
    """The decoder for ``path``: by magic bytes; a ``.dcm`` file without the Part-10 marker is tried as DICOM."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a folder, not an image file") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot open: {exc.strerror or exc}") from None
    kind = sniff_bytes(head)
    if kind is None and path.suffix.lower() in DICOM_SUFFIXES:
        kind = "dicom"  # old-style DICOM without preamble; the DICOM reader checks it further
    if kind is None:
        what = "an empty file" if not head else f"not a {ACCEPTED} file (first bytes {head[:8].hex()})"
        raise ImageReadError(path, f"{what}; covid-cxr reads {ACCEPTED} chest X-rays: convert the file to PNG")
    return kind


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file into an 8-bit grayscale array of shape (H, W).

    Handles grayscale, RGB, RGBA (composited on black), palette and 16-bit PNG, JPEG, WebP, and DICOM
    (:func:`covid_cxr.imaging.dicom.load_dicom`), and applies the EXIF orientation.

    Raises:
        ImageReadError: the file is missing, truncated, not PNG/JPEG/WebP/DICOM by its content, or its
            header claims more than :data:`MAX_PIXELS` pixels or
            :data:`~covid_cxr.limits.MAX_DECODED_BYTES` of decoded pixels (a decompression bomb).
    """
    path = Path(path)
    kind = _kind(path)
    if kind == "dicom":
        from covid_cxr.imaging.dicom import load_dicom  # imported here: pydicom costs ~0.5 s to import

        return load_dicom(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and 2x; we enforce our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=[_PILLOW_FORMAT[kind]]) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageReadError(
                        path, f"header claims {w}x{h} pixels, more than the {MAX_PIXELS:,} allowed "
                        "(possible decompression bomb); downscale the file if it is a real radiograph")
                if img.format == "JPEG":
                    img.draft("L", (w, h))  # colour JPEGs decode straight to grayscale
                decoded = w * h * _decoded_bytes_per_pixel(img.mode)
                if decoded > MAX_DECODED_BYTES:
                    raise ImageReadError(
                        path, f"header claims {w}x{h} {img.mode} pixels, {decoded:,} bytes decoded, more than the "
                        f"{MAX_DECODED_BYTES:,} allowed (possible decompression bomb); save it as 8-bit grayscale")
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
