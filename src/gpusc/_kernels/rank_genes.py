"""``kernels/rank_genes.cu`` and its numba twin: Wilcoxon rank sums by group, every gene ranked
once for all groups.

Each gene's non-zero values are sorted (with their cells' group codes) and walked once in tie
blocks; the gene's zeros are one tie block whose share of each group is the group's size minus
its non-zero values, so nothing is densified and a gene costs its non-zeros, not its cells.
Negative values rank below the zeros. Rank sums are half-integers and tie terms integers: exact
in float64 (below 2^53), so the host and the device give the same numbers, and so does any
order of the additions (scanpy's ranks summed per group included).

Where the sort happens:
  host    genes go in blocks of about HOST_BLOCK_VALUES stored values, the blocks on numba's
          threads: a block's non-zeros of kept cells are gathered from a CSC matrix, from the
          rows of a float32 CSR matrix (each thread takes a run of blocks and keeps a cursor
          per row, as the indices are sorted; a float64 CSR matrix is converted once with scipy: one copy of the matrix), or from a
          few columns of a dense matrix (a block at a time), sorted by (gene, value) with NumPy's
          vectorised sort (float32: one uint64 key per value holding the gene, the value's
          bits made order-preserving and the group code; float64: a sort by value, then a
          stable one by gene), and walked in numba. Memory besides the matrix (and a CSC
          copy): about 30 bytes per stored value of the blocks in flight (float32 CSR: 16
          bytes per row besides).
  device  genes go in blocks of at most DEVICE_BLOCK_VALUES stored values: the block's
          non-zeros of kept cells are sorted by (gene, value) with one ``cupy.lexsort``
          and ``rank_sums`` walks each gene's run (one CUDA thread per gene). CSR input is
          converted once with cuSPARSE (one copy of the matrix); dense input is read a block
          of genes at a time. Device memory besides the matrix (and the CSC copy): about 70
          bytes per stored value of a block (under 1.2 GiB at DEVICE_BLOCK_VALUES), plus
          5 x n_groups x n_vars x 8 bytes of per-group state and results.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import singledispatch

import numba
import numpy as np
from fast_array_utils import types

from .._core import cuda
from .._core.arrays import canonical

BLOCK = 256
# Stored values per block of genes on the host (one sort each; blocks run on numba's threads).
HOST_BLOCK_VALUES = 1 << 20
# Every this many rows of a CSR matrix are counted to size the blocks of genes.
CSR_COUNT_STRIDE = 8
# Stored values sorted at a time on the device: bounds the sort's workspace.
DEVICE_BLOCK_VALUES = 1 << 24
NAME_EXPRESSIONS = tuple(cuda.template_name("rank_sums", v) for v in (np.float32, np.float64))


@dataclass
class RankSums:
    """Per-group Wilcoxon sums on the host, float64.

    ``rank_sum`` (n_groups, n_vars): each group's rank sum (0 for the reference itself).
    ``tie_sum``: the sum over tie blocks of t³ - t; (1, n_vars) for one group against the rest
    (one ranking of all cells), (n_groups, n_vars) against a reference (one ranking per pair).
    ``group_size`` (n_groups,) int64: the cells of each group.
    """

    rank_sum: np.ndarray
    tie_sum: np.ndarray
    group_size: np.ndarray


@singledispatch
def rank_sums(x, codes: np.ndarray, n_groups: int, reference: int = -1) -> RankSums:
    """Wilcoxon rank sums of every group for every gene of a cells × genes matrix.

    ``codes`` gives each cell's group in ``0..n_groups-1``, or -1 to leave the cell out.
    ``reference`` -1: every kept cell is ranked together (one group against the rest: give
    the cells of no selected group a group of their own); else the code of the group each
    other group is ranked against, alone with it. Values must be finite (the caller checks).
    Results are host arrays; the matrix stays where it is.
    """
    raise TypeError(f"rank_sums: unsupported array type {type(x)}")


def _setup(codes, n_obs: int, n_groups: int, reference: int):
    codes = np.ascontiguousarray(codes, dtype=np.int32)
    if codes.shape != (n_obs,):
        raise ValueError(f"rank_sums: {codes.size} group codes for {n_obs} cells")
    if not -1 <= reference < n_groups:
        raise ValueError(f"rank_sums: reference={reference} is not a group code (0..{n_groups - 1})")
    group_size = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.int64)
    return codes, group_size


def _float(x):
    return x if x.dtype.kind == "f" else x.astype(np.float32)  # counts: exact below 2^24


def _outputs(n_groups: int, n_vars: int, reference: int):
    return np.zeros((n_groups, n_vars)), np.zeros((n_groups if reference >= 0 else 1, n_vars))


# ---------------------------------------------------------------- host (numba)

@rank_sums.register(types.CSBase)
def _(x, codes, n_groups, reference=-1):
    n_obs, n_vars = x.shape
    codes, group_size = _setup(codes, n_obs, n_groups, reference)
    x = _float(x)
    is_csc = isinstance(x, types.csc_matrix | types.csc_array)
    if not is_csc and x.dtype == np.float32:
        return _rank_sums_csr_host(canonical(x), codes, group_size, reference)
    x = canonical(x if is_csc else x.tocsc())
    indptr = x.indptr.astype(np.int64, copy=False)
    rank_sum, tie_sum = _outputs(n_groups, n_vars, reference)

    def block(lo, hi):
        _rank_block_host(x.data, x.indices, indptr, lo, hi, False, codes, group_size,
                         reference, rank_sum, tie_sum, lo)

    _run_blocks(block, gene_blocks(indptr, HOST_BLOCK_VALUES, _most_genes(n_groups)))
    return RankSums(rank_sum, tie_sum, group_size)


@rank_sums.register(np.ndarray)
def _(x, codes, n_groups, reference=-1):
    n_obs, n_vars = x.shape
    codes, group_size = _setup(codes, n_obs, n_groups, reference)
    x = _float(x)
    rank_sum, tie_sum = _outputs(n_groups, n_vars, reference)
    no_indices = np.empty(0, np.int32)  # a dense block: value p of a gene is cell p
    genes = min(max(1, HOST_BLOCK_VALUES // max(n_obs, 1)), _most_genes(n_groups))

    def block(lo, hi):
        values = np.ascontiguousarray(x[:, lo:hi].T).reshape(-1)
        offsets = np.arange(hi - lo + 1, dtype=np.int64) * n_obs
        _rank_block_host(values, no_indices, offsets, 0, hi - lo, True, codes, group_size,
                         reference, rank_sum, tie_sum, lo)

    _run_blocks(block, [(lo, min(lo + genes, n_vars)) for lo in range(0, n_vars, genes)])
    return RankSums(rank_sum, tie_sum, group_size)


def _rank_sums_csr_host(x, codes, group_size, reference) -> RankSums:
    """float32 CSR without a CSC copy: the blocks of genes are split in runs, one run per
    thread; a run walks its blocks in order with a cursor per row (the indices are sorted), so
    each block gathers its values straight from the rows, then is sorted and walked as a CSC
    block. The block sizes come from every CSR_COUNT_STRIDE-th row."""
    n_groups, n_vars = group_size.size, x.shape[1]
    per_gene = _column_counts(x.indices, x.indptr, n_vars, CSR_COUNT_STRIDE) * CSR_COUNT_STRIDE
    blocks = gene_blocks(np.concatenate([[0], np.cumsum(per_gene)]), HOST_BLOCK_VALUES,
                         _most_genes(n_groups))
    code_bits = _code_bits(n_groups)
    rank_sum, tie_sum = _outputs(n_groups, n_vars, reference)
    n_runs = min(max(1, numba.get_num_threads()), len(blocks))
    bounds = [len(blocks) * i // n_runs for i in range(n_runs + 1)]

    def run(first, last):
        cursor = _csr_cursor(x.indices, x.indptr, blocks[first][0])
        for lo, hi in blocks[first:last]:
            keys = _pack_block_csr(x.data, x.indices, x.indptr, hi, codes, code_bits, cursor, lo)
            keys.sort()
            _walk_packed(keys, code_bits, hi - lo, group_size, reference, rank_sum, tie_sum, lo)

    _run_blocks(run, list(itertools.pairwise(bounds)))
    return RankSums(rank_sum, tie_sum, group_size)


@numba.njit(nogil=True, cache=True)
def _column_counts(indices, indptr, n_cols, stride):
    # stored values per column in every stride-th row (an estimate, for the block sizes)
    counts = np.zeros(n_cols, np.int64)
    for r in range(0, indptr.size - 1, stride):
        for p in range(indptr[r], indptr[r + 1]):
            counts[indices[p]] += 1
    return counts


@numba.njit(nogil=True, cache=True)
def _csr_cursor(indices, indptr, lo):
    # per row, the position of its first stored column >= lo (binary search: sorted indices)
    n_obs = indptr.size - 1
    cursor = np.empty(n_obs, np.int64)
    for r in range(n_obs):
        cursor[r] = indptr[r] + np.searchsorted(indices[indptr[r]:indptr[r + 1]], lo)
    return cursor


@numba.njit(nogil=True, cache=True)
def _pack_block_csr(data, indices, indptr, hi, codes, code_bits, cursor, lo):
    # _pack_block's keys for the columns lo..hi of a canonical CSR matrix: each row's run of
    # those columns starts at its cursor (its first column >= lo); the cursors move past them
    n_obs = indptr.size - 1
    end = np.empty(n_obs, np.int64)
    total = 0
    for r in range(n_obs):
        e = cursor[r]
        stop = indptr[r + 1]
        while e < stop and indices[e] < hi:
            e += 1
        end[r] = e
        if codes[r] >= 0:
            total += e - cursor[r]
    keys = np.empty(total, np.uint64)
    bits = data.view(np.uint32)
    value_shift = np.uint64(code_bits)
    gene_shift = np.uint64(32 + code_bits)
    m = 0
    for r in range(n_obs):
        if codes[r] >= 0:
            g = np.uint64(codes[r])
            for p in range(cursor[r], end[r]):
                if data[p] == 0:
                    continue
                u = np.uint64(bits[p])
                u = (u ^ np.uint64(0xFFFFFFFF)) if u >= np.uint64(0x80000000) else (u | np.uint64(0x80000000))
                keys[m] = (np.uint64(indices[p] - lo) << gene_shift) | (u << value_shift) | g
                m += 1
        cursor[r] = end[r]
    return keys[:m]


def _most_genes(n_groups: int) -> int:
    """Genes in one packed sort: the key holds the gene, the value's 32 bits and the code."""
    return 1 << (32 - _code_bits(n_groups))


