"""``kernels/harmony.cu`` and its numba twins: the per-cell steps of Harmony.

Harmony's state lives where it runs: the corrected embedding, the cosine-normalised
embedding, the cell-to-centroid distances and the soft assignments ``R`` (cells × clusters,
float32) on the host (``HostSteps``) or on the device (``DeviceSteps``). Both classes have the
same methods, called by the driver in :mod:`gpusc.pp._harmony`:

* ``unit_rows``: each row scaled to unit length (squares summed in double);
* ``assign``: for the cells at permutation positions ``[start, start + count)``, the soft
  assignments ``softmax(-dist / sigma + sum of the cell's batches' log diversity)`` written
  into ``R``, their per-batch sums added to ``sums``, and the objective's distance and
  entropy terms; with ``similarity=True`` (no penalty) ``dist`` first holds cosine
  similarities and is turned into ``2 (1 - s)`` in place;
* ``batch_sums``: the per-batch sums of the current ``R`` over the same cells;
  ``assign_then_sums``: ``assign`` on one block and ``batch_sums`` of the next (other cells)
  together, one parallel region per block on the host;
* ``ridge_sums``: per combination of batches (cells are kept sorted by combination), the
  R-weighted coordinate sums ``R_c^T [Z, 1]`` in double;
* ``correct``: ``Z_corr = Z - R_c @ M_c`` per combination;
* ``kmeans_*``: the steps of the k-means start.

Determinism: the per-batch sums of soft assignments are kept in fixed point (int64, each
value rounded to a multiple of 2**-32; the row of every cell is the batch rows' sum divided by
the number of keys), so they are exact, independent of the order of the
additions (device atomics, host threads) and identical on host and device for equal ``R``.
Float sums (objective terms) are per fixed chunk (host) or per block of a fixed grid
(device), added in order. Matrix products go to BLAS / cuBLAS, which are deterministic for a
given machine. The cells of each update block come from a seeded bijection of ``0..n-1``
(a 4-round Feistel network with cycle walking) that both sides compute per position, so the
host and the device visit the cells in the same order.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from .._core import cuda

# Fixed point of the per-batch sums: value * 2**32, rounded. Sums of at most 2**31 values in
# [0, 1] stay below 2**63.
FIXED_SCALE = 4294967296.0
# Cells are visited in tiles of TILE consecutive cells (the driver shuffles the cells once
# within each combination of batches, so a tile holds random cells); each pass visits the
# tiles in a seeded random order. Rows of a tile are read and written together.
TILE = 16
BLOCK = 256
WARPS_PER_BLOCK = BLOCK // 32
# Device grids: at most this many blocks per launch (a fixed number for a given count, so the
# per-block objective partials, and their sum, do not depend on the device).
MAX_GRID = 1024
# Host chunks of a range of cells: a fixed count (not the thread count), so the order of the
# float additions is the same on every machine. The int64 per-batch sums are exact in any
# order. A range with less work than PARALLEL_WORK (cells x clusters) runs on one thread:
# waking the others would cost more than it saves. Measured on 2 idle cores (K = 100): a block
# of 160 cells takes 56 us on one thread and 29 us on two; the 2,500-cell blocks of a
# 50,000-cell pass 750 us and 330 us. Below 2**17 (1,300 cells at K = 100) two threads save
# little, and on a busy machine each parallel region waits for a descheduled thread.
HOST_CHUNKS = 16
PARALLEL_WORK = 1 << 17
# Device shared memory for a block's per-batch partial sums (int64); beyond it the kernels add
# to global memory directly (same integers, same result).
SHARED_SUMS_BYTES = 40 * 1024
# Host float loops may be reassociated (vectorised reductions), in a fixed order per build.
FAST = True
# Cells of a host Lloyd step whose products are computed together (256 cells x 100 clusters:
# 100 KiB, in the core's cache)
LLOYD_ROWS = 256
# Running maxima of a host row's largest value (one vector of float32).
MAX_LANES = 8
# 2**f on [0, 1): degree-6 fit (relative error below 1e-7 in float32), for the host's
# vectorisable exp of non-positive logits.
EXP2_POLY = (np.float32(1.0), np.float32(0.6931470632553101), np.float32(0.24022932350635529),
             np.float32(0.05548521876335144), np.float32(0.009675536304712296),
             np.float32(0.00124673405662179), np.float32(0.00021613943681586534))

NAME_EXPRESSIONS = (
    "unit_rows<float>",
    "batch_sums<float>",
    "assign_cells<float>",
    "log_diversity",
    "apply_delta",
    "race_keys<float>",
)

_MASK32 = np.uint64(0xFFFFFFFF)


# ---------------------------------------------------------------- the order of a pass


def feistel_half_bits(n: int) -> int:
    """Half the bit width of the Feistel domain: the smallest h with 4**h >= n (0 for n <= 1).
    For a pass over tiles, n is the number of tiles."""
    h = 0
    while (1 << (2 * h)) < n:
        h += 1
    return h


def pass_keys(seed: int, pass_index: int) -> tuple[int, int, int, int]:
    """The four 32-bit round keys of one pass (the same on host and device)."""
    keys = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(pass_index)]).integers(
        0, 2**32, 4, dtype=np.uint64)
    return tuple(int(k) for k in keys)


class Pass(NamedTuple):
    """Cells of a pass: the tiles at positions ``first_tile ..`` (``n_slots / TILE`` of them)
    of a pass's order over ``n_tiles`` tiles of the ``n`` cells; ``half`` and ``keys`` give the
    order (``half`` 0: the identity)."""

    first_tile: int
    n_slots: int
    n_tiles: int
    n: int
    half: int
    keys: tuple[int, int, int, int]

    @classmethod
    def every_cell(cls, n: int) -> Pass:
        n_tiles = -(-n // TILE)
        return cls(0, n_tiles * TILE, n_tiles, n, 0, (0, 0, 0, 0))

    def args(self) -> tuple:
        """The host kernels' arguments."""
        return (np.int64(self.first_tile), np.int64(self.n_slots), np.int64(self.n_tiles),
                np.int64(self.n), np.int64(self.half), *(np.uint64(k) for k in self.keys))

    def device_args(self) -> tuple:
        """The device kernels' arguments, as typed as kernels/harmony.cu declares them."""
        return (np.int64(self.first_tile), np.int64(self.n_slots), np.int64(self.n_tiles),
                np.int64(self.n), np.int32(self.half), *(np.uint32(k) for k in self.keys))


