"""Near neighbours in Hamming space: every pair of 64-bit hashes within ``r`` bits, without all pairs.

Multi-index hashing (Norouzi, Punjani and Fleet, 2012): the 64 bits are cut into ``m`` chunks. If
two hashes differ in at most ``r`` bits, then (pigeonhole) some chunk differs in at most
``r // m`` bits. Each side's chunk values are indexed in a direct-address table (bucket start
offsets for every possible chunk value); a query probes, in every chunk, its own value XOR each
mask of at most ``r // m`` bits, and every hash in the probed buckets is a candidate whose full
distance is then checked. A pair is reported by the first chunk that finds it only, so each pair
comes out once.

Chunks take every m-th bit (bit b goes to chunk b % m) rather than runs of neighbouring bits: the
bits of a pHash are DCT signs in row-major order, and neighbours are correlated (the first ones
almost constant on chest X-rays); interleaving spreads what entropy there is evenly over the chunks,
so buckets stay small.

The result is exactly the set an all-pairs comparison returns: the index only avoids looking at
pairs that cannot be within ``r`` bits.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import numpy as np

MAX_CHUNK_BITS = 22
"""Largest chunk width indexed by a direct-address table (2**22 offsets, 16 MB of int32)."""

PAIRS_PER_STEP = 4_000_000
"""Candidate pairs materialised at once (about 100 MB of temporaries)."""


def popcount64(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Number of set bits of each uint64 as uint8 (numpy >= 2 has it built in)."""
    if out is None:
        out = np.empty(x.shape, dtype=np.uint8)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x, out=out)
    table = np.array([bin(k).count("1") for k in range(256)], dtype=np.uint8)
    out[...] = table[x.view(np.uint8).reshape(*x.shape, 8)].sum(-1, dtype=np.uint8)
    return out


def _masks(bits: int, radius: int) -> np.ndarray:
    """Every ``bits``-bit mask with at most ``radius`` bits set, as int64."""
    out = [0]
    for k in range(1, radius + 1):
        out += [sum(1 << b for b in combo) for combo in itertools.combinations(range(bits), k)]
    return np.array(out, dtype=np.int64)


_COST_PROBE, _COST_HIT, _COST_PAIR = 35.0, 17.0, 1.0
"""Relative costs, measured on 20,000 synthetic chest-like images (2 cores): one bucket probe (~0.1 us: two
random reads of a table that does not fit the cache), one candidate taken from a bucket and checked (~0.05 us),
one hash pair compared in the all-pairs matrices (~3 ns)."""


