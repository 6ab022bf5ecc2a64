"""A preprocessed image cache, so epochs and runs do not decode full-resolution files again.

Each image is decoded once with :func:`covid_cxr.images.load_image`, shrunk with exactly
:func:`covid_cxr.images.shrink_short_side` (stage 1 of preprocessing) and stored as one
``.npy`` file keyed by the file's sha256 and the shorter side::

    <root>/s<short_side>/cache.json          format, Pillow version and a resize fingerprint
    <root>/s<short_side>/<sha[:2]>/<sha>.npy  (H, W) uint8, shorter side <= short_side

Stage 2 (:func:`covid_cxr.images.resize_uint8` to the model size) runs on load, so for every
image ``resize_uint8(cache.get(sha), size) == to_model_pixels(load_image(path), size, short_side)``:
cached and uncached paths give identical pixels.

Why one file per image rather than one memory-mapped blob plus an index: on 1,255 real images
(benchmarks/bench_data.py, 2 shared cores) reading entries from a blob was 3.4x faster, but with
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
import time
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import PIL

from covid_cxr.errors import CovidCxrError, DatasetError
from covid_cxr.images import (BASE_SHORT_SIDE, load_image, load_resized_stack, resize_uint8, sha256_file,
                              shrink_short_side)

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of the on-disk layout; a folder written with another version is refused."""

_TRAILER = struct.Struct("<4sI")
_TRAILER_MAGIC = b"CRC1"
_HEADER_MAX = 1024
"""Bytes holding the .npy header; ours take 128."""
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_PARALLEL_MIN = 32
"""Fewer images than this are decoded in-process: starting workers costs more than it saves."""


class CacheError(CovidCxrError):
    """The image cache folder cannot be used as it is (written by another format or resize)."""


def default_workers() -> int:
    """Decoding processes used when none are requested: the usable cores, at most 8."""
    return min(len(os.sched_getaffinity(0)), 8)


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