def blocks(n: int, block_size: float, keys, half: int) -> list[Pass]:
    """A pass's blocks: ceil(1 / block_size) of them, each ``floor(n_tiles * block_size)``
    tiles (at least one), the last one taking the rest, as harmonypy cuts cells into blocks."""
    n_tiles = -(-n // TILE)
    n_blocks = int(np.ceil(1.0 / block_size))
    per_block = max(1, int(n_tiles * block_size))
    out = []
    for i in range(n_blocks):
        lo = i * per_block
        if lo >= n_tiles:
            break
        hi = n_tiles if i == n_blocks - 1 else min(n_tiles, lo + per_block)
        out.append(Pass(lo, (hi - lo) * TILE, n_tiles, n, half, tuple(keys)))
    return out


@numba.njit(inline="always")
def _mix32(x):
    # lowbias32 (a 32-bit integer hash); x holds a 32-bit value in a uint64
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _MASK32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _MASK32
    x ^= x >> np.uint64(16)
    return x


@numba.njit(inline="always")
def tile_at(position, n_tiles, half, k0, k1, k2, k3):
    """The tile visited at ``position`` of a pass: kernels/harmony.cu's tile_at (a 4-round
    Feistel network on 2 * half bits, cycle-walked into 0..n_tiles-1; half 0: identity)."""
    if half == 0:
        return position
    h = np.uint64(half)
    mask = (np.uint64(1) << h) - np.uint64(1)
    x = np.uint64(position)
    while True:
        left = x >> h
        right = x & mask
        left, right = right, left ^ (_mix32(right ^ k0) & mask)
        left, right = right, left ^ (_mix32(right ^ k1) & mask)
        left, right = right, left ^ (_mix32(right ^ k2) & mask)
        left, right = right, left ^ (_mix32(right ^ k3) & mask)
        x = (left << h) | right
        if x < np.uint64(n_tiles):
            return np.int64(x)


@numba.njit(inline="always")
def slot_cell(slot, first_tile, n_tiles, half, k0, k1, k2, k3):
    """The cell at ``slot`` of the tiles from position ``first_tile`` on (may be >= n in the
    last tile: the caller skips it)."""
    tile = tile_at(first_tile + slot // TILE, n_tiles, half, k0, k1, k2, k3)
    return tile * TILE + slot % TILE


@numba.njit(cache=True)
def pass_order(n, half, k0, k1, k2, k3):
    """Every cell of 0..n-1 in the order a pass visits them (for tests)."""
    n_tiles = -(-n // TILE)
    out = np.empty(n, np.int64)
    i = 0
    for slot in range(n_tiles * TILE):
        j = slot_cell(slot, 0, n_tiles, half, np.uint64(k0), np.uint64(k1), np.uint64(k2),
                      np.uint64(k3))
        if j < n:
            out[i] = j
            i += 1
    return out


def _chunks(count: int, n_sums: int) -> int:
    """Host chunks of a range: HOST_CHUNKS, fewer when the per-chunk int64 sums would pass
    8 MiB together (many batches); depends on the shapes only."""
    by_memory = max(1, (8 << 20) // max(8 * n_sums, 1))
    return max(1, min(HOST_CHUNKS, by_memory, count))


# ---------------------------------------------------------------- host (numba)


@numba.njit(parallel=True, cache=True)
def _unit_rows_host(x, out):
    for i in numba.prange(x.shape[0]):
        total = 0.0
        for a in range(x.shape[1]):
            total += np.float64(x[i, a]) * np.float64(x[i, a])
        if total == 0.0:
            for a in range(x.shape[1]):
                out[i, a] = x[i, a]
        else:
            norm = np.float32(np.sqrt(total))
            for a in range(x.shape[1]):
                out[i, a] = x[i, a] / norm


@numba.njit(inline="always")
def _add_fixed_row(part, c, batches, n_batches, values):
    # the row's values in fixed point, added to each of the cell's batches (in double, as the
    # kernels round); the row of every cell is filled afterwards by fill_every_cell
    n_clusters = values.size
    for v in range(batches.size):
        row = part[c, batches[v]]
        for k in range(n_clusters):
            row[k] += np.int64(np.float64(values[k]) * FIXED_SCALE + 0.5)


@numba.njit(inline="always")
def _batch_sums_chunk(c, n_chunks, r, cell_batches, n_batches, part, first, n_slots, n_tiles,
                      n, half, k0, k1, k2, k3):
    for slot in range(n_slots * c // n_chunks, n_slots * (c + 1) // n_chunks):
        j = slot_cell(slot, first, n_tiles, half, k0, k1, k2, k3)
        if j < n:
            _add_fixed_row(part, c, cell_batches[j], n_batches, r[j])


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _batch_sums_parallel(r, cell_batches, n_batches, part, first, n_slots, n_tiles, n, half,
                         k0, k1, k2, k3):
    for c in numba.prange(part.shape[0]):
        _batch_sums_chunk(c, part.shape[0], r, cell_batches, n_batches, part, first, n_slots,
                          n_tiles, n, half, k0, k1, k2, k3)


@numba.njit(cache=True, fastmath=FAST)
def _batch_sums_serial(r, cell_batches, n_batches, part, first, n_slots, n_tiles, n, half,
                       k0, k1, k2, k3):
    for c in range(part.shape[0]):
        _batch_sums_chunk(c, part.shape[0], r, cell_batches, n_batches, part, first, n_slots,
                          n_tiles, n, half, k0, k1, k2, k3)


@numba.njit(inline="always")
def _largest(values, lanes):
    # max(values), in MAX_LANES running maxima: LLVM leaves a plain max loop scalar (a float
    # max is no reassociable reduction for it); this form vectorises, 2x faster per cell.
    # The maximum is exact, whatever the order.
    size = values.size
    if size < MAX_LANES:
        largest = values[0]
        for k in range(size):
            largest = max(largest, values[k])
        return largest
    for lane in range(MAX_LANES):
        lanes[lane] = values[lane]
    full = size - size % MAX_LANES
    for start in range(MAX_LANES, full, MAX_LANES):
        for lane in range(MAX_LANES):
            lanes[lane] = max(lanes[lane], values[start + lane])
    largest = lanes[0]
    for lane in range(MAX_LANES):
        largest = max(largest, lanes[lane])
    for k in range(full, size):
        largest = max(largest, values[k])
    return largest


@numba.njit(inline="always")
def _assign_chunk(c, n_chunks, dist, sigma, inv_sigma, log_div, penalised, cell_batches,
                  n_batches, r, similarity, part, terms, first, n_slots, n_tiles, n, half, k0,
                  k1, k2, k3):
    # One cell at a time: logits -dist / sigma (+ the log diversity of each of the cell's
    # batches), a softmax shifted by the largest logit, the objective terms sum(p dist) and
    # sum(sigma p log p) = (sum sigma e s - log(total) sum sigma e) / total (e = exp(s), s the
    # shifted logit). Each loop over the clusters vectorises; exp(s) for s <= 0 is
    # 2**m * poly(f) with s log2(e) = m + f, the power of two built in the exponent bits.
    n_clusters = r.shape[1]
    shifted = np.empty(n_clusters, np.float32)
    values = np.empty(n_clusters, np.float32)
    bits = np.empty(n_clusters, np.int32)
    powers = bits.view(np.float32)
    lanes = np.empty(MAX_LANES, np.float32)
    p0, p1, p2, p3, p4, p5, p6 = EXP2_POLY
    error = 0.0
    entropy = 0.0
    for slot in range(n_slots * c // n_chunks, n_slots * (c + 1) // n_chunks):
        j = slot_cell(slot, first, n_tiles, half, k0, k1, k2, k3)
        if j >= n:
            continue
        d = dist[j]
        batches = cell_batches[j]
        if similarity:
            for k in range(n_clusters):
                d[k] = np.float32(2.0) * (np.float32(1.0) - d[k])
        for k in range(n_clusters):
            values[k] = -d[k] * inv_sigma[k]
        if penalised:
            for v in range(batches.size):
                penalty = log_div[batches[v]]
                for k in range(n_clusters):
                    values[k] += penalty[k]
        largest = _largest(values, lanes)
        for k in range(n_clusters):
            s = values[k] - largest
            shifted[k] = s
            t = max(s * np.float32(1.4426950408889634), np.float32(-126.0))
            m = np.floor(t)
            f = t - m
            bits[k] = (np.int32(m) + np.int32(127)) << 23
            values[k] = (((((p6 * f + p5) * f + p4) * f + p3) * f + p2) * f + p1) * f + p0
        total = np.float32(0.0)
        weighted = np.float32(0.0)
        weighted_shifted = np.float32(0.0)
        for k in range(n_clusters):
            e = values[k] * powers[k]
            values[k] = e
            total += e
            weighted += sigma[k] * e
            weighted_shifted += sigma[k] * e * shifted[k]
        inverse = np.float32(1.0) / total
        row = r[j]
        cell_error = np.float32(0.0)
        for k in range(n_clusters):
            value = values[k] * inverse
            row[k] = value
            cell_error += value * d[k]
        _add_fixed_row(part, c, batches, n_batches, row)
        error += cell_error
        entropy += (np.float64(weighted_shifted) - np.log(np.float64(total))
                    * np.float64(weighted)) / np.float64(total)
    terms[c, 0] = error
    terms[c, 1] = entropy


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _assign_parallel(dist, sigma, inv_sigma, log_div, penalised, cell_batches, n_batches, r,
                     similarity, part, terms, first, n_slots, n_tiles, n, half, k0, k1, k2, k3,
                     next_part, next_first, next_slots):
    # with next_slots > 0, each chunk also adds the current rows of its share of the next block
    # of the pass (other cells: this block writes none of their rows) to next_part, so one
    # parallel region per block does both
    for c in numba.prange(part.shape[0]):
        _assign_chunk(c, part.shape[0], dist, sigma, inv_sigma, log_div, penalised,
                      cell_batches, n_batches, r, similarity, part, terms, first, n_slots,
                      n_tiles, n, half, k0, k1, k2, k3)
        _batch_sums_chunk(c, part.shape[0], r, cell_batches, n_batches, next_part, next_first,
                          next_slots, n_tiles, n, half, k0, k1, k2, k3)


@numba.njit(cache=True, fastmath=FAST)
def _assign_serial(dist, sigma, inv_sigma, log_div, penalised, cell_batches, n_batches, r,
                   similarity, part, terms, first, n_slots, n_tiles, n, half, k0, k1, k2, k3,
                   next_part, next_first, next_slots):
    for c in range(part.shape[0]):
        _assign_chunk(c, part.shape[0], dist, sigma, inv_sigma, log_div, penalised,
                      cell_batches, n_batches, r, similarity, part, terms, first, n_slots,
                      n_tiles, n, half, k0, k1, k2, k3)
        _batch_sums_chunk(c, part.shape[0], r, cell_batches, n_batches, next_part, next_first,
                          next_slots, n_tiles, n, half, k0, k1, k2, k3)


@numba.njit(cache=True, fastmath=FAST)
def _ridge_sums_rows(r, z, lo, hi, out):
    # out (K, d + 1) float64 += r[lo:hi].T @ [z[lo:hi], 1], in double; four cells per pass over
    # out (BLAS is slow on this shape: a long inner dimension, a small result)
    n_clusters, n_dims = r.shape[1], z.shape[1]
    i = lo
    while i + 4 <= hi:
        z0, z1, z2, z3 = z[i], z[i + 1], z[i + 2], z[i + 3]
        for k in range(n_clusters):
            w0, w1 = np.float64(r[i, k]), np.float64(r[i + 1, k])
            w2, w3 = np.float64(r[i + 2, k]), np.float64(r[i + 3, k])
            row = out[k]
            for a in range(n_dims):
                row[a] += (w0 * np.float64(z0[a]) + w1 * np.float64(z1[a])
                           + w2 * np.float64(z2[a]) + w3 * np.float64(z3[a]))
            row[n_dims] += w0 + w1 + w2 + w3
        i += 4
    for rest in range(i, hi):
        for k in range(n_clusters):
            w = np.float64(r[rest, k])
            for a in range(n_dims):
                out[k, a] += w * np.float64(z[rest, a])
            out[k, n_dims] += w


@numba.njit(parallel=True, cache=True)
def _ridge_sums_host(r, z, segments, part):
    # part (n_segments, n_chunks, K, d + 1): chunk c of segment s, rows in fixed chunks
    n_chunks = part.shape[1]
    for t in numba.prange(part.shape[0] * n_chunks):
        s, c = t // n_chunks, t % n_chunks
        lo, size = segments[s], segments[s + 1] - segments[s]
        _ridge_sums_rows(r, z, lo + size * c // n_chunks, lo + size * (c + 1) // n_chunks,
                         part[s, c])


@numba.njit(inline="always")
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _race_uniform(seed, t):
    # kernels/harmony.cu's race_keys: u uniform in (0, 1) from a hash of (seed, t)
    z = _mix64(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(t))
    return (np.float32(z >> np.uint64(40)) + np.float32(0.5)) * np.float32(5.9604644775390625e-08)


@numba.njit(inline="always")
def _race_denominator(s):
    return np.abs(np.float32(2.0) * (np.float32(1.0) - s)) + np.float32(1e-10)


@numba.njit(parallel=True, cache=True)
def _race_keys_host(sim, seed):
    # kernels/harmony.cu's race_keys
    n_cols = sim.shape[1]
    for i in numba.prange(sim.shape[0]):
        for k in range(n_cols):
            u = _race_uniform(seed, i * n_cols + k + 1)
            sim[i, k] = -np.log(u) / _race_denominator(sim[i, k])


@numba.njit(cache=True)
def _race_scan(sim, seed, lo, hi, keys, rows):
    # rows lo..hi-1 of _race_argmin_host; keys, rows: the chunk's best so far per column
    n_cols = sim.shape[1]
    uniforms = np.empty(n_cols, np.float32)
    denominators = np.empty(n_cols, np.float32)
    for i in range(lo, hi):
        candidate = False  # the bound loop vectorises; logarithms only for rows that may win
        for k in range(n_cols):
            u = _race_uniform(seed, i * n_cols + k + 1)
            denominator = _race_denominator(sim[i, k])
            uniforms[k] = u
            denominators[k] = denominator
            candidate |= (1.0 - np.float64(u)
                          <= 1.001 * np.float64(keys[k]) * np.float64(denominator))
        if not candidate:
            continue
        for k in range(n_cols):
            key = -np.log(uniforms[k]) / denominators[k]
            if key < keys[k]:
                keys[k] = key
                rows[k] = i


@numba.njit(parallel=True, cache=True)
def _race_argmin_host(sim, seed, n_chunks):
    """Per column, the row with the smallest race key (the first on ties), as
    ``argmin(axis=0)`` of _race_keys_host's keys, without writing them. The key
    -log(u) / denominator is at least (1 - u) / denominator (-log u >= 1 - u): a row whose bound
    is above the chunk's best key so far (with a margin far above float32 rounding) cannot win,
    and its logarithms are skipped (after a chunk's first rows, nearly all of them)."""
    n, n_cols = sim.shape
    best_key = np.full((n_chunks, n_cols), np.inf, np.float32)
    best_row = np.zeros((n_chunks, n_cols), np.int64)
    for c in numba.prange(n_chunks):
        _race_scan(sim, seed, n * c // n_chunks, n * (c + 1) // n_chunks, best_key[c],
                   best_row[c])
    out = best_row[0].copy()
    for k in range(n_cols):  # chunks in order: the first row on ties
        key = best_key[0, k]
        for c in range(1, n_chunks):
            if best_key[c, k] < key:
                key = best_key[c, k]
                out[k] = best_row[c, k]
    return out


@numba.njit(parallel=True, cache=True)
def _matmul_rows_host(a, b, out):
    # out = a @ b, in HOST_CHUNKS fixed chunks of rows on numba's threads, each chunk one
    # single-threaded BLAS call (BLAS is held to one thread during a run: its own threads spin
    # on the cores numba needs). The chunks depend on the shape only: the same result on any
    # number of threads.
    n = a.shape[0]
    for c in numba.prange(HOST_CHUNKS):
        lo, hi = n * c // HOST_CHUNKS, n * (c + 1) // HOST_CHUNKS
        if hi > lo:
            np.dot(a[lo:hi], b, out[lo:hi])


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _lloyd_step_host(x, means_t, norms, sums, counts):
    # per fixed chunk of cells (sums (n_chunks, K, d) float64, counts (n_chunks, K)) the
    # coordinate sums and sizes of the cells nearest to each mean: the largest 2 x.m - |m|^2
    # (the first on ties), from the products of LLOYD_ROWS cells at a time, used while they
    # are in the core's cache
    n, n_clusters, n_chunks = x.shape[0], means_t.shape[1], sums.shape[0]
    for c in numba.prange(n_chunks):
        products = np.empty((LLOYD_ROWS, n_clusters), np.float32)
        scores = np.empty(n_clusters, np.float32)
        lanes = np.empty(MAX_LANES, np.float32)
        lo, hi = n * c // n_chunks, n * (c + 1) // n_chunks
        for start in range(lo, hi, LLOYD_ROWS):
            end = min(start + LLOYD_ROWS, hi)
            np.dot(x[start:end], means_t, products[:end - start])
            for i in range(start, end):
                row = products[i - start]
                for k in range(n_clusters):
                    scores[k] = np.float32(2.0) * row[k] - norms[k]
                largest = _largest(scores, lanes)  # vectorised; then its first position
                best = n_clusters
                for k in range(n_clusters):
                    best = min(best, k if scores[k] == largest else n_clusters)
                counts[c, best] += 1
                for a in range(x.shape[1]):
                    sums[c, best, a] += x[i, a]


@numba.njit(parallel=True, cache=True)
def _correct_host(z, r, corrections, segments, out):
    # out = z - r @ corrections[s] over each segment s of rows, in HOST_CHUNKS fixed chunks per
    # segment (one single-threaded BLAS call each)
    for t in numba.prange((segments.size - 1) * HOST_CHUNKS):
        s, c = t // HOST_CHUNKS, t % HOST_CHUNKS
        size = segments[s + 1] - segments[s]
        lo = segments[s] + size * c // HOST_CHUNKS
        hi = segments[s] + size * (c + 1) // HOST_CHUNKS
        if hi > lo:
            np.dot(r[lo:hi], corrections[s], out[lo:hi])
        for i in range(lo, hi):
            for a in range(z.shape[1]):
                out[i, a] = z[i, a] - out[i, a]


def _winners(keys, xp) -> np.ndarray:
    """Column by column, the row with the smallest key among the rows not taken by an earlier
    column (host array)."""
    winners = np.asarray(xp.argmin(keys, axis=0).get() if xp is not np else keys.argmin(axis=0))
    taken: set[int] = set()
    for i in range(winners.size):
        w = int(winners[i])
        if w in taken:  # rare: mask the taken rows and look again
            column = keys[:, i].copy()
            column[xp.asarray(sorted(taken))] = np.inf
            w = int(column.argmin())
            winners[i] = w
        taken.add(w)
    return winners


def fill_every_cell(sums, n_keys: int):
    """Row ``n_batches`` (every cell) of per-batch fixed-point sums ((n_batches + 1, K), host
    or device): each cell is in one batch of each key, so the batch rows add up to n_keys times
    the sum over the cells, exactly (integers). The kernels leave that row out: half the
    fixed-point additions with one key."""
    n_batches = sums.shape[0] - 1
    sums[n_batches] = sums[:n_batches].sum(axis=0) // n_keys
    return sums


@numba.njit(cache=True)
def _log_diversity_host(o_sums, removed, batch_share, theta, out):
    n_batches, n_clusters = out.shape
    for k in range(n_clusters):
        total = np.float64(o_sums[n_batches, k] - removed[n_batches, k]) / FIXED_SCALE
        for b in range(n_batches):
            o = np.float64(o_sums[b, k] - removed[b, k]) / FIXED_SCALE
            e = batch_share[b] * total
            out[b, k] = np.float32(theta[b] * (np.log(2.0 * e + 1.0) - np.log(o + e + 1.0)))


def log_diversity_host(o_sums, removed, batch_share, theta):
    """theta_b (log(2 E + 1) - log(O + E + 1)) per batch and cluster (float32), from the fixed
    point sums ``o_sums`` ((n_batches + 1, K) int64, last row: every cell) less ``removed``,
    with E = batch_share_b * (sum over every cell): kernels/harmony.cu's log_diversity. One
    numba call: it runs once per block of cells."""
    out = np.empty((batch_share.size, o_sums.shape[1]), np.float32)
    _log_diversity_host(o_sums, np.zeros_like(o_sums) if removed is None else removed,
                        batch_share, theta, out)
    return out


class HostSteps:
    """Harmony's steps on host arrays (NumPy, BLAS and numba)."""

    name = "cpu"

    @staticmethod
    def to_array(x, dtype=None):
        return np.ascontiguousarray(x, dtype=dtype)

    @staticmethod
    def to_host(x):
        return np.asarray(x)

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, dtype)

    @staticmethod
    def unit_rows(x, out=None):
        out = np.empty_like(x) if out is None else out
        _unit_rows_host(x, out)
        return out

    @staticmethod
    def similarity(x, centroids, out=None):
        """x @ centroids.T (cells x clusters, float32)."""
        centroids = np.asarray(centroids, np.float32)
        out = np.empty((x.shape[0], centroids.shape[0]), np.float32) if out is None else out
        _matmul_rows_host(x, centroids.T, out)
        return out

    @staticmethod
    def assign(dist, sigma, inv_sigma, log_div, cell_batches, n_batches, r, order: Pass, *,
               similarity=False):
        """Soft assignments of the cells of ``order``, written to ``r``; returns (int64
        (n_batches + 1, K) fixed-point sums of the new rows, float64 [sum p dist,
        sum sigma p log p] over them)."""
        added, terms, _ = HostSteps._assign(dist, sigma, inv_sigma, log_div, cell_batches,
                                            n_batches, r, order, similarity, None)
        return added, terms

    @staticmethod
    def assign_then_sums(dist, sigma, inv_sigma, log_div, cell_batches, n_batches, r,
                         order: Pass, following: Pass):
        """:meth:`assign` on the cells of ``order``, and :meth:`batch_sums` of ``following`` (the
        next block of the same pass: other cells) in the same parallel region; returns
        (added, terms, the following block's sums)."""
        return HostSteps._assign(dist, sigma, inv_sigma, log_div, cell_batches, n_batches, r,
                                 order, False, following)

    @staticmethod
    def _assign(dist, sigma, inv_sigma, log_div, cell_batches, n_batches, r, order, similarity,
                following):
        # assign and assign_then_sums: one kernel call, the following block's sums when given
        n_clusters = r.shape[1]
        penalised = log_div is not None
        log_div = log_div if penalised else np.zeros((1, 1), np.float32)
        n_chunks = _chunks(order.n_slots, (n_batches + 1) * n_clusters)
        part = np.zeros((n_chunks, n_batches + 1, n_clusters), np.int64)
        next_part = np.zeros((1 if following is None else n_chunks, n_batches + 1, n_clusters),
                             np.int64)
        terms = np.zeros((n_chunks, 2))
        work = (order.n_slots + (following.n_slots if following is not None else 0)) * n_clusters
        kernel = _assign_parallel if work >= PARALLEL_WORK else _assign_serial
        kernel(dist, sigma, inv_sigma, log_div, penalised, cell_batches, n_batches, r,
               similarity, part, terms, *order.args(), next_part,
               np.int64(0 if following is None else following.first_tile),
               np.int64(0 if following is None else following.n_slots))
        error = entropy = 0.0
        for chunk_error, chunk_entropy in terms.tolist():  # in chunk order
            error += chunk_error
            entropy += chunk_entropy
        n_keys = cell_batches.shape[1]
        return (fill_every_cell(part.sum(axis=0), n_keys), np.array([error, entropy]),
                None if following is None else fill_every_cell(next_part.sum(axis=0), n_keys))

    @staticmethod
    def batch_sums(r, cell_batches, n_batches, order: Pass):
        """int64 (n_batches + 1, K) fixed-point sums of the current rows of the cells of order."""
        n_clusters = r.shape[1]
        n_chunks = _chunks(order.n_slots, (n_batches + 1) * n_clusters)
        part = np.zeros((n_chunks, n_batches + 1, n_clusters), np.int64)
        kernel = (_batch_sums_parallel if order.n_slots * n_clusters >= PARALLEL_WORK
                  else _batch_sums_serial)
        kernel(r, cell_batches, n_batches, part, *order.args())
        return fill_every_cell(part.sum(axis=0), cell_batches.shape[1])

    log_diversity = staticmethod(log_diversity_host)

    @staticmethod
    def apply_delta(o_sums, removed, added):
        o_sums += added - removed
        return o_sums

    @staticmethod
    def ridge_sums(r, z, segments) -> np.ndarray:
        """(n_segments, K, d + 1) float64: R^T [Z, 1] over each segment of rows, in double
        (``z`` float32). Each segment in HOST_CHUNKS fixed chunks of rows, added in order."""
        segments = np.asarray(segments, np.int64)
        part = np.zeros((len(segments) - 1, HOST_CHUNKS, r.shape[1], z.shape[1] + 1))
        _ridge_sums_host(r, z, segments, part)
        return part.sum(axis=1)

    @staticmethod
    def correct(z, r, corrections, segments, out):
        """out = z - R @ M_c over each segment c (corrections: (n_segments, K, d) float32)."""
        _correct_host(z, r, np.ascontiguousarray(corrections, np.float32),
                      np.asarray(segments, np.int64), out)
        return out

    @staticmethod
    def race_winners(x, seed_rows, seed) -> np.ndarray:
        """The k-means start's picks: for each seed row, a cell drawn with probability
        proportional to its distance 2 (1 - cos) from it, no cell twice (host int64 array)."""
        keys = np.empty((x.shape[0], len(seed_rows)), np.float32)
        _matmul_rows_host(x, x[seed_rows].T, keys)
        winners = _race_argmin_host(keys, np.uint64(seed), HOST_CHUNKS)
        if np.unique(winners).size == winners.size:
            return winners
        _race_keys_host(keys, np.uint64(seed))  # rare: a cell won two columns
        return _winners(keys, np)

    @staticmethod
    def kmeans_step(x, means):
        """One Lloyd step: (float64 (K, d) sums of each nearest-mean cluster, int64 sizes). The
        sums per HOST_CHUNKS fixed chunks of cells, added in order."""
        means = np.asarray(means, np.float32)
        norms = (means.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
        sums = np.zeros((HOST_CHUNKS, means.shape[0], x.shape[1]))
        counts = np.zeros((HOST_CHUNKS, means.shape[0]), np.int64)
        _lloyd_step_host(x, means.T, norms, sums, counts)
        return sums.sum(axis=0), counts.sum(axis=0)


# ---------------------------------------------------------------- device


def _kernel(name: str):
    return cuda.get_kernel("harmony", NAME_EXPRESSIONS, name)


def _grid(count: int) -> int:
    """Blocks for ``count`` cell slots (one warp per cell, grid-strided): depends on the count
    only, so the per-block objective partials are the same on every device."""
    return int(max(1, min(MAX_GRID, -(-count // WARPS_PER_BLOCK))))


def _shared_bytes(n_batches: int, n_clusters: int) -> int:
    size = 8 * (n_batches + 1) * n_clusters
    return size if size <= SHARED_SUMS_BYTES else 0


class DeviceSteps:
    """Harmony's steps on CuPy arrays: cuBLAS products and kernels/harmony.cu."""

    name = "gpu"

    @staticmethod
    def to_array(x, dtype=None):
        import cupy as cp

        return cp.ascontiguousarray(cp.asarray(x, dtype=dtype))

    @staticmethod
    def to_host(x):
        return x.get()  # synchronize!

    @staticmethod
    def empty(shape, dtype):
        import cupy as cp

        return cp.empty(shape, dtype)

    @staticmethod
    def unit_rows(x, out=None):
        import cupy as cp

        out = cp.empty(x.shape, x.dtype) if out is None else out
        n, d = x.shape
        cuda.launch(_kernel("unit_rows<float>"), -(-n // WARPS_PER_BLOCK), BLOCK,
                    (x, out, np.int64(n), np.int32(d)))
        return out

    @staticmethod
    def similarity(x, centroids, out=None):
        import cupy as cp

        product = x @ cp.asarray(centroids, np.float32).T  # cuBLAS SGEMM
        if out is None:
            return product
        out[...] = product
        return out

    @staticmethod
    def assign(dist, sigma, inv_sigma, log_div, cell_batches, n_batches, r, order: Pass, *,
               similarity=False):
        import cupy as cp

        n_clusters = r.shape[1]
        grid = _grid(order.n_slots)
        sums = cp.zeros((n_batches + 1) * n_clusters, np.int64)
        terms = cp.empty(2 * grid, np.float64)  # every block writes its two partials
        shared = _shared_bytes(n_batches, n_clusters)
        cuda.launch(_kernel("assign_cells<float>"), grid, BLOCK,
                    (dist, sigma, inv_sigma, np.uintp(0) if log_div is None else log_div,
                     cell_batches, np.int32(cell_batches.shape[1]), np.int32(n_batches), r,
                     np.int32(n_clusters), np.int32(bool(similarity)), *order.device_args(),
                     sums, np.int32(shared > 0), terms), shared_mem=shared)
        host_terms = terms.get().reshape(grid, 2)  # synchronize!
        out = np.zeros(2)
        for t in host_terms:  # in block order
            out += t
        return fill_every_cell(sums.reshape(n_batches + 1, n_clusters), cell_batches.shape[1]), out

    @staticmethod
    def assign_then_sums(dist, sigma, inv_sigma, log_div, cell_batches, n_batches, r,
                         order: Pass, following: Pass):
        """:meth:`assign` on ``order``, then :meth:`batch_sums` of ``following``."""
        added, terms = DeviceSteps.assign(dist, sigma, inv_sigma, log_div, cell_batches,
                                          n_batches, r, order)
        return added, terms, DeviceSteps.batch_sums(r, cell_batches, n_batches, following)

    @staticmethod
    def batch_sums(r, cell_batches, n_batches, order: Pass):
        import cupy as cp

        n_clusters = r.shape[1]
        sums = cp.zeros((n_batches + 1) * n_clusters, np.int64)
        shared = _shared_bytes(n_batches, n_clusters)
        cuda.launch(_kernel("batch_sums<float>"), _grid(order.n_slots), BLOCK,
                    (r, cell_batches, np.int32(cell_batches.shape[1]), np.int32(n_batches),
                     np.int32(n_clusters), *order.device_args(), sums, np.int32(shared > 0)),
                    shared_mem=shared)
        return fill_every_cell(sums.reshape(n_batches + 1, n_clusters), cell_batches.shape[1])

    @staticmethod
    def log_diversity(o_sums, removed, batch_share, theta):
        import cupy as cp

        n_batches, n_clusters = batch_share.size, o_sums.shape[1]
        out = cp.empty((n_batches, n_clusters), np.float32)
        cuda.launch(_kernel("log_diversity"), -(-(n_batches * n_clusters) // BLOCK), BLOCK,
                    (o_sums, np.uintp(0) if removed is None else removed,
                     cp.asarray(batch_share, np.float64), cp.asarray(theta, np.float64),
                     np.int32(n_batches), np.int32(n_clusters), np.float64(FIXED_SCALE), out))
        return out

    @staticmethod
    def apply_delta(o_sums, removed, added):
        cuda.launch(_kernel("apply_delta"), -(-o_sums.size // BLOCK), BLOCK,
                    (o_sums, removed, added, np.int64(o_sums.size)))
        return o_sums

    @staticmethod
    def ridge_sums(r, z, segments) -> np.ndarray:
        import cupy as cp

        n_clusters, width = r.shape[1], z.shape[1] + 1
        out = cp.zeros((len(segments) - 1, n_clusters, width), np.float64)
        step = 1 << 18  # rows per product: bounds the float64 copies (200 MiB of R at K = 100)
        for c in range(len(segments) - 1):
            for lo in range(segments[c], segments[c + 1], step):
                hi = min(lo + step, segments[c + 1])
                z_ones = cp.full((hi - lo, width), 1.0, np.float64)
                z_ones[:, :-1] = z[lo:hi]
                out[c] += r[lo:hi].T.astype(np.float64) @ z_ones  # cuBLAS DGEMM
        return out.get()  # synchronize!

    @staticmethod
    def correct(z, r, corrections, segments, out):
        import cupy as cp

        corrections = cp.asarray(corrections, np.float32)
        for c in range(len(segments) - 1):
            lo, hi = segments[c], segments[c + 1]
            out[lo:hi] = z[lo:hi] - r[lo:hi] @ corrections[c]  # cuBLAS SGEMM
        return out

    @staticmethod
    def race_winners(x, seed_rows, seed) -> np.ndarray:
        import cupy as cp

        keys = x @ x[cp.asarray(seed_rows)].T
        cuda.launch(_kernel("race_keys<float>"), -(-keys.size // BLOCK), BLOCK,
                    (keys, np.int64(keys.shape[0]), np.int32(keys.shape[1]), np.uint64(seed)))
        return _winners(keys, cp)

    @staticmethod
    def kmeans_step(x, means):
        """One Lloyd step: the nearest mean per cell from a cuBLAS product, then each cluster's
        sum as one-hot products over fixed chunks of cells, added in order (no atomics)."""
        import cupy as cp

        means = cp.asarray(means, np.float32)
        n, n_clusters = x.shape[0], means.shape[0]
        norms = (means.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
        scores = x @ means.T
        scores *= np.float32(2.0)
        scores -= norms[None, :]
        labels = scores.argmax(axis=1)
        del scores
        sums = cp.zeros((n_clusters, x.shape[1]), np.float64)
        clusters = cp.arange(n_clusters)[:, None]
        step = 1 << 16
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            onehot = (labels[lo:hi][None, :] == clusters).astype(np.float64)
            sums += onehot @ x[lo:hi].astype(np.float64)
        counts = cp.bincount(labels, minlength=n_clusters)
        return sums.get(), counts.get()  # synchronize!