def plan(hashes: np.ndarray, r: int, pairs_per_hash: float = 1.0, sample: int = 512) -> int | None:
    """Number of chunks for searching ``hashes`` (n,) within ``r`` bits, or None when comparing all pairs is cheaper.

    Real hashes are not uniform (chest X-ray pHashes share their low frequencies), so the number of
    candidates each chunking yields is measured on ``sample`` of the hashes as queries, not assumed.
    ``pairs_per_hash``: hash pairs the all-pairs route compares per image pair (its cost multiplier).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    best, best_cost = None, _COST_PAIR * pairs_per_hash * n * n / 2
    queries = hashes[np.linspace(0, n - 1, min(n, sample)).astype(np.int64)] if n else hashes
    for m in range(2, min(r + 1, 64) + 1):
        bits = math.ceil(64 / m)
        if bits > MAX_CHUNK_BITS:
            continue
        probe_cost = _COST_PROBE * n * m * len(_masks(bits, r // m))
        if probe_cost >= best_cost:
            continue
        index = ChunkIndex(hashes, m)
        hits = 0
        for c in range(m):
            probe = index.chunk(queries, c)[:, None] ^ _masks(len(index.positions[c]), r // m)[None, :]
            hits += int((index.starts[c][probe + 1] - index.starts[c][probe]).sum())
        cost = probe_cost + _COST_HIT * hits * n / max(1, len(queries))
        if cost < best_cost:
            best, best_cost = m, cost
    return best


class ChunkIndex:
    """A direct-address index of one set of 64-bit hashes, chunk by chunk."""

    def __init__(self, hashes: np.ndarray, m: int):
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.m = m
        self.positions = [np.arange(c, 64, m, dtype=np.uint64) for c in range(m)]
        self.masks64 = [np.bitwise_or.reduce(np.uint64(1) << p) for p in self.positions]
        self.order, self.starts = [], []
        for c in range(m):
            v = self.chunk(self.hashes, c)
            self.order.append(np.argsort(v, kind="stable").astype(np.int64))
            counts = np.bincount(v, minlength=1 << len(self.positions[c]))
            self.starts.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def chunk(self, hashes: np.ndarray, c: int) -> np.ndarray:
        """The compact value (bits of chunk ``c`` packed together) of each hash, as int64."""
        out = np.zeros(hashes.shape, dtype=np.uint64)
        for k, b in enumerate(self.positions[c]):
            out |= ((hashes >> b) & np.uint64(1)) << np.uint64(k)
        return out.astype(np.int64)


def _expand(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + c)`` for every (start, count), vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + (np.arange(total, dtype=np.int64) - offsets)


def search(queries: np.ndarray, index: ChunkIndex, r: int, rows_per_step: int = 2048) -> tuple[np.ndarray, ...]:
    """Every (x, y) with ``popcount(queries[x] ^ index.hashes[y]) <= r``.

    Returns:
        (x, y, distance) arrays (int64, int64, uint8), in no particular order; each pair once.
    """
    m = index.m
    k = r // m
    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    out_x, out_y, out_d = [], [], []
    for c in range(m):
        masks = _masks(len(index.positions[c]), k)
        qv = index.chunk(queries, c)
        step = max(1, min(rows_per_step, PAIRS_PER_STEP // max(1, len(masks))))
        for q0 in range(0, len(queries), step):
            probe = qv[q0:q0 + step, None] ^ masks[None, :]  # (rows, masks)
            lo = index.starts[c][probe]
            cnt = index.starts[c][probe + 1] - lo
            per_row = cnt.sum(1)
            # Cap the pairs materialised at once: a step ends where the running count passes the cap.
            cum = np.cumsum(per_row)
            r0 = 0
            while r0 < len(per_row):
                base = int(cum[r0 - 1]) if r0 else 0
                r1 = max(r0 + 1, int(np.searchsorted(cum, base + PAIRS_PER_STEP, side="right")))
                ys = index.order[c][_expand(lo[r0:r1].ravel(), cnt[r0:r1].ravel())]
                xs = np.repeat(np.arange(q0 + r0, q0 + r1, dtype=np.int64), per_row[r0:r1])
                r0 = r1
                xor = queries[xs] ^ index.hashes[ys]
                d = popcount64(xor)
                ok = d <= r
                # Report a pair from the first chunk within r // m bits only (it is found there).
                for c_prev in range(c):
                    ok &= popcount64(xor & index.masks64[c_prev]) > k
                out_x.append(xs[ok])
                out_y.append(ys[ok])
                out_d.append(d[ok])
    if not out_x:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(out_x), np.concatenate(out_y), np.concatenate(out_d)


# ----------------------------------------------------------------------------- pairs of windows of images


def _all_pairs(hashes: np.ndarray, combos, max_distance: int, block: int) -> np.ndarray:
    """Rows (i, j, combo, distance) with i < j for every combo within ``max_distance`` bits, from the full
    (n, n) distance matrices.

    The (n, n) distance matrices are computed ``block`` rows at a time into reused buffers, so
    memory stays at ~10 * block * n bytes while n**2 / 2 * len(combos) distances are checked.
    """
    n = len(hashes)
    by_window = np.ascontiguousarray(hashes.T)  # (windows, n): contiguous rows for broadcasting
    xor = np.empty((block, n), dtype=np.uint64)
    dist = np.empty((block, n), dtype=np.uint8)
    near = np.empty((block, n), dtype=bool)
    found = []
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        rows, cols = i1 - i0, n - i0
        # Column k of this block is image i0 + k; keep only j > i (the diagonal block's upper triangle).
        upper = np.arange(cols)[None, :] > np.arange(rows)[:, None]
        for c, (a, b) in enumerate(combos):
            x = np.bitwise_xor(by_window[a, i0:i1, None], by_window[b, None, i0:], out=xor[:rows, :cols])
            d = popcount64(x, out=dist[:rows, :cols])
            ok = np.less_equal(d, max_distance, out=near[:rows, :cols])
            ok &= upper
            ii, jj = np.nonzero(ok)
            if len(ii):
                found.append(np.stack([ii + i0, jj + i0, np.full(len(ii), c), d[ii, jj]], axis=1).astype(np.int64))
    if not found:
        return np.zeros((0, 4), dtype=np.int64)
    return np.concatenate(found)


def _search_pairs(window_pairs_: Sequence[tuple[int, int]], hashes: np.ndarray, combos: list, max_distance: int,
                  m: int) -> list[np.ndarray]:
    """Rows for each (a, b) window pair with a >= b (see :func:`_indexed`)."""
    found = []
    for a, b in window_pairs_:
        x, y, d = search(hashes[:, a], ChunkIndex(hashes[:, b], m), max_distance)
        forward = combos.index((a, b))
        if a == b:
            keep = x < y
            found.append(np.stack([x[keep], y[keep], np.full(keep.sum(), forward), d[keep]], axis=1))
            continue
        mirror = combos.index((b, a))
        lo, hi = x < y, x > y
        found.append(np.stack([x[lo], y[lo], np.full(lo.sum(), forward), d[lo]], axis=1))
        found.append(np.stack([y[hi], x[hi], np.full(hi.sum(), mirror), d[hi]], axis=1))
    return found


def _indexed(hashes: np.ndarray, combos, max_distance: int, m: int, workers: int = 1) -> np.ndarray:
    """The rows of :func:`_all_pairs` (same set, other order) from a multi-index search.

    Every combo (a, b) has its mirror (b, a) in ``combos``, so one search of window ``a`` of
    every image against an index of window ``b`` of every image serves both: a hit (x, y) is combo
    (a, b) for i = x < j = y and combo (b, a) for i = y < j = x. The searches are independent and
    run in ``workers`` processes.
    """
    from covid_cxr.workers import run_batches

    combos = list(combos)
    todo = [(a, b) for a, b in combos if a >= b]
    job = functools.partial(_search_pairs, hashes=np.ascontiguousarray(hashes, dtype=np.uint64), combos=combos,
                            max_distance=max_distance, m=m)
    found = [rows for part in run_batches(job, todo, workers, batch=1, fresh=True) for rows in part]
    return np.concatenate(found).astype(np.int64) if found else np.zeros((0, 4), dtype=np.int64)


def window_pairs(hashes: np.ndarray, combos, max_distance: int, method: str = "auto", block: int = 64,
                 workers: int = 1) -> np.ndarray:
    """Rows (i, j, combo, distance), i < j, sorted, of every combo (window a of image i, window b of image j) of
    ``combos`` whose hashes (``hashes[i, a]``, ``hashes[j, b]``) are within ``max_distance`` bits.
    ``method``: ``"index"`` (multi-index hashing), ``"all-pairs"``
    (blocks of the full distance matrix) or ``"auto"`` (the index when its cost model says it is cheaper);
    all give the same rows."""
    if method not in ("auto", "index", "all-pairs"):
        raise ValueError(f"method must be 'auto', 'index' or 'all-pairs', got {method!r}")
    searches = sum(a >= b for a, b in combos)  # the index serves a combo and its mirror with one search
    m = plan(hashes[:, 0], max_distance, len(combos) / searches) if method != "all-pairs" else None
    if method == "index" and m is None:
        m = 3
    if m is None:
        cand = _all_pairs(hashes, combos, max_distance, block)
    else:
        cand = _indexed(hashes, combos, max_distance, m, workers)
    return cand[np.lexsort((cand[:, 2], cand[:, 1], cand[:, 0]))] if len(cand) else cand
