"""Kernels of kernels/hvg.cu and kernels/normalize.cu run as written on the CPU
(tests/_on_threads.py: every CUDA thread a std::thread, warp shuffles and votes as thread
barriers), with the arguments their device launchers in gpusc._kernels.hvg / .normalize
build, against the numba (or numpy) twins in the same modules.

The hvg tests repeat their launcher's steps with numpy in place of CuPy: the same dtypes, grid,
block and argument order; the normalize tests call the launchers themselves, NumPy standing in
for CuPy. Shapes are small: every shuffle is a barrier of 32 threads.

Exactness: where the kernel and the twin add the same values in the same order the results
must be equal bit for bit. Where the orders differ (a warp's lanes take every 32nd value and
warp_sum reduces the 32 partial sums by __shfl_down_sync over offsets 16, 8, 4, 2, 1; the
twins add in stored order), count data keep the comparison exact (sums of integers below
2^53 do not round in double); otherwise allclose with the reason stated at the call.
"""

from __future__ import annotations

import types

import _on_threads as on_threads
import numpy as np
import pytest
from fast_array_utils import types as fa_types
from scipy import sparse

from gpusc._core import cuda
from gpusc._kernels import hvg, normalize

EMPTY_ROW, EMPTY_COL = 7, 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return {family: on_threads.build(family, tmp_path_factory.mktemp(family))
            for family in ("hvg", "normalize")}


def _counts(n_obs, n_vars, dtype, seed, density=0.6, lam=2.0):
    """Integer counts with one empty row and one empty column; most columns hold more than
    64 stored values, so every lane of a warp walks several of them."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(lam, (n_obs, n_vars)) * (rng.random((n_obs, n_vars)) < density)
    x[:, 0] = rng.poisson(lam, n_obs) + 1  # one full column: the longest lane strides
    x[EMPTY_ROW] = 0
    x[:, EMPTY_COL] = 0
    return x.astype(dtype)


def _csr(x, index_type):
    m = sparse.csr_matrix(x)
    m.indices, m.indptr = m.indices.astype(index_type), m.indptr.astype(index_type)
    return m


# (hvg's per-gene moments and Pearson residual sums: test_on_threads_moments.py)


# ================================================================ hvg: poisson_gene_selection


def test_poisson_expected_zeros_on_threads(built):
    rng = np.random.default_rng(41)
    n_batches, n_vars = 3, 300  # 900 (batch, gene) threads: four blocks, the last one partial
    scaled_means = rng.gamma(0.5, 1e-4, (n_batches, n_vars))
    scaled_means[:, EMPTY_COL] = 0.0  # a gene without counts: every cell a zero
    per_batch = [40, 1, 25]  # distinct totals per batch; one batch with a single total
    totals = np.concatenate([np.sort(rng.choice(np.arange(100, 20000), k, replace=False)) for k in per_batch])
    totals = totals.astype(np.float64)
    weights = rng.integers(1, 30, totals.size).astype(np.float64)
    batch_start = np.concatenate([[0], np.cumsum(per_batch)]).astype(np.int64)
    expected = np.empty((n_batches, n_vars), np.float64)
    cuda.launch(built["hvg"]["poisson_expected_zeros"], -(-n_batches * n_vars // hvg.BLOCK), hvg.BLOCK, (
        np.ascontiguousarray(scaled_means, dtype=np.float64), totals, weights, batch_start,
        np.int32(n_batches), np.int64(n_vars), expected,
    ))
    want = hvg.poisson_expected_zeros(scaled_means, totals, weights, batch_start)
    # the same terms (libm's exp on both sides) added in the same order
    np.testing.assert_array_equal(expected, want)
    np.testing.assert_array_equal(expected[:, EMPTY_COL], 1.0)
    reference = np.stack([(weights[lo:hi, None] * np.exp(-scaled_means[b][None, :] * totals[lo:hi, None])).sum(0)
                          / weights[lo:hi].sum() for b, (lo, hi) in enumerate(zip(batch_start[:-1], batch_start[1:]))])
    np.testing.assert_allclose(expected, reference, rtol=1e-13)  # numpy's pairwise sum


# ================================================================ normalize
# normalize's device launchers themselves (row_sums, high_genes, scale_rows_inplace and
# log1p_inplace as registered for CuPy arrays), NumPy standing in for CuPy and SciPy CSR for
# CuPy's, their kernels on threads.


@pytest.fixture
def device(built, monkeypatch):
    """name -> the launcher registered for device arrays; ``device.launched``: name ->
    arguments of the kernel's latest launch."""
    on_threads.numpy_as_cupy(monkeypatch)
    launched = on_threads.launchers_on_threads(monkeypatch, built)
    # _csr_or_dense_args tells device CSR from device dense by type: SciPy's CSR is ours here
    monkeypatch.setattr(normalize, "types", types.SimpleNamespace(CupyCSRMatrix=sparse.csr_matrix))
    functions = (normalize.row_sums, normalize.high_genes, normalize.scale_rows_inplace,
                 normalize.log1p_inplace)
    return types.SimpleNamespace(launched=launched, **{
        f.__name__: f.dispatch(fa_types.CupyArray) for f in functions})


