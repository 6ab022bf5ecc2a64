"""The one pass of ``covid-cxr data build`` over every image file: hash, decode, cache, fingerprint.

Each file is hashed (sha256); then, unless a finished record of the same bytes exists, it is decoded
fully (which proves it readable), its preprocessing stage 1 is stored in the image cache and its
near-duplicate fingerprint is computed. What was learnt is stored as a small *record* beside the
cache entries::

    <cache>/records/<algorithm>/<sha[:2]>/<sha>.rec   width, height, fingerprint (optional), CRC-32

A record is written after its cache entry, each atomically, so a build killed at any point leaves
only finished entries; the next build hashes every file again (a changed file has another sha256
and is decoded again) and decodes only the files without a record. ``<algorithm>`` is a digest of
the fingerprint of fixed test patterns: records from another fingerprint algorithm (or another
Pillow) are simply not found.

Work is spread over ``workers`` processes in batches (:func:`covid_cxr.workers.run_batches`), a bounded
number in flight, so memory stays flat however many images there are: the parent keeps sha256, size
and a 6 KB fingerprint per image in arrays (:class:`~covid_cxr.data.dedup.FingerprintTable`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from covid_cxr.data.dedup import THUMB_SIZE, WINDOWS, Fingerprint, FingerprintTable, fingerprint
from covid_cxr.errors import CacheError, ImageReadError
from covid_cxr.files import atomic_write
from covid_cxr.imaging.cache import ImageCache
from covid_cxr.imaging.images import load_image, sha256_file
from covid_cxr.imaging.pixels import BASE_SHORT_SIDE, shrink_short_side
from covid_cxr.workers import run_batches

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<4sIIB")
_MAGIC = b"REC1"
_FP_BYTES = 8 * len(WINDOWS) + len(WINDOWS) * THUMB_SIZE ** 2
BATCH = 32
"""Files per task sent to a worker (fewer round trips than one at a time, small enough to balance)."""


@functools.lru_cache(maxsize=1)
def fingerprint_version() -> str:
    """A digest of :func:`~covid_cxr.data.dedup.fingerprint` on fixed patterns: changes when its output would."""
    h = hashlib.sha256()
    for rows, cols in ((97, 131), (600, 530)):
        yy = np.arange(rows, dtype=np.uint8)[:, None]
        xx = np.arange(cols, dtype=np.uint8)[None, :]
        fp = fingerprint(np.ascontiguousarray((yy * np.uint8(7) + xx * np.uint8(13)) ^ (yy * xx)))
        h.update(repr(fp.phash).encode() + fp.thumbs)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Record:
    """What a decode learnt about one file's bytes."""

    width: int
    height: int
    fingerprint: Fingerprint | None


class RecordStore:
    """Records keyed by sha256 under ``<cache root>/records/<fingerprint version>/``."""

    def __init__(self, cache_root: str | Path):
        self.dir = Path(cache_root) / "records" / fingerprint_version()

    def path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.rec"

    def get(self, sha256: str) -> Record | None:
        """The record, or None when absent or damaged (a damaged one is removed)."""
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            magic, w, h, has_fp = _HEAD.unpack_from(data)
            body = len(data) - 4
            if magic != _MAGIC or body != _HEAD.size + (_FP_BYTES if has_fp else 0):
                raise ValueError("bad header or size")
            if zlib.crc32(memoryview(data)[:body]) != struct.unpack_from("<I", data, body)[0]:
                raise ValueError("checksum mismatch")
        except (ValueError, struct.error) as exc:
            log.warning("damaged record %s (%s): removed, the image will be decoded again", path, exc)
            path.unlink(missing_ok=True)
            return None
        fp = None
        if has_fp:
            n = len(WINDOWS)
            hashes = struct.unpack_from(f"<{n}Q", data, _HEAD.size)
            fp = Fingerprint(phash=tuple(hashes), thumbs=data[_HEAD.size + 8 * n:body])
        return Record(w, h, fp)

    def put(self, sha256: str, record: Record) -> None:
        fp = record.fingerprint
        body = _HEAD.pack(_MAGIC, record.width, record.height, fp is not None)
        if fp is not None:
            body += struct.pack(f"<{len(WINDOWS)}Q", *fp.phash) + fp.thumbs
        atomic_write(self.path(sha256), body + struct.pack("<I", zlib.crc32(body)))


@dataclass(frozen=True)
class Job:
    """What every worker needs to know (sent once per batch; small)."""

    cache_root: str | None
    fingerprints: bool
    reuse: tuple[str, ...] = ()
    """Caches of earlier builds (e.g. the dataset folder being rebuilt) whose entries are linked, not decoded."""


def _link(src: Path, dst: Path) -> bool:
    """Hard-link (else copy atomically) a finished file into this build's cache; False if ``src`` is absent."""
    if not src.is_file():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
    except OSError:  # another file system, or links not supported
        atomic_write(dst, src.read_bytes())
    return True


def _open(root: str, opened: dict | None) -> tuple[ImageCache, RecordStore]:
    """The cache and record store at ``root`` (opening reads and checks cache.json: once per batch, via ``opened``)."""
    if opened is None:
        opened = {}
    if root not in opened:
        opened[root] = (ImageCache(root, BASE_SHORT_SIDE), RecordStore(root))
    return opened[root]


