"""A preprocessed image cache, so epochs and runs do not decode full-resolution files again.

Each image is decoded once with :func:`covid_cxr.imaging.images.load_image`, shrunk with exactly
:func:`covid_cxr.imaging.pixels.shrink_short_side` (stage 1 of the pixel pipeline) and stored as one
``.npy`` file keyed by the file's sha256 and the shorter side::

    <root>/s<short_side>/cache.json          format, Pillow version and a resize fingerprint
    <root>/s<short_side>/<sha[:2]>/<sha>.npy  (H, W) uint8, shorter side <= short_side

Stage 2 (:func:`covid_cxr.imaging.pixels.resize_square` to the model size) runs on load in
:func:`covid_cxr.imaging.pixels.model_pixels`, the one route for cached and uncached images, so
``resize_square(cache.get(sha), size) == geometry(load_image(path), spec)``.

Why one file per image rather than one memory-mapped blob plus an index: on 1,255 real images
(a benchmark of v0.1, 2 shared cores) reading entries from a blob was 3.4x faster, but with
the stage-2 resize it was only 1.6x faster end to end (2,360 against 1,470 images/s), and both are
over 20x faster than decoding (62 images/s). Separate files need no index or lock when several
processes fill the cache at once, and a new image adds a file instead of rewriting the blob.

Integrity: every file is written to a temporary name and renamed, so readers never see half
a file, and ends with a CRC-32 of its pixels (after the standard ``.npy`` data, where
``np.load`` ignores it). An entry that fails any check is reported with a warning, removed and
treated as missing, so it is decoded again from the source: a damaged cache costs time, never
wrong pixels. ``cache.json`` records a fingerprint of ``shrink_short_side`` on fixed
synthetic images; a cache written by a resize that gives other pixels (a different Pillow) is
refused with :class:`CacheError` instead of being mixed with fresh entries.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL

from covid_cxr.errors import CacheError, OutputError
from covid_cxr.files import atomic_write
from covid_cxr.imaging.pixels import PreprocessSpec, shrink_short_side

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of the on-disk layout; a folder written with another version is refused."""

_TRAILER = struct.Struct("<4sI")
_TRAILER_MAGIC = b"CRC1"
_HEADER_MAX = 1024
"""Bytes holding the .npy header; ours take 128."""
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _check_sha(sha256: str) -> str:
    key = str(sha256).lower()
    if not _SHA_RE.fullmatch(key):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return key


@functools.lru_cache(maxsize=1)
def _resize_fingerprint() -> str:
    """sha256 of ``shrink_short_side`` applied to fixed integer patterns.

    One pattern is shrunk by 1.5x and one by 6.5x (where Pillow first reduces by an integer
    factor, as for most radiographs). If Pillow's resampling changes, this changes, and
    stored entries would no longer match freshly decoded pixels.
    """
    h = hashlib.sha256()
    for (rows, cols), short_side in (((301, 397), 200), ((1301, 1703), 200)):
        # uint8 arithmetic wraps modulo 256 on every platform: a deterministic, detailed pattern.
        yy = np.arange(rows, dtype=np.uint8)[:, None]
        xx = np.arange(cols, dtype=np.uint8)[None, :]
        pattern = (yy * np.uint8(7) + xx * np.uint8(13)) ^ (yy * xx)
        out = shrink_short_side(np.ascontiguousarray(pattern), short_side)
        h.update(repr(out.shape).encode())
        h.update(np.ascontiguousarray(out).tobytes())
    return h.hexdigest()


