"""Reading DICOM chest radiographs into 8-bit grayscale arrays.

:func:`covid_cxr.images.load_image` hands DICOM files (by ending, or by the ``DICM`` marker at
byte 128) to :func:`load_dicom`, so every stage decodes a DICOM file the same way:

1. refuse files that are not chest radiographs (no pixel data, a non-radiograph Modality,
   a Body Part Examined that is clearly not the chest) and headers claiming more than
   :data:`covid_cxr.MAX_PIXELS` pixels, all before any pixel is decoded;
2. decode the first frame with pydicom (compressed transfer syntaxes through its optional
   plugins: pylibjpeg with pylibjpeg-libjpeg, -openjpeg and -rle are the ones we install);
3. grayscale: Modality LUT (or Rescale Slope/Intercept), then the first VOI LUT or window,
   mapped onto 0..255; without a window, 8-bit data is kept as stored and deeper data is
   stretched from its minimum to its maximum (as :func:`covid_cxr.images.load_image` does for
   16-bit PNGs); MONOCHROME1 is inverted so bone is bright;
4. colour (RGB, YBR, palette): luma, as for colour PNGs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from covid_cxr.errors import ImageReadError
from covid_cxr.limits import MAX_PIXELS

log = logging.getLogger(__name__)

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
"""(0008,0060) Modality values we read: computed, digital and film radiography. "DR" is not a
standard code but some vendors write it. A file without a Modality is read too."""

_CHEST_WORDS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CXR", "TORAX", "TORACE", "THORAKS", "BRUST",
                          "POITRINE", "PECHO", "TORAKS"})
_NOT_CHEST_WORDS = frozenset({
    "ABDOMEN", "ANKLE", "ARM", "BRAIN", "BREAST", "CALCANEUS", "COCCYX", "CSPINE", "DENTAL", "ELBOW",
    "EXTREMITY", "FACE", "FEMUR", "FIBULA", "FINGER", "FOOT", "FOREARM", "HAND", "HEAD", "HEEL", "HIP",
    "HUMERUS", "JAW", "KIDNEY", "KNEE", "LEG", "LOWEXM", "LSPINE", "MANDIBLE", "NECK", "ORBIT", "PATELLA",
    "PELVIS", "SACRUM", "SHOULDER", "SINUS", "SKULL", "SPINE", "TIBIA", "TOE", "TOOTH", "TEETH", "THUMB",
    "TSPINE", "UPPEXM", "WRIST"})
# Body Part Examined is free text in practice ("PORT CHEST", "T-SPINE", "Thorax pa"), so it is split
# into words: a value is refused only if it names a non-chest part and no chest word. Unknown values
# ("PORTABLE", "RIBS", "WHOLEBODY") are read rather than guessed at.


def _is_not_chest(body_part: str) -> bool:
    words = [w for w in re.split(r"[^A-Z0-9]+", body_part.upper()) if w]
    if any(w in _CHEST_WORDS for w in words):
        return False
    return any(w in _NOT_CHEST_WORDS or (w.endswith("S") and w[:-1] in _NOT_CHEST_WORDS) for w in words)


def _read_header(path: Path, *, stop_before_pixels: bool) -> Dataset:
    """Parse a DICOM file; the pixel data is either skipped or deferred (read only when decoded)."""
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size="256 KB")
        except InvalidDicomError:
            # No 128-byte preamble and 'DICM' marker: an old-style raw data set, or not DICOM at all.
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size="256 KB", force=True)
            if "Rows" not in ds and "SOPClassUID" not in ds:
                raise ImageReadError(path, "not a DICOM file (no 'DICM' marker at byte 128 and no DICOM image "
                                           "elements)") from None
    except FileNotFoundError as exc:
        raise ImageReadError(path, "file not found") from exc
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        # pydicom reports a corrupt header with any of these.
        raise ImageReadError(path, f"unreadable DICOM header: {type(exc).__name__}: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        # Files without a meta header: decode with the encoding the parser found.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _header_size(path: Path, ds: Dataset) -> tuple[int, int]:
    """(width, height) of one frame, from the header."""
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise ImageReadError(path, "DICOM header has no Rows/Columns")
    return int(cols), int(rows)


def _check_size(path: Path, ds: Dataset) -> None:
    """Refuse a frame of more than :data:`covid_cxr.MAX_PIXELS` pixels before decoding it."""
    w, h = _header_size(path, ds)
    if w * h > MAX_PIXELS:
        raise ImageReadError(
            path, f"header claims {w}x{h} pixels, more than the {MAX_PIXELS:,} allowed "
            "(possible decompression bomb); downscale the file if it is a real radiograph")


def _check_is_chest_radiograph(path: Path, ds: Dataset) -> None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        kind = f" ({sop.name})" if sop else ""
        raise ImageReadError(path, f"DICOM file{kind} has no pixel data, so it is not an image "
                                   "(e.g. a structured report or a presentation state)")
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise ImageReadError(path, f"Modality {modality!r} is not a radiograph: covid-cxr reads chest radiographs "
                                   f"(Modality {', '.join(sorted(RADIOGRAPH_MODALITIES))} or none)")
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM file holds floating-point pixel data (a parametric map), "
                                   "not a radiograph")
    body_part = str(ds.get("BodyPartExamined") or "").strip()
    if body_part and _is_not_chest(body_part):
        raise ImageReadError(path, f"Body Part Examined is {body_part!r}: covid-cxr reads chest radiographs; "
                                   "if this is a chest image with a wrong tag, correct (0018,0015)")


def _check_decodable(path: Path, ds: Dataset) -> None:
    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise ImageReadError(path, f"transfer syntax {tsyntax.name} ({tsyntax}) has no pydicom decoder") from exc
    if not decoder.is_available:
        raise ImageReadError(
            path, f"no installed package can decode transfer syntax {tsyntax.name} ({tsyntax}); install one of: "
            + "; ".join(decoder.missing_dependencies))


def _check_frame_complete(path: Path, ds: Dataset, frames: int) -> None:
    """Refuse a cut-off JPEG, JPEG-LS or JPEG 2000 frame: their decoders return a partly grey image
    for it instead of failing. Each of these codestreams ends with the marker FFD9 (EOI or EOC),
    which cannot occur inside coded data; a few bytes of padding may follow it."""
    tsyntax = ds.file_meta.TransferSyntaxUID
    if not tsyntax.is_encapsulated or tsyntax == RLELossless:
        return
    if b"\xff\xd9" not in get_frame(ds.PixelData, 0, number_of_frames=frames)[-16:]:
        raise ImageReadError(path, f"the {tsyntax.name} pixel data is truncated (no end-of-image marker); "
                                   "copy or export the file again")


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255 (either order), clipping; a flat range gives black."""
    if hi == lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.round(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def _voi_to_uint8(arr: np.ndarray, ds: Dataset, path: Path) -> np.ndarray | None:
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
        return _scale(apply_voi(inputs, ds, 0), float(lut.min()), float(lut.max()))
    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        try:
            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds, 0)
            return _scale(apply_windowing(arr, ds, 0), lo, hi)
        except (ValueError, TypeError) as exc:
            log.warning("%s: ignoring unusable window (%s); stretching the stored range instead", path, exc)
    return None


