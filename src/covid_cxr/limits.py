"""Resource limits shared by every decoder (so one number guards PNG, JPEG and DICOM alike)."""

MAX_PIXELS = 100_000_000
"""Largest width*height we decode (10k x 10k). Larger images are rejected before decoding, so a
decompression bomb cannot exhaust memory."""
