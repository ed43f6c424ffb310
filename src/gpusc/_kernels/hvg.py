"""``kernels/hvg.cu`` and its numba twin: the loop of highly_variable_genes' flavors that the
moments family (:mod:`gpusc._kernels.moments`, every per-gene sum) does not cover.
"""

from __future__ import annotations

from functools import singledispatch

import numba
import numpy as np
from fast_array_utils import types

from .._core import cuda

BLOCK = 256
NAME_EXPRESSIONS = ("poisson_expected_zeros",)


# ---------------------------------------------------------------- flavor="poisson_gene_selection"
#
# Expected fraction of zeros per (batch, gene) under a Poisson model, mean over the batch's
# cells c of exp(-scaled_means[b, g] * total[c]), without the cells x genes outer product:
# cells with the same total give the same term, so each batch's distinct totals are visited
# once, weighted by how many cells have them (counts: a few thousand distinct totals).


@singledispatch
def poisson_expected_zeros(scaled_means, totals: np.ndarray, weights: np.ndarray,
                           batch_start: np.ndarray) -> np.ndarray:
    """``sum_k weights[k] * exp(-scaled_means[b, g] * totals[k]) / sum_k weights[k]`` over
    ``k`` in ``batch_start[b]:batch_start[b+1]``, for every batch ``b`` and gene ``g``.

    ``scaled_means`` is (n_batches, n_vars) float64, on the host (numba) or the device (CUDA
    kernel): that chooses where the loop runs. ``totals`` (float64) holds each batch's distinct
    cell totals, ``weights`` (float64) how many cells have each, ``batch_start`` (int64,
    n_batches + 1) where each batch's run starts. Returns (n_batches, n_vars) float64 on the host.
    """
    raise TypeError(f"poisson_expected_zeros: unsupported array type {type(scaled_means)}")


@poisson_expected_zeros.register(np.ndarray)
def _(scaled_means, totals, weights, batch_start):
    return _poisson_expected_zeros_host(
        np.ascontiguousarray(scaled_means, dtype=np.float64),
        np.ascontiguousarray(totals, dtype=np.float64),
        np.ascontiguousarray(weights, dtype=np.float64),
        np.ascontiguousarray(batch_start, dtype=np.int64))


@numba.njit(parallel=True, cache=True)
def _poisson_expected_zeros_host(scaled_means, totals, weights, batch_start):
    # Genes run in parallel; each (batch, gene) walks the batch's totals in stored order,
    # as kernels/hvg.cu's poisson_expected_zeros does.
    n_batches, n_cols = scaled_means.shape
    expected = np.empty((n_batches, n_cols))
    for g in numba.prange(n_cols):
        for b in range(n_batches):
            m = scaled_means[b, g]
            acc = 0.0
            n = 0.0
            for k in range(batch_start[b], batch_start[b + 1]):
                acc += weights[k] * np.exp(-m * totals[k])
                n += weights[k]
            expected[b, g] = acc / n
    return expected


@poisson_expected_zeros.register(types.CupyArray)
def _(scaled_means, totals, weights, batch_start):
    import cupy as cp

    n_batches, n_vars = scaled_means.shape
    expected = cp.empty((n_batches, n_vars), np.float64)
    kernel = cuda.get_kernel("hvg", NAME_EXPRESSIONS, "poisson_expected_zeros")
    cuda.launch(kernel, -(-n_batches * n_vars // BLOCK), BLOCK, (
        cp.ascontiguousarray(scaled_means, dtype=np.float64),
        cp.asarray(totals, dtype=np.float64), cp.asarray(weights, dtype=np.float64),
        cp.asarray(batch_start, dtype=np.int64), np.int32(n_batches), np.int64(n_vars), expected,
    ))
    return expected.get()  # synchronize!