def _code_bits(n_groups: int) -> int:
    return max(1, int(n_groups - 1).bit_length())


def _run_blocks(block, blocks: list[tuple[int, int]]) -> None:
    """Blocks of genes on numba's number of threads: the numba steps release the GIL and
    so does NumPy's sort; each block writes only its own genes (no shared sums)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, numba.get_num_threads())) as pool:
        for done in [pool.submit(block, lo, hi) for lo, hi in blocks]:
            done.result()


def _rank_block_host(data, indices, indptr, lo, hi, dense, codes, group_size, reference,
                     rank_sum, tie_sum, first_gene) -> None:
    """Genes lo..hi of a CSC matrix (or of a dense block, ``dense``), written from column
    ``first_gene`` on: their non-zero values of kept cells sorted by (gene, value) with
    NumPy's sort (vectorised; numba's sort is ~10x slower), then walked in numba.
    float32 values travel in one uint64 key (gene, order-preserving value bits, code), so one
    sort of keys does it; float64 values are sorted by value, then stably by gene."""
    if data.dtype == np.float32:
        code_bits = _code_bits(group_size.size)
        keys = _pack_block(data, indices, indptr, lo, hi, dense, codes, code_bits)
        keys.sort()
        _walk_packed(keys, code_bits, hi - lo, group_size, reference, rank_sum, tie_sum,
                     first_gene)
        return
    values, value_codes, gene = _gather_block(data, indices, indptr, lo, hi, dense, codes)
    order = np.argsort(values)
    order = order[np.argsort(gene[order], kind="stable")]
    _walk_segments(values[order], value_codes[order], gene[order], hi - lo, group_size,
                   reference, rank_sum, tie_sum, first_gene)


@numba.njit(nogil=True, cache=True)
def _pack_block(data, indices, indptr, lo, hi, dense, codes, code_bits):
    # key = gene - lo | value bits made order-preserving as unsigned (sign bit flipped for
    # positives, every bit for negatives) | code; zeros and left-out cells are skipped
    keys = np.empty(indptr[hi] - indptr[lo], np.uint64)
    bits = data.view(np.uint32)
    value_shift = np.uint64(code_bits)
    gene_shift = np.uint64(32 + code_bits)
    m = 0
    for j in range(lo, hi):
        start = indptr[j]
        for p in range(start, indptr[j + 1]):
            if data[p] == 0:
                continue
            g = codes[p - start if dense else indices[p]]
            if g < 0:
                continue
            u = np.uint64(bits[p])
            u = (u ^ np.uint64(0xFFFFFFFF)) if u >= np.uint64(0x80000000) else (u | np.uint64(0x80000000))
            keys[m] = (np.uint64(j - lo) << gene_shift) | (u << value_shift) | np.uint64(g)
            m += 1
    return keys[:m]


@numba.njit(nogil=True, cache=True)
def _walk_packed(keys, code_bits, n_genes, group_size, reference, rank_sum, tie_sum, first_gene):
    # unpack the sorted keys into values, codes and genes, then walk each gene's run
    n = keys.size
    bits = np.empty(n, np.uint32)
    value_codes = np.empty(n, np.int32)
    gene = np.empty(n, np.int64)
    value_shift = np.uint64(code_bits)
    gene_shift = np.uint64(32 + code_bits)
    code_mask = (np.uint64(1) << value_shift) - np.uint64(1)
    for p in range(n):
        k = keys[p]
        u = (k >> value_shift) & np.uint64(0xFFFFFFFF)
        u = (u ^ np.uint64(0x80000000)) if u >= np.uint64(0x80000000) else (u ^ np.uint64(0xFFFFFFFF))
        bits[p] = np.uint32(u)
        value_codes[p] = np.int32(k & code_mask)
        gene[p] = np.int64(k >> gene_shift)
    _walk_segments(bits.view(np.float32), value_codes, gene, n_genes, group_size, reference,
                   rank_sum, tie_sum, first_gene)


@numba.njit(nogil=True, cache=True)
def _gather_block(data, indices, indptr, lo, hi, dense, codes):
    # the non-zero values of kept cells of genes lo..hi, with their codes and (local) genes
    n = indptr[hi] - indptr[lo]
    values = np.empty(n, data.dtype)
    value_codes = np.empty(n, np.int32)
    gene = np.empty(n, np.int32)
    m = 0
    for j in range(lo, hi):
        start = indptr[j]
        for p in range(start, indptr[j + 1]):
            if data[p] == 0:
                continue
            g = codes[p - start if dense else indices[p]]
            if g < 0:
                continue
            values[m] = data[p]
            value_codes[m] = g
            gene[m] = j - lo
            m += 1
    return values[:m], value_codes[:m], gene[:m]


@numba.njit(nogil=True, cache=True)
def _walk_segments(values, value_codes, gene, n_genes, group_size, reference, rank_sum,
                   tie_sum, first_gene):
    # values sorted by (gene, value): each gene's run (possibly empty) walked on its own
    p = 0
    n = values.size
    for jj in range(n_genes):
        q = p
        while q < n and gene[q] == jj:
            q += 1
        _walk(values[p:q], value_codes[p:q], group_size, reference, rank_sum, tie_sum,
              first_gene + jj)
        p = q


@numba.njit(inline="always")
def _tie_term(t):
    d = np.float64(t)
    return d * d * d - d


@numba.njit(nogil=True, cache=True)
def _walk(values, codes, group_size, reference, rank_sum, tie_sum, j):
    """One gene's sorted non-zero values in tie blocks, the zeros as one block: the body of
    kernels/rank_genes.cu's rank_sums (same order of operations, same results)."""
    n_groups = group_size.size
    m = values.size
    count = np.zeros(n_groups, np.int64)
    n_cells = group_size.sum()
    zeros_done = False
    i = 0
    if reference < 0:
        sums = np.zeros(n_groups)  # rank_sum[:, j], in a local array (cache)
        ranked = 0
        ties = 0.0
        zero_rank = 0.0
        while True:
            if not zeros_done and (i == m or values[i] > 0):
                t = n_cells - m
                zero_rank = ranked + 0.5 * (t + 1)
                ties += _tie_term(t)
                ranked += t
                zeros_done = True
                continue
            if i == m:
                break
            e = i + 1
            while e < m and values[e] == values[i]:
                e += 1
            rank = ranked + 0.5 * (e - i + 1)
            for p in range(i, e):
                sums[codes[p]] += rank
                count[codes[p]] += 1
            ties += _tie_term(e - i)
            ranked += e - i
            i = e
        for g in range(n_groups):
            rank_sum[g, j] = sums[g] + (group_size[g] - count[g]) * zero_rank
        tie_sum[0, j] = ties
        return
    block = np.zeros(n_groups, np.int64)
    below = np.zeros(n_groups, np.int64)
    for p in range(m):
        count[codes[p]] += 1
    ref_below = 0
    ref_ties = 0.0
    while True:
        if not zeros_done and (i == m or values[i] > 0):
            b_r = group_size[reference] - count[reference]
            for g in range(n_groups):
                b = group_size[g] - count[g]
                if g == reference or b == 0:
                    continue
                rank_sum[g, j] += b * ((below[g] + ref_below) + 0.5 * (b + b_r + 1))
                tie_sum[g, j] += _tie_term(b + b_r) - _tie_term(b_r)
                below[g] += b
            ref_ties += _tie_term(b_r)
            ref_below += b_r
            zeros_done = True
            continue
        if i == m:
            break
        e = i + 1
        while e < m and values[e] == values[i]:
            e += 1
        b_r = 0
        for p in range(i, e):
            if codes[p] == reference:
                b_r += 1
            else:
                block[codes[p]] += 1
        for p in range(i, e):
            g = codes[p]
            b = 0 if g == reference else block[g]
            if b == 0:
                continue
            rank_sum[g, j] += b * ((below[g] + ref_below) + 0.5 * (b + b_r + 1))
            tie_sum[g, j] += _tie_term(b + b_r) - _tie_term(b_r)
            below[g] += b
            block[g] = 0
        ref_ties += _tie_term(b_r)
        ref_below += b_r
        i = e
    for g in range(n_groups):
        if g != reference:
            tie_sum[g, j] += ref_ties