def _encode_entry(image: np.ndarray) -> bytes:
    """A standard .npy file of ``image`` followed by the CRC-32 trailer."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, image, version=(1, 0), allow_pickle=False)
    buf.write(_TRAILER.pack(_TRAILER_MAGIC, zlib.crc32(image)))
    return buf.getvalue()


def _decode_entry(data: bytearray, short_side: int) -> np.ndarray:
    """Parse and check an entry; raises ValueError describing the first problem found."""
    stream = io.BytesIO(bytes(data[:_HEADER_MAX]))  # a header (not the pixels) to parse
    version = np.lib.format.read_magic(stream)
    if version != (1, 0):
        raise ValueError(f".npy version {version}, expected (1, 0)")
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    if dtype != np.uint8 or fortran or len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"holds {dtype} {shape} (fortran={fortran}), expected a (H, W) uint8 image")
    if min(shape) > short_side:
        raise ValueError(f"shorter side {min(shape)} exceeds the cache's {short_side}")
    start, n = stream.tell(), shape[0] * shape[1]
    if len(data) != start + n + _TRAILER.size:
        raise ValueError(f"{len(data)} bytes, expected {start + n + _TRAILER.size} (truncated or extended)")
    magic, crc = _TRAILER.unpack_from(data, start + n)
    if magic != _TRAILER_MAGIC:
        raise ValueError("checksum trailer missing")
    pixels = memoryview(data)[start:start + n]
    if zlib.crc32(pixels) != crc:
        raise ValueError("pixel checksum mismatch")
    return np.frombuffer(data, dtype=np.uint8, count=n, offset=start).reshape(shape)


def _read_file(path: Path) -> bytearray | None:
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            got = f.readinto(data)
    except FileNotFoundError:
        return None
    return data if got == len(data) else data[:got]


class ImageCache:
    """Stage-1 preprocessed images (decoded, grayscale, shorter side shrunk) keyed by file sha256.

    One cache root holds one set per shorter side (``<root>/s<short_side>``), so a new short
    side builds a new set and leaves the others alone. Safe to share between processes:
    entries are written atomically and identical writers produce identical files.

    Args:
        root: folder of the cache (created on the first write).
        short_side: shorter side the images are shrunk to (:func:`~covid_cxr.imaging.pixels.shrink_short_side`), or
            the :class:`~covid_cxr.imaging.pixels.PreprocessSpec` whose stage 1 it stores;
            images already smaller are stored as decoded.

    Raises:
        CacheError: the folder for ``short_side`` was written by another cache format or by a
            resize that gives other pixels (e.g. a different Pillow version).
    """

    def __init__(self, root: str | Path, short_side: int | PreprocessSpec):
        if isinstance(short_side, PreprocessSpec):
            short_side = short_side.base_short_side
        if int(short_side) != short_side or short_side < 1:
            raise ValueError(f"short_side must be a positive integer, got {short_side!r}")
        self.root = Path(root)
        self.short_side = int(short_side)
        self.dir = self.root / f"s{self.short_side}"
        self._meta = {"format": CACHE_FORMAT, "short_side": self.short_side,
                      "stage": "covid_cxr.imaging.pixels.shrink_short_side(load_image(path), short_side)",
                      "resize_fingerprint": _resize_fingerprint(), "pillow": PIL.__version__}
        self._meta_written = self._check_meta()

    def __repr__(self) -> str:
        return f"ImageCache({str(self.root)!r}, short_side={self.short_side})"

    def _check_meta(self) -> bool:
        path = self.dir / "cache.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            raise CacheError(f"{path} is unreadable ({exc}); delete {self.dir} to rebuild this cache") from exc
        if saved.get("format") != CACHE_FORMAT or saved.get("short_side") != self.short_side:
            raise CacheError(f"{self.dir} holds cache format {saved.get('format')} for short side "
                             f"{saved.get('short_side')}, expected format {CACHE_FORMAT} for {self.short_side}; "
                             f"delete {self.dir} to rebuild it")
        if saved.get("resize_fingerprint") != self._meta["resize_fingerprint"]:
            raise CacheError(f"{self.dir} was written by a resize that gives other pixels (Pillow "
                             f"{saved.get('pillow')}, now {PIL.__version__}); its images would differ from freshly "
                             f"decoded ones: delete {self.dir} to rebuild it")
        return True

    def _write_meta(self) -> None:
        if not self._meta_written:
            atomic_write(self.dir / "cache.json", json.dumps(self._meta, indent=2))
            self._meta_written = True

    def entry_path(self, sha256: str) -> Path:
        """Where the entry for ``sha256`` is (or would be) stored."""
        key = _check_sha(sha256)
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, sha256: str) -> np.ndarray | None:
        """The stored (H, W) uint8 image for ``sha256``, or None if absent.

        A damaged entry (truncated, wrong header, checksum mismatch) is logged as a warning,
        removed and reported as absent, so that callers decode the source again.
        """
        return self._lookup(sha256)[0]

    def _lookup(self, sha256: str) -> tuple[np.ndarray | None, bool]:
        """(image or None, whether a damaged entry was found and removed)."""
        path = self.entry_path(sha256)
        data = _read_file(path)
        if data is None:
            return None, False
        try:
            return _decode_entry(data, self.short_side), False
        except (ValueError, EOFError, struct.error) as exc:
            log.warning("damaged image cache entry %s (%s): removed, the image will be decoded again", path, exc)
            path.unlink(missing_ok=True)
            return None, True

    def put(self, sha256: str, image: np.ndarray) -> None:
        """Store an image already shrunk with ``shrink_short_side(load_image(path), self.short_side)``.

        Raises:
            ValueError: ``image`` is not (H, W) uint8 or its shorter side exceeds ``short_side``.
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2 or min(image.shape) < 1:
            raise ValueError(f"expected a (H, W) uint8 image, got {getattr(image, 'dtype', type(image))} "
                             f"{getattr(image, 'shape', '')}")
        if min(image.shape) > self.short_side:
            raise ValueError(f"image {image.shape} is not shrunk to short side {self.short_side}; store "
                             "shrink_short_side(load_image(path), short_side)")
        path = self.entry_path(sha256)
        self._write_meta()
        atomic_write(path, _encode_entry(np.ascontiguousarray(image)))


class MaskCache:
    """Lung masks of a dataset's images, keyed by file sha256, one set per segmenter (its checksum): a dataset's
    images are segmented once for every run that uses that segmenter (``train --lung-view``, crossval folds).

    Masks are stored bit-packed (8 KB at 256 px) in the :class:`ImageCache` entry format (checked the same way)."""

    def __init__(self, root: str | Path, segmenter_key: str, size: int, short_side: int = 256):
        if not re.fullmatch(r"[0-9a-f]{8,64}", segmenter_key or ""):
            raise ValueError(f"a segmenter key is a hex checksum, got {str(segmenter_key)[:40]!r}")
        if size % 8:
            raise ValueError(f"mask size must be a multiple of 8, got {size}")
        self.size = int(size)
        # one set per segmenter and stage-1 short side (the segmenter reads the stage-1 image)
        self._store = ImageCache(Path(root) / "lungs" / f"{segmenter_key[:16]}-s{int(short_side)}", self.size)
        self._unwritable = False

    def get(self, sha256: str) -> np.ndarray | None:
        packed = self._store.get(sha256)
        if packed is None or packed.shape != (self.size, self.size // 8):
            return None
        return np.unpackbits(packed, axis=1).astype(bool)

    def put(self, sha256: str, mask: np.ndarray) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.size, self.size):
            raise ValueError(f"expected a {self.size}x{self.size} mask, got {mask.shape}")
        if self._unwritable:
            return
        try:
            self._store.put(sha256, np.packbits(mask, axis=1))
        except (OutputError, OSError) as exc:  # a read-only cache: the masks are recomputed next time, that is all
            self._unwritable = True
            log.warning("lung masks cannot be kept in %s (%s): they will be computed again on the next run",
                        self._store.root, exc)