def _normalize_input(kind, value_type, values, seed):
    """(device-like x, host twin x): kind is csr32, csr64 or dense."""
    x = _counts(120, 100, value_type, seed, density=0.5)
    if values == "real":
        x = (x * np.random.default_rng(seed + 1).uniform(0.1, 3.0, x.shape)).astype(value_type)
    return _on_device(x, kind), _on_device(x, kind).copy()


def _on_device(dense, kind):
    if kind == "dense":
        return dense.copy().view(on_threads.DeviceArray)
    return _csr(dense, np.int32 if kind == "csr32" else np.int64)


def _kernel_name(kernel, x):
    if sparse.issparse(x):
        return cuda.template_name(f"{kernel}_csr", x.dtype, x.indices.dtype)
    return cuda.template_name(f"{kernel}_dense", x.dtype)


KINDS = ["csr32", "csr64", "dense"]


@pytest.mark.parametrize("values", ["counts", "real"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_row_sums_on_threads(device, value_type, kind, masked, values):
    x, host = _normalize_input(kind, value_type, values, seed=51)
    excluded = None
    if masked:
        excluded = np.zeros(100, np.uint8)
        excluded[[0, 2, 50, 99]] = 1
    got, bad = device.row_sums(x, excluded)
    assert list(device.launched) == [_kernel_name("row_sums", x)]
    want, want_bad = normalize.row_sums(np.asarray(host) if kind == "dense" else host, excluded)
    assert bad is want_bad is False
    assert got[EMPTY_ROW] == 0.0
    if values == "counts":
        np.testing.assert_array_equal(got, want)  # integers: exact in any order
    else:
        # lane-strided partial sums and a shuffle tree vs the twin's row order
        np.testing.assert_allclose(got, want, rtol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_row_sums_nonfinite_on_threads(device, value_type, kind):
    for value in (np.nan, np.inf, -np.inf):
        dense = _counts(120, 100, value_type, seed=52, density=0.5)
        dense[30, 40] = value
        x = _on_device(dense, kind)
        host = dense if kind == "dense" else x
        got, bad = device.row_sums(x)
        want, want_bad = normalize.row_sums(host)
        assert bad and want_bad
        np.testing.assert_array_equal(got, want)  # counts elsewhere; NaN/inf in row 30
        # a non-finite value in an excluded gene is still reported
        excluded = np.zeros(100, np.uint8)
        excluded[40] = 1
        got, bad = device.row_sums(x, excluded)
        assert bad and np.isfinite(got).all()
        np.testing.assert_array_equal(got, normalize.row_sums(host, excluded)[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_high_genes_on_threads(device, value_type, kind):
    dense = _counts(120, 100, value_type, seed=61, density=0.5)
    dense[[5, 60, 119], [11, 42, 97]] = 500  # a few genes far above 20 % of their cell's total
    max_fraction = 0.2
    # gene 12: in row 9 the largest count v with v <= 20 % of the row's total (v included),
    # v <= rest / 4; not flagged (the test is strictly above)
    dense[:, 12] = 0
    dense[9, 12] = np.floor(dense[9].sum(dtype=np.float64) / 4)
    x = _on_device(dense, kind)
    host = dense if kind == "dense" else x
    sums, _ = device.row_sums(x)
    excluded = device.high_genes(x, sums, max_fraction)
    assert _kernel_name("flag_high_genes", x) in device.launched
    want = normalize.high_genes(host, normalize.row_sums(host)[0], max_fraction)
    np.testing.assert_array_equal(excluded, want)  # the same comparisons, value by value
    assert excluded[[11, 42, 97]].all() and not excluded[12] and not excluded[EMPTY_COL]
    assert excluded.sum() < 10
    # normalize_total's second pass: the sums without the flagged genes
    got, _ = device.row_sums(x, excluded)
    np.testing.assert_array_equal(got, normalize.row_sums(host, excluded)[0])  # counts: exact


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_scale_rows_on_threads(device, value_type, kind):
    x, host = _normalize_input(kind, value_type, "real", seed=71)
    host = np.asarray(host) if kind == "dense" else host
    sums, _ = normalize.row_sums(host)
    norm_factor = sums / 1e4
    divisor = norm_factor + (norm_factor == 0)  # as pp.normalize_total: empty cells stay zero
    device.scale_rows_inplace(x, divisor)
    assert list(device.launched) == [_kernel_name("scale_rows", x)]
    normalize.scale_rows_inplace(host, divisor)
    # value * (1 / divisor) in double, rounded to the value type, on both sides
    got = x.toarray() if sparse.issparse(x) else np.asarray(x)
    want = host.toarray() if sparse.issparse(host) else host
    np.testing.assert_array_equal(got, want)
    assert not got[EMPTY_ROW].any()
    np.testing.assert_allclose(got.sum(axis=1, dtype=np.float64)[sums > 0], 1e4, rtol=1e-5)


@pytest.mark.parametrize("base", [None, 2.0])
@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_log1p_on_threads(built, device, value_type, kind, base):
    dense = _counts(120, 100, value_type, seed=81, density=0.5)
    dense = (dense * np.random.default_rng(82).uniform(0.1, 3.0, dense.shape)).astype(value_type)
    values = dense.copy() if kind == "dense" else sparse.csr_matrix(dense).data  # pp.log1p: x or x.data
    host = values.copy()
    device.log1p_inplace(values.view(on_threads.DeviceArray), base)
    name = cuda.template_name("log1p_values", values.dtype)
    assert list(device.launched) == [name]
    normalize.log1p_inplace(host, base)
    # The kernel takes log1p in double and multiplies by 1 / ln(base); the twin (numpy) takes
    # log1p in the value type and divides by ln(base) in it: up to 2 ulp apart in float32 and,
    # with a base, in float64 (the reciprocal's rounding and the product's).
    eps = np.finfo(value_type).eps
    np.testing.assert_allclose(values, host, rtol=2 * eps, atol=0)
    reference = np.log1p(dense.astype(np.float64)) / (1.0 if base is None else np.log(base))
    if kind == "dense":
        # float32: one rounding of a double result; float64 with a base: the reciprocal's and
        # the product's roundings vs the reference's division
        np.testing.assert_allclose(values, reference, rtol=2 * eps)
        assert not values[EMPTY_ROW].any()
    # the grid-stride loop (the launcher's grid reaches it past 2^24 values): the launch's
    # arguments again, on 3 blocks
    strided = (dense if kind == "dense" else sparse.csr_matrix(dense).data).copy()
    cuda.launch(built["normalize"][name], 3, 256, (strided.reshape(-1), *device.launched[name][1:]))
    np.testing.assert_array_equal(strided, values)