def _reused(sha: str, job: Job, cache: ImageCache, store: RecordStore, opened: dict | None) -> Record | None:
    """A finished record (and cache entry) for ``sha``, from this build's cache or linked from an earlier one."""
    rec = store.get(sha)
    if rec is not None and (rec.fingerprint is not None or not job.fingerprints) and cache.entry_path(sha).is_file():
        return rec
    for root in job.reuse:
        old_cache, old_store = _open(root, opened)
        old = old_store.get(sha)
        if old is None or (job.fingerprints and old.fingerprint is None):
            continue
        if _link(old_cache.entry_path(sha), cache.entry_path(sha)) and _link(old_store.path(sha), store.path(sha)):
            return old
    return None


def inspect_file(path: str, job: Job, opened: dict | None = None) -> dict:
    """Hash one file and, unless a finished record of its bytes exists, decode it fully (proving it readable),
    cache its stage-1 pixels and fingerprint it.

    Returns:
        ``{"sha256", "width", "height", "error", "fingerprint", "decoded"}``; ``error`` is '' or why the
        file cannot be used (then the other fields are empty).
    """
    empty = {"sha256": "", "width": 0, "height": 0, "fingerprint": None, "decoded": False}
    try:
        sha = sha256_file(path)
    except OSError as exc:
        return {**empty, "error": f"cannot open: {exc.strerror or exc}"}
    cache = store = None
    if job.cache_root:
        cache, store = _open(job.cache_root, opened)
        rec = _reused(sha, job, cache, store, opened)
        if rec is not None:
            return {"sha256": sha, "width": rec.width, "height": rec.height, "error": "",
                    "fingerprint": rec.fingerprint if job.fingerprints else None, "decoded": False}
    try:
        arr = load_image(path)
    except ImageReadError as exc:
        return {**empty, "error": exc.reason}
    fp = fingerprint(arr) if job.fingerprints else None
    if cache is not None:
        cache.put(sha, shrink_short_side(arr, BASE_SHORT_SIDE))
        store.put(sha, Record(arr.shape[1], arr.shape[0], fp))  # after the entry: a record means both exist
    return {"sha256": sha, "width": arr.shape[1], "height": arr.shape[0], "error": "", "fingerprint": fp,
            "decoded": True}


def _inspect_batch(paths: Sequence[str], job: Job) -> list[dict]:
    opened: dict = {}
    return [inspect_file(p, job, opened) for p in paths]


# ----------------------------------------------------------------------------- the pass over all files


@dataclass
class Inspected:
    """What the pass learnt about ``n`` files, in their order (arrays, not per-file objects)."""

    sha256: list[str]
    width: np.ndarray
    height: np.ndarray
    error: list[str]
    fingerprints: FingerprintTable | None
    decoded: int = 0
    """Files decoded in this pass (the rest came from finished records)."""
    seconds: float = 0.0
    stale_temp_files: int = field(default=0)


def sweep_temp_files(cache_root: str | Path) -> int:
    """Remove temporary files left by a killed writer (``.NAME.tmp-PID-XXXX``) under ``cache_root``.

    Only call this while holding the dataset's build lock: a live writer's temporary file looks the same.
    """
    n = 0
    for dirpath, _, files in os.walk(cache_root):
        for f in files:
            if f.startswith(".") and ".tmp-" in f:
                Path(dirpath, f).unlink(missing_ok=True)
                n += 1
    return n


def inspect_all(paths: Sequence[str], cache_root: str | Path | None, fingerprints: bool, workers: int,
                reuse: Sequence[str | Path] = (), progress: bool = False) -> Inspected:
    """Run :func:`inspect_file` on every path with ``workers`` processes.

    Raises:
        CacheError: the cache at ``cache_root`` was written by another format or resize (the message says
            how to rebuild it).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    usable_reuse = []
    if cache_root:
        ImageCache(cache_root, BASE_SHORT_SIDE)  # refuse an incompatible cache before any work
        for root in reuse:
            try:
                if Path(root).is_dir() and Path(root).resolve() != Path(cache_root).resolve():
                    ImageCache(root, BASE_SHORT_SIDE)
                    usable_reuse.append(str(root))
            except CacheError as exc:
                log.warning("not reusing the cache %s: %s", root, exc)
    job = Job(str(cache_root) if cache_root else None, fingerprints, tuple(usable_reuse))
    n = len(paths)
    out = Inspected(sha256=[""] * n, width=np.zeros(n, np.int64), height=np.zeros(n, np.int64), error=[""] * n,
                    fingerprints=FingerprintTable(n) if fingerprints else None)
    bar = tqdm(total=n, desc="checking images", disable=not progress)
    k = 0
    try:
        for results in run_batches(functools.partial(_inspect_batch, job=job), list(paths), workers, BATCH,
                                   on_done=bar.update):
            for r in results:
                out.sha256[k], out.width[k], out.height[k], out.error[k] = (r["sha256"], r["width"], r["height"],
                                                                            r["error"])
                if fingerprints and r["fingerprint"] is not None:
                    out.fingerprints[k] = r["fingerprint"]
                out.decoded += r["decoded"]
                k += 1
    finally:
        bar.close()
    out.seconds = time.perf_counter() - t0
    log.info("checked %d files in %.1f s: %d decoded, %d from finished cache records", n, out.seconds, out.decoded,
             n - out.decoded)
    return out
