"""Near-duplicate chest X-rays within and across sources, found before splitting.

The same radiograph reappears across public collections re-encoded, rescaled (often squashed
to 224x224 RGB), cropped a little, or with other brightness and contrast. Those copies must be
grouped before the split. Distinct radiographs must not be grouped, and that is the hard part:
at low resolution unrelated adult chest X-rays look alike (16x16 correlations reach 0.95-0.98).

Method, in two stages:

1. **Candidates from perceptual hashes.** :func:`fingerprint` cuts six *windows* from the image:
   the whole image squashed to a square ("full") and its central square ("centre-square", which
   matches copies cropped to a square), each at 100%, 95% and 90% of its size around the centre.
   Every window gets a 64-bit pHash (``imagehash.phash``). A pair is a candidate when one of
   :data:`COMBOS` (the same window on both sides, or a 95%/90% window on one side against the
   100% window on the other, which lines up centre crops of up to ~12%) is within
   ``max_hash_distance`` bits. Hamming distances are computed in numpy blocks, never in a
   Python loop over pairs.
2. **Confirmation on pixels.** For each candidate window pair, the 32x32 thumbnails (histogram
   equalised, which removes brightness, contrast and gamma changes) are high-pass filtered
   (thumbnail minus its Gaussian blur, sigma 1 px, clipped at 2.5 SD), so the shared layout
   of every chest X-ray drops out and the detail of this radiograph remains. Their correlation
   is computed with each quadrant free to shift by up to 1 px (3% of the image), which absorbs
   a small residual scale or offset from a crop. That score is :attr:`DuplicatePair.similarity`.

Thresholds (``max_hash_distance=8``, ``min_similarity=0.75``) were chosen on the 1,255 real
images in ``shared/data/cxr`` and on 120 of them copied synthetically:

* copies by JPEG q60, halving, a 224x224 RGB squash, centre crops of 5% and 10% (also then
  squashed), brightness +10/+30 and gamma 0.8 (1,080 pairs): hash distance <= 6 bits, similarity
  >= 0.80, 0.5th percentile 0.96; all found;
* the 57 listed duplicate pairs: hash distance <= 2, similarity 0.947-1.0 (median 0.993);
* true copies the list lacks (uneven re-crops, a change of aspect or contrast): 0.77-0.91;
* the other 1,583 candidate pairs (the top ones, checked by eye, are different patients): median
  0.42, 99th percentile 0.59, maximum 0.64. Their upper tail falls by a factor e per 0.02, which
  puts about one false pair above 0.78 (a few above 0.75) among the 200 million pairs of
  20,000 images;
* different exposures of the *same* patient in a near-identical position: 0.64-0.85, so some are
  grouped; for a patient-level split that is harmless.

Not caught: rotated or mirrored copies, and often copies cropped on one side only by more than
a few percent, because their pHash moves by 10 bits or more and candidates that far apart would
be far too many (of 120 images with 6% cut from the top 105 were found, with 8% cut from one side
22; in the real collection a copy with 4% cut from one side and squashed is missed). Flat images
have no detail and never match.

Speed: candidates are found with multi-index hashing (:mod:`covid_cxr.data.hamming`), not by comparing
all pairs: the same candidates, in time that grows with the number of candidates rather than with
n**2. Each thumbnail is high-passed once and its shift energies computed once, however many
candidates share it; only the correlations are per pair. Fingerprints are kept as arrays
(:class:`FingerprintTable`, ~6 KB per image). ``benchmarks/bench_build.py`` measures the whole
build on 1,255 real and 20,000 and 100,000 synthetic images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from covid_cxr.data.hamming import window_pairs
from covid_cxr.workers import run_batches

log = logging.getLogger(__name__)

WINDOWS: tuple[tuple[str, float], ...] = (
    ("full", 1.0), ("full", 0.95), ("full", 0.90),
    ("centre-square", 1.0), ("centre-square", 0.95), ("centre-square", 0.90),
)
"""(view, fraction) of every window in a fingerprint, in storage order. "full" is the whole image
(squashed to a square), "centre-square" its central square; the fraction is the central part kept."""

COMBOS: tuple[tuple[int, int], ...] = (
    (0, 0), (1, 0), (2, 0), (0, 1), (0, 2),
    (3, 3), (4, 3), (5, 3), (3, 4), (3, 5),
)
"""Window pairs (window of image i, window of image j) that are compared. A centre crop by c of
one image lines up with the (1 - c) window of the other."""

# WINDOWS lists the full windows, then the centre-square windows at the same fractions, so for a
# square image the second half of a fingerprint repeats the first.
_N_FULL = sum(view == "full" for view, _ in WINDOWS)
_CENTRE_SQUARE_COMBO = np.array([a >= _N_FULL for a, _ in COMBOS])

THUMB_SIZE = 32
"""Side of the equalised thumbnails used to confirm candidates."""

HASH_INPUT_SIZE = 64
"""Side of the window image handed to ``imagehash.phash`` (which reduces it to 32x32)."""

HIGHPASS_SIGMA = 1.0
"""Gaussian sigma (thumbnail pixels) of the blur subtracted to high-pass the thumbnails."""

HIGHPASS_CLIP = 2.5
"""High-pass values are clipped at this many standard deviations, so that a strong edge (an image
border, a burned-in label) cannot dominate the correlation."""

MAX_SHIFT = 1
"""Each quadrant of the thumbnail may shift by up to this many pixels when correlating."""

_BASE_SHORT_SIDE = 256
"""Images with a shorter side over twice this are first box-reduced by an integer factor (aspect
kept) to about this size; the 64 px windows are cut from that, which makes large files ~30x faster
to fingerprint and changes the 64 px windows only by rounding."""


@dataclass(frozen=True)
class Fingerprint:
    """What near-duplicate search keeps of one image (about 6 KB, picklable).

    Attributes:
        phash: 64-bit pHash of each window in :data:`WINDOWS` order, as ints.
        thumbs: histogram-equalised ``THUMB_SIZE`` x ``THUMB_SIZE`` uint8 thumbnail of each window,
            concatenated as bytes (immutable, so the dataclass stays hashable).
    """

    phash: tuple[int, ...]
    thumbs: bytes

    def __post_init__(self) -> None:
        if len(self.phash) != len(WINDOWS) or len(self.thumbs) != len(WINDOWS) * THUMB_SIZE ** 2:
            raise ValueError(f"a Fingerprint holds {len(WINDOWS)} hashes and {len(WINDOWS)} thumbnails of "
                             f"{THUMB_SIZE}x{THUMB_SIZE}; got {len(self.phash)} and {len(self.thumbs)} bytes")

    def thumbnails(self) -> np.ndarray:
        """The thumbnails as a read-only (len(WINDOWS), THUMB_SIZE, THUMB_SIZE) uint8 array."""
        return np.frombuffer(self.thumbs, dtype=np.uint8).reshape(len(WINDOWS), THUMB_SIZE, THUMB_SIZE)


class FingerprintTable:
    """The fingerprints of many images as two arrays, rather than one object per image (a 100,000-image
    build keeps ~6 KB per image and no Python object per image).

    Attributes:
        phash: (n, len(WINDOWS)) uint64, :attr:`Fingerprint.phash` per row.
        thumbs: (n, len(WINDOWS), THUMB_SIZE, THUMB_SIZE) uint8, :meth:`Fingerprint.thumbnails` per row.
    """

    def __init__(self, n: int):
        self.phash = np.zeros((n, len(WINDOWS)), dtype=np.uint64)
        self.thumbs = np.zeros((n, len(WINDOWS), THUMB_SIZE, THUMB_SIZE), dtype=np.uint8)
        self.rows: np.ndarray | None = None
        """Row of ``thumbs`` for each row of ``phash`` (None: the same row); :meth:`take` shares ``thumbs``."""

    @classmethod
    def of(cls, fps: "Sequence[Fingerprint] | FingerprintTable") -> "FingerprintTable":
        """``fps`` as a table (a table is returned as it is)."""
        if isinstance(fps, FingerprintTable):
            return fps
        table = cls(len(fps))
        for k, fp in enumerate(fps):
            table[k] = fp
        return table

    def __len__(self) -> int:
        return len(self.phash)

    def _row(self, k):
        return k if self.rows is None else self.rows[k]

    def __setitem__(self, k: int, fp: Fingerprint) -> None:
        self.phash[k] = np.array(fp.phash, dtype=np.uint64)
        self.thumbs[self._row(k)] = fp.thumbnails()

    def __getitem__(self, k: int) -> Fingerprint:
        return Fingerprint(phash=tuple(int(h) for h in self.phash[k]), thumbs=self.thumbs[self._row(k)].tobytes())

    def window_thumbs(self, images: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """(P, THUMB_SIZE, THUMB_SIZE) thumbnails of window ``windows[p]`` of image ``images[p]``."""
        return self.thumbs[self._row(images), windows]

    def take(self, rows: Sequence[int] | np.ndarray) -> "FingerprintTable":
        """A table of the given rows, in that order; it shares the thumbnails (no copy of ~6 KB per image)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = FingerprintTable(0)
        out.phash, out.thumbs, out.rows = self.phash[rows], self.thumbs, self._row(rows)
        return out

    def square(self) -> np.ndarray:
        """(n,) bool: the centre-square windows repeat the full ones (a square image)."""
        same = (self.phash[:, :_N_FULL] == self.phash[:, _N_FULL:]).all(1)
        for k in np.flatnonzero(same):  # only the few whose hashes agree need their thumbnails compared
            t = self.thumbs[self._row(k)]
            same[k] = np.array_equal(t[:_N_FULL], t[_N_FULL:])
        return same


