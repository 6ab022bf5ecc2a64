"""Reading DICOM chest radiographs into 8-bit grayscale arrays.

:func:`covid_cxr.imaging.images.load_image` hands DICOM files (by ending, or by the ``DICM`` marker at
byte 128) to :func:`load_dicom`, so every stage decodes a DICOM file the same way:

1. refuse files that are not chest radiographs (no pixel data, a non-radiograph Modality,
   a Body Part Examined that is clearly not the chest, a lateral View Position), all before
   any pixel is decoded;
2. refuse what would cost more memory than :mod:`covid_cxr.limits` allows, also before
   decoding: a header claiming more than :data:`~covid_cxr.limits.MAX_PIXELS` pixels or more
   than :data:`~covid_cxr.limits.MAX_DECODED_BYTES` of pixel data (Rows x Columns x Samples x
   Bits Allocated x frames), stored pixel data far larger than the header says, a compressed
   frame whose own header (JPEG SOF, JPEG 2000 SIZ) declares another size than the DICOM header
   (decoders trust the codestream), and a deflate-compressed data set that inflates past what
   its header needs (inflated here in bounded steps: pydicom would inflate it whole);
3. decode the first frame with pydicom (compressed transfer syntaxes through its optional
   plugins: pylibjpeg with pylibjpeg-libjpeg, -openjpeg and -rle are the ones we install), and
   check that it decoded to the size the header said;
4. grayscale (:mod:`covid_cxr.imaging.dicom_display`): Modality LUT (or Rescale Slope/Intercept), then the first VOI LUT or window,
   mapped onto 0..255; without a window, 8-bit data is kept as stored and deeper data is
   stretched from its minimum to its maximum (as :func:`covid_cxr.imaging.images.load_image` does for
   16-bit PNGs); MONOCHROME1 is inverted so bone is bright;
5. colour (RGB, YBR, palette): luma, as for colour PNGs.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, RLELossless)

from covid_cxr.errors import ImageReadError
from covid_cxr.imaging.dicom_display import colour_to_uint8, gray_to_uint8
from covid_cxr.limits import (BITS_ALLOCATED, MAX_DECODED_BYTES, MAX_HEADER_BYTES, MAX_PIXELS, PIXEL_DATA_SLACK,
                              SAMPLES_PER_PIXEL, codestream_size, frame_bytes)

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
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
"""(0018,5101) View Position words of a lateral view (left/right lateral); the model reads frontal (PA, AP) views.
Decubitus (LLD, RLD) and oblique views are read: they are not what the issue of mixed views is about."""

# Body Part Examined is free text in practice ("PORT CHEST", "T-SPINE", "Thorax pa"), so it is split
# into words: a value is refused only if it names a non-chest part and no chest word. Unknown values
# ("PORTABLE", "RIBS", "WHOLEBODY") are read rather than guessed at.


def _is_not_chest(body_part: str) -> bool:
    words = [w for w in re.split(r"[^A-Z0-9]+", body_part.upper()) if w]
    if any(w in _CHEST_WORDS for w in words):
        return False
    return any(w in _NOT_CHEST_WORDS or (w.endswith("S") and w[:-1] in _NOT_CHEST_WORDS) for w in words)


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
"""Explicit VRs with a 4-byte length (PS3.5 7.1.2)."""
_META_PROBE = 1 << 16
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def _file_meta(path: Path) -> tuple[int, str | None]:
    """(where the data set starts, Transfer Syntax UID) from the File Meta Information group (0002,xxxx), parsed
    here: pydicom inflates a deflate-compressed data set whole as soon as it opens the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(_META_PROBE)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot open: {exc.strerror or exc}") from None
    pos = 132 if head[128:132] == b"DICM" else 0
    tsyntax = None
    while pos + 8 <= len(head) and struct.unpack_from("<H", head, pos)[0] == 0x0002:
        (element,) = struct.unpack_from("<H", head, pos + 2)
        if head[pos + 4:pos + 6] in _LONG_VRS:
            (length,) = struct.unpack_from("<I", head, pos + 8) if pos + 12 <= len(head) else (len(head),)
            value = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            value = pos + 8
        if element == 0x0010:
            tsyntax = head[value:value + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = value + length
    if tsyntax != DeflatedExplicitVRLittleEndian and DeflatedExplicitVRLittleEndian.encode() in head[:max(pos, 1024)]:
        # A deflated file whose meta group we could not walk (e.g. written in implicit VR): never let pydicom
        # inflate it without a bound.
        raise ImageReadError(path, "unreadable File Meta Information in a deflate-compressed DICOM file")
    return pos, tsyntax


class _Inflated:
    """A read-only file over a deflate-compressed data set, inflated on demand and never past ``limit`` bytes.

    pydicom reads through it (``read``/``seek``/``tell``); reading or seeking past the limit raises
    :class:`ImageReadError` after at most ``limit`` + one step of inflated bytes were held.
    """

    STEP = 1 << 20

    def __init__(self, f, path: Path, limit: int, why: str):
        self._f, self.path, self.limit, self.why = f, path, limit, why
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self.data = bytearray()
        self.pos = 0
        self.eof = False

    def _fill(self, upto: int) -> None:
        while len(self.data) < upto and not self.eof:
            if len(self.data) > self.limit:
                raise ImageReadError(self.path, f"the deflate-compressed data set inflates to more than "
                                                f"{self.limit:,} bytes, {self.why} (possible decompression bomb)")
            src = self._z.unconsumed_tail or self._f.read(1 << 16)
            if not src:
                self.eof = True  # a cut-off stream: pydicom reports the missing data
                break
            try:
                self.data += self._z.decompress(src, self.STEP)
            except zlib.error as exc:
                raise ImageReadError(self.path, f"corrupt deflate-compressed data set ({exc})") from None
            self.eof = self._z.eof
        if len(self.data) > self.limit:
            raise ImageReadError(self.path, f"the deflate-compressed data set inflates to more than {self.limit:,} "
                                            f"bytes, {self.why} (possible decompression bomb)")

    def read(self, size: int = -1) -> bytes:
        end = self.limit + 1 if size is None or size < 0 else self.pos + size
        self._fill(end)
        out = bytes(self.data[self.pos:end])
        self.pos += len(out)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset if whence == 0 else self.pos + offset if whence == 1 else len(self.data) + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


def _read_deflated(path: Path, offset: int) -> Dataset:
    """The data set of a Deflated Explicit VR Little Endian file, inflated in two bounded steps: its header (at most
    :data:`MAX_HEADER_BYTES`), then its pixel data (at most what the header's image needs)."""
    with open(path, "rb") as f:
        f.seek(offset)
        stream = _Inflated(f, path, MAX_HEADER_BYTES, "before its pixel data")
        at_pixels: list[bool] = []

        def stop(tag, vr, length) -> bool:
            if tag in _PIXEL_TAGS:
                at_pixels.append(True)
                return True
            return False

        header = read_dataset(stream, False, True, stop_when=stop)
        if at_pixels:  # the header is complete: bound the rest by what it describes
            geometry = _check_size(path, header)
            stream.limit = stream.tell() + 12 + geometry.total_bytes + 1 + PIXEL_DATA_SLACK
            stream.why = f"more than its image needs ({geometry})"
        stream.seek(0)
        ds = read_dataset(stream, False, True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the data set is once inflated
    return ds


class _CappedFile:
    """A binary file whose reads never ask for more bytes than it has left.

    Python allocates the size a read asks for before reading, and pydicom reads an element by its length
    field: a corrupt length (up to 4 GB) in a 200-byte file cost 1 GB (found by tests/test_fuzz_inputs.py).
    pydicom reopens the file through this class (``type(f)(name, "rb")``) for deferred values.
    """

    def __init__(self, path: str | Path, mode: str = "rb"):
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close() / the context manager
        self.name = str(path)
        self._size = os.fstat(self._f.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._f.read()
        return self._f.read(max(0, min(size, self._size - self._f.tell())))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:  # pydicom reopens a closed file by name for deferred values
        return self._f.closed

    def __enter__(self) -> "_CappedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _dcmread(path: Path, force: bool = False) -> Dataset:
    with _CappedFile(path) as f:
        return pydicom.dcmread(f, defer_size="256 KB", force=force)


def _read_header(path: Path) -> Dataset:
    """Parse a DICOM file; its pixel data is deferred (read only when decoded)."""
    try:
        offset, tsyntax = _file_meta(path)
        if tsyntax == DeflatedExplicitVRLittleEndian:
            return _read_deflated(path, offset)
        try:
            ds = _dcmread(path)
        except InvalidDicomError:
            # No 128-byte preamble and 'DICM' marker: an old-style raw data set, or not DICOM at all.
            ds = _dcmread(path, force=True)
            if "Rows" not in ds and "SOPClassUID" not in ds:
                raise ImageReadError(path, "not a DICOM file (no 'DICM' marker at byte 128 and no DICOM image "
                                           "elements)") from None
    except FileNotFoundError as exc:
        raise ImageReadError(path, "file not found") from exc
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, struct.error) as exc:
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


@dataclass(frozen=True)
class _Geometry:
    """What a DICOM header says its pixel data holds."""

    width: int
    height: int
    samples: int
    bits: int
    frames: int

    @property
    def frame_bytes(self) -> int:
        return frame_bytes(self.height, self.width, self.samples, self.bits)

    @property
    def total_bytes(self) -> int:
        return frame_bytes(self.height * self.frames, self.width, self.samples, self.bits)

    def __str__(self) -> str:
        return (f"{self.width}x{self.height} x {self.samples} sample{'s' if self.samples > 1 else ''} x "
                f"{self.bits} bits x {self.frames} frame{'s' if self.frames > 1 else ''} = {self.total_bytes:,} bytes")


def _check_size(path: Path, ds: Dataset) -> _Geometry:
    """Refuse an image of more than :data:`covid_cxr.MAX_PIXELS` pixels a frame, or more than
    :data:`~covid_cxr.limits.MAX_DECODED_BYTES` of decoded pixel data, before decoding it."""
    w, h = _header_size(path, ds)
    if w * h > MAX_PIXELS:
        raise ImageReadError(
            path, f"header claims {w}x{h} pixels, more than the {MAX_PIXELS:,} allowed "
            "(possible decompression bomb); downscale the file if it is a real radiograph")
    g = _Geometry(w, h, int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 0),
                  int(ds.get("NumberOfFrames") or 1))
    if g.samples not in SAMPLES_PER_PIXEL:
        raise ImageReadError(path, f"Samples per Pixel is {g.samples}: covid-cxr reads grayscale (1) or colour (3) "
                                   "images")
    if g.bits not in BITS_ALLOCATED:
        raise ImageReadError(path, f"Bits Allocated is {g.bits}: covid-cxr reads "
                                   f"{', '.join(map(str, BITS_ALLOCATED))}-bit pixel data")
    if g.frames < 1:
        raise ImageReadError(path, f"Number of Frames is {g.frames}")
    if g.total_bytes > MAX_DECODED_BYTES:
        raise ImageReadError(
            path, f"header claims {g} of decoded pixel data, more than the {MAX_DECODED_BYTES:,} allowed "
            "(possible decompression bomb)")
    return g


def _check_stored_size(path: Path, ds: Dataset, g: _Geometry) -> None:
    """Refuse pixel data far larger than the header's image needs, before it is read into memory: uncompressed
    data by its length, compressed data (whose length is not stored) by the file's size."""
    tsyntax = ds.file_meta.TransferSyntaxUID
    if tsyntax.is_encapsulated:
        size = os.path.getsize(path)
        # Compressed frames are smaller than raw ones, except for noise (a few % larger): twice is ample.
        if size > MAX_HEADER_BYTES + 2 * g.total_bytes + PIXEL_DATA_SLACK:
            raise ImageReadError(path, f"the file holds {size:,} bytes, far more than its compressed image can need "
                                       f"({g}) (possible decompression bomb)")
        return
    elem = ds.get_item("PixelData", keep_deferred=True)  # its length, without reading it
    length = getattr(elem, "length", None)
    if length is None:
        length = len(elem.value or b"")
    if length == 0xFFFFFFFF or length > g.total_bytes + 1 + PIXEL_DATA_SLACK:
        what = "of undefined length" if length == 0xFFFFFFFF else f"of {length:,} bytes"
        raise ImageReadError(path, f"uncompressed pixel data {what}, but the header describes {g}: the header "
                                   "and the pixel data disagree")


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
    view = str(ds.get("ViewPosition") or "").strip()
    if any(w in LATERAL_VIEWS for w in re.split(r"[^A-Z]+", view.upper())):
        raise ImageReadError(path, f"View Position is {view!r}, a lateral view; covid-cxr reads frontal chest "
                                   "radiographs (PA or AP); if this is a frontal image with a wrong tag, correct "
                                   "(0018,5101)")


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


def _check_frame(path: Path, ds: Dataset, g: _Geometry) -> None:
    """Check the compressed first frame before a decoder sees it.

    * JPEG, JPEG-LS and JPEG 2000: the codestream's own header must declare the DICOM header's size (decoders
      allocate what the codestream says), and it must not be cut off: these decoders return a partly grey image
      for a cut-off frame instead of failing. Each codestream ends with the marker FFD9 (EOI or EOC), which cannot
      occur inside coded data; a few bytes of padding may follow it.
    * RLE: a frame cannot be much larger than the raw frame (a literal run costs one byte per 128).
    """
    tsyntax = ds.file_meta.TransferSyntaxUID
    if not tsyntax.is_encapsulated:
        return
    frame = get_frame(ds.PixelData, 0, number_of_frames=g.frames)
    if tsyntax == RLELossless:
        if len(frame) > 64 + g.frame_bytes + g.frame_bytes // 64 + 1024:
            raise ImageReadError(path, f"the RLE frame holds {len(frame):,} bytes, more than its image can need "
                                       f"({g}): the header and the pixel data disagree")
        return
    declared = codestream_size(frame)
    if declared is None:
        raise ImageReadError(path, f"the {tsyntax.name} pixel data has no readable codestream header")
    cw, ch, cc = declared
    if (cw, ch, cc) != (g.width, g.height, g.samples):
        raise ImageReadError(path, f"the {tsyntax.name} codestream declares a {cw}x{ch} image with {cc} "
                                   f"component(s) but the DICOM header says {g.width}x{g.height} with {g.samples}: "
                                   "the file is inconsistent (or a decompression bomb)")
    if b"\xff\xd9" not in frame[-16:]:
        raise ImageReadError(path, f"the {tsyntax.name} pixel data is truncated (no end-of-image marker); "
                                   "copy or export the file again")


def read_dicom_header(path: str | Path) -> Dataset:
    """The header of a DICOM file, its pixel data not read (deferred), within the same bounds as :func:`load_dicom`.

    Raises:
        ImageReadError: missing, not DICOM, or an unreadable header.
    """
    return _read_header(Path(path))


def chest_radiograph_problem(path: str | Path, ds: Dataset) -> str | None:
    """Why the header ``ds`` is not a frontal chest radiograph covid-cxr reads (no pixel data, another modality or
    body part, a lateral view), or None: the checks :func:`load_dicom` makes before decoding."""
    try:
        _check_is_chest_radiograph(Path(path), ds)
    except ImageReadError as exc:
        return exc.reason
    return None


def load_dicom(path: str | Path) -> np.ndarray:
    """Decode the first frame of a DICOM chest radiograph into an 8-bit grayscale (H, W) array.

    See the module docstring for the steps. Multi-frame files give their first frame (logged).

    Raises:
        ImageReadError: the file is missing or corrupt; has no pixel data; its Modality is not
            CR/DX/DR/RG, its Body Part Examined is not the chest or its View Position is lateral;
            it would need more memory than :mod:`covid_cxr.limits` allows (header, stored or
            inflated size, the compressed frame's own header); its compressed frame is cut off; or
            its transfer syntax cannot be decoded (the message names the package to install).
    """
    path = Path(path)
    ds = _read_header(path)
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
    g = _check_size(path, ds)
    _check_stored_size(path, ds, g)
    _check_decodable(path, ds)
    if g.frames > 1:
        log.warning("%s: DICOM file has %d frames; using the first", path, g.frames)
    _check_frame(path, ds, g)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    tsyntax = ds.file_meta.TransferSyntaxUID
    options = {}
    if tsyntax == RLELossless and "pylibjpeg" in get_decoder(tsyntax).available_plugins:
        # pydicom's own RLE decoder first expands a segment however far its runs say (64x the input), then
        # trims it; pylibjpeg-rle decodes into the frame's size.
        options["decoding_plugin"] = "pylibjpeg"
    arr = pixel_array(ds, index=0, **options)
    if arr.shape[:2] != (g.height, g.width) or (arr.ndim == 3 and arr.shape[2] != g.samples):
        raise ImageReadError(path, f"decoded to {arr.shape} but the header says {g}")
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        out = colour_to_uint8(arr)
    elif arr.ndim == 2 and photometric in ("MONOCHROME1", "MONOCHROME2"):
        out = gray_to_uint8(arr, ds, path, photometric)
    else:
        raise ImageReadError(path, f"unsupported DICOM pixels: Photometric Interpretation {photometric!r}, "
                                   f"decoded shape {arr.shape}")
    if out.shape[0] < 8 or out.shape[1] < 8:
        raise ImageReadError(path, f"decoded to an unusable shape {out.shape}")
    return out