def _atomic_write_bytes(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Write via a uniquely named temporary file and a rename, removing the temporary file on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        short_side: shorter side the images are shrunk to (:func:`~covid_cxr.images.shrink_short_side`);
            images already smaller are stored as decoded.

    Raises:
        CacheError: the folder for ``short_side`` was written by another cache format or by a
            resize that gives other pixels (e.g. a different Pillow version).
    """

    def __init__(self, root: str | Path, short_side: int = BASE_SHORT_SIDE):
        if int(short_side) != short_side or short_side < 1:
            raise ValueError(f"short_side must be a positive integer, got {short_side!r}")
        self.root = Path(root)
        self.short_side = int(short_side)
        self.dir = self.root / f"s{self.short_side}"
        self._meta = {"format": CACHE_FORMAT, "short_side": self.short_side,
                      "stage": "covid_cxr.images.shrink_short_side(load_image(path), short_side)",
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
            _atomic_write_bytes(self.dir / "cache.json", [json.dumps(self._meta, indent=2).encode()])
            self._meta_written = True

    def at_short_side(self, short_side: int) -> "ImageCache":
        """The set for another shorter side under the same root (this cache if it is the same)."""
        return self if short_side == self.short_side else ImageCache(self.root, short_side)

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
        _atomic_write_bytes(path, [_encode_entry(np.ascontiguousarray(image))])

    def build(self, paths: Sequence[str | Path], sha256s: Sequence[str], workers: int | None = None,
              progress: bool = False) -> dict:
        """Decode and store every image that is not in the cache yet (in parallel).

        Existing entries are read and checked; damaged ones are rebuilt. Each file's bytes are
        checked against its sha256 before its pixels are stored under that key.

        Args:
            paths: image files.
            sha256s: sha256 of each file (the manifest's ``sha256`` column).
            workers: decoding processes (default: usable cores, at most 8).
            progress: show a progress bar.

        Returns:
            ``{"built": n, "reused": n, "damaged": n, "seconds": s}``, counting distinct sha256s;
            ``damaged`` entries were rebuilt and are included in ``built``.

        Raises:
            ImageReadError: a file cannot be decoded (it is named; entries built so far are kept).
            DatasetError: a file's bytes do not match its sha256 (the manifest is stale).
        """
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        todo = _unique_pairs(paths, sha256s)
        missing, damaged = [], 0
        for sha, path in todo.items():
            image, was_damaged = self._lookup(sha)
            damaged += was_damaged
            if image is None:
                missing.append((path, sha))
        bar = tqdm(total=len(missing), desc=f"caching images at short side {self.short_side}", disable=not progress)
        try:
            for (_, sha), image in zip(missing, _decode_many(missing, self.short_side, workers, verify=True)):
                self.put(sha, image)
                bar.update()
        finally:
            bar.close()
        stats = {"built": len(missing), "reused": len(todo) - len(missing), "damaged": damaged,
                 "seconds": round(time.perf_counter() - t0, 3)}
        log.info("image cache %s: built %d, reused %d (%d damaged entries rebuilt) in %.1f s", self.dir,
                 stats["built"], stats["reused"], damaged, stats["seconds"])
        return stats


def _unique_pairs(paths: Sequence[str | Path], sha256s: Sequence[str]) -> dict[str, str]:
    """sha256 -> first path with it (byte-identical files decode to the same pixels)."""
    if len(paths) != len(sha256s):
        raise ValueError(f"{len(paths)} paths but {len(sha256s)} sha256s")
    out: dict[str, str] = {}
    for path, sha in zip(paths, sha256s):
        out.setdefault(_check_sha(sha), str(path))
    return out


def decode_shrunk(path: str | Path, sha256: str | None, short_side: int) -> np.ndarray:
    """``shrink_short_side(load_image(path), short_side)``, after checking the file's sha256 if given.

    Raises:
        ImageReadError: the file cannot be decoded.
        DatasetError: the file's bytes do not match ``sha256``.
    """
    image = load_image(path)  # first, so that a missing or broken file raises ImageReadError naming it
    if sha256 is not None:
        actual = sha256_file(Path(path))
        if actual != sha256:
            raise DatasetError(f"{path} has sha256 {actual}, but {sha256} was expected: the file changed after "
                               "the manifest was built; rebuild it with `covid-cxr data build`")
    return shrink_short_side(image, short_side)


def _decode_job(args: tuple[str, str | None, int]) -> np.ndarray:
    return decode_shrunk(*args)


def _decode_many(items: Sequence[tuple[str, str]], short_side: int, workers: int | None,
                 verify: bool) -> Iterable[np.ndarray]:
    """Yield ``decode_shrunk`` of each (path, sha256) in order, in worker processes when worthwhile."""
    jobs = [(path, sha if verify else None, short_side) for path, sha in items]
    workers = default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or len(jobs) < _PARALLEL_MIN:
        yield from map(_decode_job, jobs)
        return
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)))
    try:
        yield from pool.map(_decode_job, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers))))
    finally:
        # On an error (or an abandoned generator) do not wait for the remaining decodes.
        pool.shutdown(wait=True, cancel_futures=True)


def load_model_pixels(paths: Sequence[str | Path], sha256s: Sequence[str], size: int,
                      base_short_side: int = BASE_SHORT_SIDE, cache: ImageCache | None = None,
                      workers: int | None = None, progress: bool = False, fill: bool = True) -> np.ndarray:
    """Model pixels (both resize stages, :func:`~covid_cxr.images.to_model_pixels`) of many images.

    Images in the cache are loaded from it and only resized to ``size``; the others are decoded
    from their files. Either way the pixels are identical to
    ``to_model_pixels(load_image(path), size, base_short_side)``.

    Args:
        paths: image files.
        sha256s: sha256 of each file (the manifest's ``sha256`` column); the cache key.
        size: side of the square output.
        base_short_side: stage-1 shorter side. If ``cache`` was opened for another short side,
            the set for ``base_short_side`` under the same root is used.
        cache: the cache, or None to decode every file.
        workers: decoding processes for images not in the cache (default: usable cores, at most 8).
        progress: show a progress bar.
        fill: store images decoded here in the cache (after checking their sha256), so the
            next run finds them.

    Returns:
        (N, size, size) uint8 array in the order of ``paths``.

    Raises:
        ImageReadError: a file that had to be decoded cannot be (it is named).
        DatasetError: with ``fill``, a decoded file does not match its sha256.
    """
    from tqdm.auto import tqdm

    if len(paths) != len(sha256s):
        raise ValueError(f"{len(paths)} paths but {len(sha256s)} sha256s")
    if cache is None:
        return load_resized_stack(paths, size, base_short_side, workers=workers, progress=progress)
    cache = cache.at_short_side(base_short_side)
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    missing: dict[str, list[int]] = {}
    first_path: dict[str, str] = {}
    hits = 0
    for i, (path, sha) in enumerate(zip(tqdm(paths, desc="loading cached images", disable=not progress),
                                        sha256s)):
        key = _check_sha(sha)
        if key in missing:
            missing[key].append(i)
            continue
        image = cache.get(key)
        if image is None:
            missing[key] = [i]
            first_path[key] = str(path)
            continue
        out[i] = resize_uint8(image, size)
        hits += 1
    items = [(first_path[key], key) for key in missing]
    decoded = _decode_many(items, base_short_side, workers, verify=fill)
    for (_, key), image in zip(items, tqdm(decoded, total=len(items), desc="decoding images not in the cache",
                                         disable=not progress or not items)):
        if fill:
            cache.put(key, image)
        out[missing[key]] = resize_uint8(image, size)
    log.info("model pixels at %d px: %d images from the cache %s, %d decoded%s", size, hits, cache.dir,
             len(items), " and stored" if fill and items else "")
    return out
