"""Resource limits shared by every decoder (so one set of numbers guards PNG, JPEG and DICOM alike), and the
header parsers that check a compressed frame against them before any decoder sees it.

A decoder allocates what a header tells it to, so every header is checked first: the image header
(PNG IHDR, JPEG SOF, the DICOM Rows/Columns/Samples/Bits/Frames), the codestream inside a DICOM file
(:func:`codestream_size`: its own JPEG SOF or JPEG 2000 SIZ, which the decoder trusts over the DICOM
header), and for deflate-compressed DICOM files the inflated size (inflated in bounded steps, never
all at once). What was decoded is checked against what the header promised.
"""

from __future__ import annotations

import struct

MAX_PIXELS = 100_000_000
"""Largest width*height we decode (10k x 10k). Larger images are rejected before decoding, so a
decompression bomb cannot exhaust memory."""

MAX_DECODED_BYTES = 2 * MAX_PIXELS
"""Largest decoded pixel data of one file, all its frames together: a 16-bit grayscale image of
:data:`MAX_PIXELS` pixels (200 MB). Checked from the header before decoding."""

MAX_HEADER_BYTES = 16 * 2**20
"""Largest DICOM data set without its pixel data (16 MiB; chest radiographs need a few KB). A
deflate-compressed data set is inflated at most this far before its header is known."""

PIXEL_DATA_SLACK = 2**20
"""Bytes a DICOM file may hold beyond what its header's image needs (padding, trailing elements)."""

MAX_MODEL_JSON_BYTES = 8 * 2**20
"""Largest model metadata JSON read (``model.json``, an hf folder's ``config.json``): a few KB in practice; a file
claiming more is refused before it is read."""

MAX_ONNX_BYTES = 2**30
"""Largest ONNX file loaded (covid-cxr's exports are 10-120 MB; protobuf itself stops at 2 GiB). Checked from the
file's size before anything is read; its sha256 is then computed in chunks and compared with ``model.json`` before
the file is loaded whole."""

MAX_ORT_MEMORY_BYTES = 8 * 2**30
"""Most memory ONNX Runtime may hold for models' tensors (weights, activations): on CPU one arena shared by every
session of the process, on CUDA each session's limit. DenseNet-121 at 224 px runs a batch of 32 within 1 GiB
(measured with ORT 1.32: refused at 640 MiB, runs at 1 GiB; ConvNeXt-Tiny too); activations grow with batch x
size^2, so a batch of 32 at 512 px needs about 5 GiB. A graph asking for more (an altered file's
``ConstantOfShape([2^34])``, 64 GiB) is refused by the arena before anything is allocated."""

SAMPLES_PER_PIXEL = (1, 3)
"""DICOM Samples per Pixel values we accept (grayscale; RGB, YBR)."""
BITS_ALLOCATED = (1, 8, 16, 32)
"""DICOM Bits Allocated values we accept (64 is float data, not a radiograph)."""


def frame_bytes(rows: int, columns: int, samples: int, bits_allocated: int) -> int:
    """Bytes of one decoded frame (bit-packed for 1-bit data, as the standard stores it)."""
    return (rows * columns * samples * bits_allocated + 7) // 8


# JPEG start-of-frame markers (ITU T.81 B.1.1.3: C0-C3, C5-C7, C9-CB, CD-CF) and JPEG-LS's SOF55 (F7).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG or JPEG-LS SOF marker; None if there is none before the scan."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None  # markers must follow each other in the header
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before a frame header
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF:
            if pos + 10 > n:
                return None
            _precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 4)
            return width, height, components
        if length < 2:
            return None
        pos += 2 + length
    return None


def _j2k_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG 2000 SIZ marker (a raw codestream or one inside JP2 boxes)."""
    start = data.find(_J2K_SOC_SIZ, 0, 1 << 16)
    if start < 0 or start + 42 > len(data):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, start + 8)
    (components,) = struct.unpack_from(">H", data, start + 40)
    return max(0, xsiz - xosiz), max(0, ysiz - yosiz), components


def codestream_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) that a JPEG, JPEG-LS or JPEG 2000 codestream declares, read from its header
    without decoding; None when ``frame`` is none of these or its header is unreadable.

    Decoders allocate what the codestream declares, whatever the DICOM header says, so both must agree.
    """
    if frame[:2] == b"\xff\xd8":
        return _jpeg_size(frame)
    if frame[:4] == _J2K_SOC_SIZ or frame[:12] == _JP2_SIGNATURE:
        return _j2k_size(frame)
    return None

MAX_QIDO_BYTES = 64 * 2**20
"""Largest DICOMweb search (QIDO-RS) or store (STOW-RS) answer read, in bytes: a page of a few hundred results is
well under 1 MiB."""

MAX_DICOM_INSTANCE_BYTES = 512 * 2**20
"""Largest DICOM instance retrieved from a PACS or accepted by the C-STORE listener, in bytes (a chest radiograph
is 5-60 MB uncompressed)."""