# ---------------------------------------------------------------- device

@rank_sums.register(types.CupyCSMatrix | types.CupyArray)
def _(x, codes, n_groups, reference=-1):
    codes, group_size = _setup(codes, x.shape[0], n_groups, reference)
    x = _float(x)
    if isinstance(x, types.CupyArray):
        return rank_sums_dense_device(x, codes, group_size, reference)
    x = canonical(x if isinstance(x, types.CupyCSCMatrix) else x.tocsc())  # cuSPARSE: one copy
    return rank_sums_csc_device(x, codes, group_size, reference)


def rank_sums_dense_device(x, codes: np.ndarray, group_size: np.ndarray, reference: int) -> RankSums:
    """A dense float matrix on the device, DEVICE_BLOCK_VALUES values (whole genes) at a time."""
    import cupy as cp

    n_obs, n_vars = x.shape
    codes_dev = cp.asarray(codes)
    rank_sum, tie_sum = _outputs(group_size.size, n_vars, reference)
    genes = max(1, DEVICE_BLOCK_VALUES // max(n_obs, 1))
    for lo in range(0, n_vars, genes):
        hi = min(lo + genes, n_vars)
        values = cp.ascontiguousarray(x[:, lo:hi].T).reshape(-1)
        position = cp.arange(values.size, dtype=np.int64)
        rank_sum[:, lo:hi], tie_sum[:, lo:hi] = rank_sums_device(
            values, position % n_obs, position // n_obs, hi - lo, codes_dev, group_size, reference)
    return RankSums(rank_sum, tie_sum, group_size)


def rank_sums_csc_device(x, codes: np.ndarray, group_size: np.ndarray, reference: int) -> RankSums:
    """A canonical CSC float matrix on the device, in runs of genes of at most
    DEVICE_BLOCK_VALUES stored values."""
    import cupy as cp

    n_vars = x.shape[1]
    codes_dev = cp.asarray(codes)
    rank_sum, tie_sum = _outputs(group_size.size, n_vars, reference)
    indptr = x.indptr.get().astype(np.int64)  # synchronize!
    for lo, hi in gene_blocks(indptr, DEVICE_BLOCK_VALUES):
        start, end = int(indptr[lo]), int(indptr[hi])
        offsets = cp.asarray(indptr[lo + 1:hi + 1] - start)
        column = cp.searchsorted(offsets, cp.arange(end - start, dtype=np.int64), side="right")
        rank_sum[:, lo:hi], tie_sum[:, lo:hi] = rank_sums_device(
            x.data[start:end], x.indices[start:end], column, hi - lo, codes_dev, group_size,
            reference)
    return RankSums(rank_sum, tie_sum, group_size)


def gene_blocks(indptr: np.ndarray, most: int, most_genes: int | None = None) -> list[tuple[int, int]]:
    """Runs of consecutive genes holding at most ``most`` stored values each (a gene with more
    is a block of its own) and at most ``most_genes`` genes, from a host CSC indptr."""
    blocks, lo, n_vars = [], 0, indptr.size - 1
    while lo < n_vars:
        hi = int(np.searchsorted(indptr, indptr[lo] + most, side="right")) - 1
        hi = min(max(hi, lo + 1), n_vars, lo + (most_genes or n_vars))
        blocks.append((lo, hi))
        lo = hi
    return blocks


def rank_sums_device(values, rows, column, n_cols: int, codes, group_size: np.ndarray,
                     reference: int) -> tuple[np.ndarray, np.ndarray]:
    """One block of genes on the device: ``values[k]`` is the value of cell ``rows[k]`` in the
    block's gene ``column[k]`` (any order). The non-zeros of kept cells are sorted by (gene,
    value) and rank_sums walks each gene's run. Returns the block's (rank_sum, tie_sum) on
    the host."""
    import cupy as cp

    n_groups = group_size.size
    value_codes = codes[rows]
    kept = cp.flatnonzero((values != 0) & (value_codes >= 0))
    values, value_codes, column = values[kept], value_codes[kept], column[kept]
    if values.size:
        # by gene, then value: float64 keys hold every float32/float64 value and gene exactly
        order = cp.lexsort(cp.stack([values.astype(np.float64), column.astype(np.float64)]))
        values, value_codes = values[order], value_codes[order]
    values = cp.ascontiguousarray(values)
    value_codes = cp.ascontiguousarray(value_codes, dtype=np.int32)
    segment = cp.zeros(n_cols + 1, np.int64)
    segment[1:] = cp.cumsum(cp.bincount(column, minlength=n_cols))
    rank_sum = cp.empty(n_groups * n_cols, np.float64)
    tie_sum = cp.empty((n_groups if reference >= 0 else 1) * n_cols, np.float64)
    state = [cp.empty(n_groups * n_cols, np.int64) for _ in range(3)]  # count, block, below
    kernel = cuda.get_kernel("rank_genes", NAME_EXPRESSIONS,
                             cuda.template_name("rank_sums", values.dtype))
    cuda.launch(kernel, -(-n_cols // BLOCK), BLOCK,
                (values, value_codes, segment, np.int64(n_cols), cp.asarray(group_size),
                 np.int32(n_groups), np.int32(reference), rank_sum, tie_sum, *state))
    rank_sum = rank_sum.get().reshape(n_groups, n_cols)  # synchronize!
    return rank_sum, tie_sum.get().reshape(-1, n_cols)