def _gray_to_uint8(arr: np.ndarray, ds: Dataset, path: Path, photometric: str) -> np.ndarray:
    """Stored grayscale values -> display values 0..255, bone bright."""
    has_modality_lut = bool(ds.get("ModalityLUTSequence")) or (
        float(ds.get("RescaleSlope", 1) or 1) != 1 or float(ds.get("RescaleIntercept", 0) or 0) != 0)
    values = apply_modality_lut(arr, ds)
    out = _voi_to_uint8(values, ds, path)
    if out is None:
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        if bits <= 8 and not has_modality_lut and ds.get("PixelRepresentation", 0) == 0:
            # 8-bit data is already display values; kept as stored, like an 8-bit PNG.
            out = _scale(values, 0, 2**bits - 1)
        else:
            out = _scale(values, float(values.min()), float(values.max()))
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _colour_to_uint8(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.uint8)  # same luma as PNGs
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return _scale(luma, float(luma.min()), float(luma.max()))


def load_dicom(path: str | Path) -> np.ndarray:
    """Decode the first frame of a DICOM chest radiograph into an 8-bit grayscale (H, W) array.

    See the module docstring for the steps. Multi-frame files give their first frame (logged).

    Raises:
        ImageReadError: the file is missing or corrupt; has no pixel data; its Modality is not
            CR/DX/DR/RG or its Body Part Examined is not the chest; its header claims more than
            :data:`covid_cxr.MAX_PIXELS` pixels; its compressed frame is cut off; or its
            transfer syntax cannot be decoded (the message names the package to install).
    """
    path = Path(path)
    ds = _read_header(path, stop_before_pixels=False)
    try:
        return _decode(path, ds)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        # pydicom parses element values lazily, and it and its plugins raise many exception types
        # on a malformed header or corrupt pixel data.
        raise ImageReadError(path, f"malformed DICOM or undecodable {ds.file_meta.TransferSyntaxUID.name} pixel "
                                   f"data: {type(exc).__name__}: {exc}") from exc


def _decode(path: Path, ds: Dataset) -> np.ndarray:
    _check_is_chest_radiograph(path, ds)
    _check_size(path, ds)
    _check_decodable(path, ds)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        log.warning("%s: DICOM file has %d frames; using the first", path, frames)
    _check_frame_complete(path, ds, frames)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    arr = pixel_array(ds, index=0)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        out = _colour_to_uint8(arr)
    elif arr.ndim == 2 and photometric in ("MONOCHROME1", "MONOCHROME2"):
        out = _gray_to_uint8(arr, ds, path, photometric)
    else:
        raise ImageReadError(path, f"unsupported DICOM pixels: Photometric Interpretation {photometric!r}, "
                                   f"decoded shape {arr.shape}")
    if out.shape[0] < 8 or out.shape[1] < 8:
        raise ImageReadError(path, f"decoded to an unusable shape {out.shape}")
    return out