@dataclass(frozen=True)
class DuplicatePair:
    """Two images confirmed to be copies of one radiograph.

    Attributes:
        i: index of the first image in the fingerprint list (``i < j``).
        j: index of the second image.
        hash_distance: Hamming distance (bits of 64) between the pHashes of the windows that matched.
        similarity: high-pass correlation of the matched windows' equalised 32x32 thumbnails, each
            quadrant allowed a 1 px shift (1.0 identical; different patients measured <= 0.64).
        method: the windows that matched, e.g. ``"full"``, ``"centre-square"``, or
            ``"full 95%/100%"`` (the central 95% of image i against the whole of image j).
    """

    i: int
    j: int
    hash_distance: int
    similarity: float
    method: str


def _window_box(h: int, w: int, view: str, fraction: float) -> tuple[float, float, float, float]:
    """(left, upper, right, lower) of a centred window of an h x w image."""
    if view == "centre-square":
        bh = bw = min(h, w)
    else:
        bh, bw = h, w
    ch, cw = bh * fraction, bw * fraction
    top, left = (h - ch) / 2, (w - cw) / 2
    return left, top, left + cw, top + ch


def _equalise(thumb: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a uint8 array by mid-ranks (ties share a value; a flat image stays flat)."""
    hist = np.bincount(thumb.ravel(), minlength=256)
    below = np.cumsum(hist) - hist
    mid = below + (hist - 1) / 2.0
    scale = 255.0 / max(thumb.size - 1, 1)
    return np.round(mid * scale).astype(np.uint8)[thumb]


def fingerprint(image: np.ndarray) -> Fingerprint:
    """Fingerprint one decoded image for :func:`find_near_duplicates`.

    Args:
        image: (H, W) uint8 grayscale array, as returned by :func:`covid_cxr.imaging.images.load_image`.

    Returns:
        The pHashes and equalised thumbnails of the :data:`WINDOWS`. Pure: the same pixels always
        give the same fingerprint.

    Raises:
        ValueError: the image is not a 2-D uint8 array.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 image from load_image, got "
                         f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    h, w = image.shape
    base = Image.fromarray(image)
    if min(h, w) > 2 * _BASE_SHORT_SIDE:
        # Box averaging down to >= 256 px first: the 64 px windows come out the same, ~30x faster.
        factor = min(h, w) // _BASE_SHORT_SIDE
        base = base.reduce(factor)
    sx, sy = base.width / w, base.height / h
    hash_px, thumbs = [], []
    for view, fraction in WINDOWS:
        left, top, right, bottom = _window_box(h, w, view, fraction)
        box = (left * sx, top * sy, right * sx, bottom * sy)
        win = base.resize((HASH_INPUT_SIZE, HASH_INPUT_SIZE), Image.Resampling.BOX, box=box)
        hash_px.append(np.asarray(win.resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS)))
        thumbs.append(np.asarray(win.reduce(HASH_INPUT_SIZE // THUMB_SIZE)))
    return Fingerprint(phash=_phash_many(np.stack(hash_px)), thumbs=_equalise_many(np.stack(thumbs)).tobytes())


_PHASH_SIDE = 32
"""``imagehash.phash`` (hash_size 8, highfreq_factor 4) shrinks its input to 32x32 with Lanczos."""


def _phash_many(pixels: np.ndarray) -> tuple[int, ...]:
    """``int(str(imagehash.phash(window)), 16)`` for a stack of windows already shrunk to 32x32, bit for bit
    (the same DCT, median and bit order, one call for all windows instead of one per window)."""
    import scipy.fftpack

    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=1), axis=2)[:, :8, :8].reshape(len(pixels), 64)
    bits = dct > np.median(dct, axis=1, keepdims=True)
    return tuple(int.from_bytes(row.tobytes(), "big") for row in np.packbits(bits, axis=1))


def _equalise_many(thumbs: np.ndarray) -> np.ndarray:
    """:func:`_equalise` of each image in a (P, S, S) uint8 stack, in one pass."""
    p = len(thumbs)
    hist = np.bincount((np.arange(p)[:, None, None] * 256 + thumbs).ravel(), minlength=256 * p).reshape(p, 256)
    below = np.cumsum(hist, axis=1) - hist
    mid = below + (hist - 1) / 2.0
    scale = 255.0 / max(thumbs[0].size - 1, 1)
    lut = np.round(mid * scale).astype(np.uint8)
    return np.take_along_axis(lut, thumbs.reshape(p, -1).astype(np.intp), axis=1).reshape(thumbs.shape)


def hash_candidates(hashes: np.ndarray, max_distance: int, method: str = "auto", block: int = 64,
                    workers: int = 1) -> np.ndarray:
    """Rows (i, j, combo, distance), i < j, of every :data:`COMBOS` window pair within ``max_distance`` bits,
    sorted (see :func:`covid_cxr.data.hamming.window_pairs`)."""
    return window_pairs(hashes, COMBOS, max_distance, method, block, workers)


def _highpass_int8(thumbs: np.ndarray) -> np.ndarray:
    """(P, S, S) uint8 equalised thumbnails -> high-passed detail, clipped, as int8.

    Values are clipped at ``HIGHPASS_CLIP`` standard deviations and scaled so the clip maps to
    127: correlations ignore each thumbnail's scale, and int8 keeps 20,000 images in ~120 MB.
    """
    from scipy.ndimage import gaussian_filter

    x = thumbs.astype(np.float32) / 255.0
    x -= gaussian_filter(x, sigma=(0, HIGHPASS_SIGMA, HIGHPASS_SIGMA), mode="nearest")
    limit = HIGHPASS_CLIP * x.std(axis=(1, 2), keepdims=True)
    scaled = np.clip(x, -limit, limit) * (127.0 / np.maximum(limit, 1e-12))
    return np.round(scaled).astype(np.int8)


def _quadrant_sums(a: np.ndarray) -> np.ndarray:
    """(P, S, S) -> (P, 4) sums over the four quadrants (contiguous reductions; each value is summed in the
    same order whatever P is, so values computed per image and per pair are bit-identical)."""
    p, s, _ = a.shape
    half = s // 2
    return a.reshape(p, s, 2, half).sum(-1).reshape(p, 2, half, 2).sum(2).reshape(p, 4)


def _shifts(max_shift: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(2 * max_shift + 1) for dx in range(2 * max_shift + 1)]


def _shift_energies(y: np.ndarray, max_shift: int = MAX_SHIFT) -> np.ndarray:
    """(len(shifts), P, 4) quadrant energies of ``y`` under every shift: they depend on ``y`` alone, so
    :func:`find_near_duplicates` computes them once per thumbnail rather than once per candidate pair."""
    p, s, _ = y.shape
    m = max_shift
    padded = np.pad(y, ((0, 0), (m, m), (m, m)))
    shifts = _shifts(m)
    energy = np.empty((len(shifts), p, 4), dtype=np.float32)
    for k, (dy, dx) in enumerate(shifts):
        shifted = padded[:, dy:dy + s, dx:dx + s]
        energy[k] = _quadrant_sums(shifted * shifted)
    return energy


def _elastic_correlation(x: np.ndarray, y: np.ndarray, max_shift: int = MAX_SHIFT, energy: np.ndarray | None = None,
                         x_energy: np.ndarray | None = None) -> np.ndarray:
    """Correlation of x and y where each quadrant of y may shift by up to ``max_shift`` pixels.

    Per quadrant the shift with the highest local correlation is chosen; the score pools the
    quadrants' products and energies, so it equals the plain correlation when no shift helps.

    Args:
        x, y: (P, S, S) float32 arrays (S even), already high-passed.
        energy: ``_shift_energies(y)`` if already known; x_energy: ``_quadrant_sums(x * x)`` if known
            (the result is the same, bit for bit).

    Returns:
        (P,) scores in [-1, 1]; 0 where either image has no detail at all.
    """
    p, s, _ = x.shape
    m = max_shift
    shifts = _shifts(m)
    padded = np.pad(y, ((0, 0), (m, m), (m, m)))
    if energy is None:
        energy = _shift_energies(y, m)
    if x_energy is None:
        x_energy = _quadrant_sums(x * x)
    num = np.empty((len(shifts), p, 4), dtype=np.float32)
    for k, (dy, dx) in enumerate(shifts):
        num[k] = _quadrant_sums(x * padded[:, dy:dy + s, dx:dx + s])
    best = (num / np.sqrt(energy + 1e-12)).argmax(0)[None]
    best_num = np.take_along_axis(num, best, 0)[0].sum(1)
    best_energy = np.take_along_axis(energy, best, 0)[0].sum(1)
    denom = np.sqrt(x_energy.sum(1) * best_energy)
    return np.where(denom > 1e-12, best_num / np.maximum(denom, 1e-12), 0.0).astype(np.float32)


class _PairChunks:
    """Candidate pairs cut into chunks of what scoring them needs (built only when a chunk is taken)."""

    def __init__(self, detail, energy, self_energy, left, right, size: int):
        self.detail, self.energy, self.self_energy = detail, energy, self_energy
        self.left, self.right, self.size = left, right, size

    def __len__(self) -> int:
        return -(-len(self.left) // self.size)

    def __getitem__(self, k: slice) -> list[tuple]:
        out = []
        for c in range(*k.indices(len(self))):
            lk, rk = self.left[c * self.size:(c + 1) * self.size], self.right[c * self.size:(c + 1) * self.size]
            out.append((self.detail[lk], self.detail[rk], self.energy[:, rk], self.self_energy[lk]))
        return out


def _score_chunks(chunks: list[tuple]) -> np.ndarray:
    return np.concatenate([_elastic_correlation(x.astype(np.float32), y.astype(np.float32), energy=e, x_energy=xe)
                           for x, y, e, xe in chunks])


def _method(a: int, b: int) -> str:
    (view, fa), (_, fb) = WINDOWS[a], WINDOWS[b]
    return view if fa == fb == 1.0 else f"{view} {fa:.0%}/{fb:.0%}"


def find_near_duplicates(fps: Sequence[Fingerprint] | FingerprintTable, max_hash_distance: int = 8,
                         min_similarity: float = 0.75, block_rows: int = 64, chunk_pairs: int = 4096,
                         method: str = "auto", workers: int = 1) -> list[DuplicatePair]:
    """All pairs of images confirmed to be copies of the same radiograph.

    Args:
        fps: fingerprints from :func:`fingerprint`, one per image (or a :class:`FingerprintTable`); pair
            indices refer to this order.
        max_hash_distance: a window pair is a candidate when its pHashes differ in at most this many
            of 64 bits. Copies made by re-encoding, rescaling, squashing, centre crops or brightness
            and gamma changes measured at most 6 (pHash distances are even); distinct chest X-rays
            have a median of 24, and 0.2% of pairs are within 8 in some window pair. 6 is ~4x
            faster on large collections and loses some unevenly cropped copies.
        min_similarity: a candidate is confirmed when the high-pass thumbnail correlation
            (:attr:`DuplicatePair.similarity`) reaches this. Measured: synthetic copies >= 0.80
            (0.5th percentile 0.96), listed copies >= 0.947, unevenly re-cropped copies >= 0.77,
            different patients <= 0.64.
        block_rows: rows of the Hamming-distance matrices computed at once (memory ~10 * block_rows * n bytes).
        chunk_pairs: candidate window pairs scored at once (memory ~30 KB each).
        method: how hash candidates are found: ``"index"`` (multi-index hashing, sub-quadratic),
            ``"all-pairs"`` or ``"auto"``; the result is the same.
        workers: processes for the hash search and the scoring (the result is the same).

    Returns:
        One :class:`DuplicatePair` per confirmed pair (the best-scoring window pair), sorted by (i, j).

    Raises:
        ValueError: ``max_hash_distance`` outside 0..64 or ``min_similarity`` outside (0, 1].
    """
    if not 0 <= max_hash_distance <= 64:
        raise ValueError(f"max_hash_distance must be between 0 and 64 bits, got {max_hash_distance}")
    if not 0.0 < min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be in (0, 1], got {min_similarity}")
    n = len(fps)
    if n < 2:
        return []
    table = FingerprintTable.of(fps)
    cand = hash_candidates(table.phash, max_hash_distance, method, block_rows, workers)
    # For a square image the centre-square windows are the full windows; when both images are
    # square, a centre-square row repeats a full row, so it is not scored twice.
    square = table.square()
    repeat = _CENTRE_SQUARE_COMBO[cand[:, 2]] & square[cand[:, 0]] & square[cand[:, 1]]
    cand = cand[~repeat]
    log.info("near-duplicates: %d images, %d candidate window pairs within %d bits", n, len(cand), max_hash_distance)
    if len(cand) == 0:
        return []
    # High-pass each (image, window) thumbnail once, however many candidates share it.
    nw = len(WINDOWS)
    combos = np.array(COMBOS)
    keys, inverse = np.unique(np.concatenate([cand[:, 0] * nw + combos[cand[:, 2], 0],
                                              cand[:, 1] * nw + combos[cand[:, 2], 1]]), return_inverse=True)
    detail = np.empty((len(keys), THUMB_SIZE, THUMB_SIZE), dtype=np.int8)
    n_shifts = len(_shifts(MAX_SHIFT))
    energy = np.empty((n_shifts, len(keys), 4), dtype=np.float32)  # per thumbnail, not per pair (~150 B each)
    self_energy = np.empty((len(keys), 4), dtype=np.float32)
    for s in range(0, len(keys), chunk_pairs):
        part = keys[s:s + chunk_pairs]
        detail[s:s + len(part)] = _highpass_int8(table.window_thumbs(part // nw, part % nw))
        d = detail[s:s + len(part)].astype(np.float32)
        energy[:, s:s + len(part)] = _shift_energies(d)
        self_energy[s:s + len(part)] = _quadrant_sums(d * d)
    left, right = inverse[:len(cand)], inverse[len(cand):]
    chunks = _PairChunks(detail, energy, self_energy, left, right, chunk_pairs)
    scored = run_batches(_score_chunks, chunks, workers, batch=1, fresh=True)  # the table is large: fresh workers
    scores = np.concatenate([np.zeros(0, np.float32)] + list(scored))
    keep = scores >= min_similarity
    cand, scores = cand[keep], scores[keep]
    # Best window pair per image pair: sort by pair, then score descending, then combo, so ties
    # resolve the same way whatever the block sizes (lexsort: last key first).
    order = np.lexsort((cand[:, 2], -scores, cand[:, 1], cand[:, 0]))
    cand, scores = cand[order], scores[order]
    first = np.ones(len(cand), dtype=bool)
    first[1:] = (cand[1:, 0] != cand[:-1, 0]) | (cand[1:, 1] != cand[:-1, 1])
    return [DuplicatePair(i=int(i), j=int(j), hash_distance=int(d), similarity=round(float(sc), 4),
                          method=_method(*COMBOS[k]))
            for (i, j, k, d), sc in zip(cand[first], scores[first])]


def cluster(n: int, pairs: Sequence[DuplicatePair]) -> np.ndarray:
    """Group images joined by duplicate pairs, transitively (connected components).

    Args:
        n: number of images.
        pairs: confirmed pairs with indices below ``n``.

    Returns:
        (n,) int64 cluster id per image; ids are 0..k-1, numbered by each cluster's smallest index,
        and an image without duplicates is a cluster of its own.

    Raises:
        ValueError: a pair refers to an index outside 0..n-1.
    """
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for p in pairs:
        if not (0 <= p.i < n and 0 <= p.j < n):
            raise ValueError(f"pair ({p.i}, {p.j}) is outside 0..{n - 1}")
        ra, rb = root(p.i), root(p.j)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(a) for a in range(n)], dtype=np.int64)
    _, ids = np.unique(roots, return_inverse=True)
    return ids.astype(np.int64)
