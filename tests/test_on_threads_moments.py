"""kernels/moments.cu run as written on the CPU (tests/_on_threads.py: every CUDA thread a
std::thread), launched by the device launchers of gpusc._kernels.moments themselves, with NumPy
standing in for CuPy (tests/_on_threads.numpy_as_cupy): slice layout, grids, argument order,
the follow-up sum_slices. Compared with the definition (NumPy on the dense matrix) and the
numba twins.

Exactness: integer counts keep every comparison exact (sums of integers below 2^53 do not
round in double, whatever the order); non-integer data are compared with a stated rtol.
Shapes are small: every __syncwarp and shuffle is a barrier of 32 threads.
"""

from __future__ import annotations

import _on_threads as on_threads
import numpy as np
import pytest
from scipy import sparse
from test_moments import definition

from gpusc._core import cuda
from gpusc._kernels import moments
from gpusc._kernels.moments import (
    COUNT_NONE,
    COUNT_NONZERO,
    COUNT_POSITIVE,
    MODE_CLIP,
    MODE_EXPM1,
    MODE_IDENTITY,
)

V_TYPES = [np.float32, np.float64]
I_TYPES = [np.int32, np.int64]
N_GROUPS = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return on_threads.build("moments", tmp_path_factory.mktemp("moments"))


@pytest.fixture
def device(built, monkeypatch):
    """The moments launchers with NumPy as CuPy and the kernels on threads; records the bytes
    of every array the launchers allocate."""
    fake = on_threads.numpy_as_cupy(monkeypatch)
    allocated = []
    for name in ("zeros", "empty", "asarray"):
        make = getattr(fake, name)

        def record(*args, make=make, **kwargs):
            out = make(*args, **kwargs)
            allocated.append(out.nbytes)
            return out
        setattr(fake, name, record)
    monkeypatch.setattr(cuda, "get_kernel", lambda family, names, name: built[name])
    return allocated


def _counts(n_obs, n_vars, dtype, seed, density=0.5):
    """Integer counts with an empty row (5) and an empty column (3); column 0 is full, so
    the lanes of a warp wrap around its rows."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, (n_obs, n_vars)) * (rng.random((n_obs, n_vars)) < density)
    x[:, 0] = rng.poisson(2.0, n_obs) + 1
    x[5] = 0
    x[:, 3] = 0
    return x.astype(dtype)


def _codes(n_obs, seed):
    """Groups interleaved over the rows (the launcher regroups them); group 2 has no cells,
    some cells are left out (-1)."""
    return np.random.default_rng(seed).choice(np.array([-1, 0, 1, 3], np.int32), n_obs)


def _csr(x, index_type):
    m = sparse.csr_matrix(x)
    m.indices, m.indptr = m.indices.astype(index_type), m.indptr.astype(index_type)
    return m


def _check(got, x, codes, mode, scale, clip, count, rtol=0.0):
    n_groups = max(int(codes.max()) + 1, N_GROUPS if codes.min() < 0 else 1)
    s, s2, n = definition(x, codes, n_groups, mode, scale, clip, count)
    if rtol:
        np.testing.assert_allclose(got.sum, s, rtol=rtol)
        np.testing.assert_allclose(got.sum_sq, s2, rtol=rtol)
    else:
        np.testing.assert_array_equal(got.sum, s)
        np.testing.assert_array_equal(got.sum_sq, s2)
    if count != COUNT_NONE:
        np.testing.assert_array_equal(got.count, n)


MODES = [(MODE_IDENTITY, 1.0), (MODE_EXPM1, float(np.log(2.0))), (MODE_CLIP, 1.0)]


@pytest.mark.parametrize("value_type", V_TYPES)
@pytest.mark.parametrize("index_type", I_TYPES)
@pytest.mark.parametrize(("mode", "scale"), MODES)
def test_csr_on_threads(device, value_type, index_type, mode, scale):
    # 150 rows: several slices of at least 16 rows, each group's rows spread over the matrix
    x = _counts(150, 70, value_type, seed=1)
    if mode == MODE_EXPM1:
        x = np.log1p(x).astype(value_type)  # what the seurat flavor reads
    codes = _codes(150, seed=2)
    clip = np.random.default_rng(3).integers(1, 4, (N_GROUPS, 70)).astype(np.float64)  # exact sums
    m = _csr(x, index_type)
    got = moments.moments_device(m.data, m.indices, m.indptr, m.shape, codes, N_GROUPS, mode,
                                 scale, clip, True, COUNT_POSITIVE)
    # integer counts: exact; expm1 of logs: the kernel's expm1/expm1f against NumPy's (an ulp
    # of float32 per value at most), and sums in another order
    rtol = (1e-6 if value_type == np.float32 else 1e-12) if mode == MODE_EXPM1 else 0.0
    _check(got, x, codes, mode, scale, clip, COUNT_POSITIVE, rtol)
    assert got.flags == (4 if mode == MODE_EXPM1 else 0)  # the device always looks for fractions
    twin = moments.gene_moments(m, codes, N_GROUPS, mode=mode, scale=scale, clip=clip,
                                count=COUNT_POSITIVE)
    np.testing.assert_allclose(got.sum, twin.sum, rtol=rtol)
    layout = moments.slice_layout(codes, 150, N_GROUPS, moments.device_slices(150, 70, 3),
                                  moments.DEVICE_MIN_ROWS)
    assert layout.n_slices >= 4  # more than one slice in a group: sum_slices adds them


@pytest.mark.parametrize("value_type", V_TYPES)
@pytest.mark.parametrize(("mode", "scale"), MODES)
def test_dense_on_threads(device, value_type, mode, scale):
    x = _counts(120, 300, value_type, seed=4)  # 300 genes: two column tiles of 256 threads
    codes = _codes(120, seed=5)
    clip = np.random.default_rng(6).integers(1, 4, (N_GROUPS, 300)).astype(np.float64)
    got = moments.moments_device(np.ascontiguousarray(x), None, None, x.shape, codes, N_GROUPS,
                                 mode, scale, clip, True, COUNT_NONZERO)
    rtol = (1e-6 if value_type == np.float32 else 1e-12) if mode == MODE_EXPM1 else 0.0
    _check(got, x, codes, mode, scale, clip, COUNT_NONZERO, rtol)


@pytest.mark.parametrize("index_type", I_TYPES)
@pytest.mark.parametrize("count", [COUNT_NONE, COUNT_POSITIVE, COUNT_NONZERO])
def test_csc_one_group_on_threads(device, index_type, count):
    x = _counts(90, 40, np.float32, seed=7)
    x[:4, 9] = -1.0  # counted by != 0 only
    m = sparse.csc_matrix(x)
    m.indices, m.indptr = m.indices.astype(index_type), m.indptr.astype(index_type)
    got = moments.moments_device_csc(m, MODE_IDENTITY, 1.0, None, True, count)
    _check(got, x, np.zeros(90, np.int32), MODE_IDENTITY, 1.0, None, count)
    assert got.flags == 2  # negative


def test_without_squares_or_counts(device):
    x = _counts(64, 30, np.float64, seed=8)
    m = sparse.csr_matrix(x)
    got = moments.moments_device(m.data, m.indices, m.indptr, m.shape, None, 1, MODE_IDENTITY,
                                 1.0, None, False, COUNT_NONE)
    assert got.sum_sq is None and got.count is None
    np.testing.assert_array_equal(got.sum[0], x.sum(axis=0))


@pytest.mark.parametrize("layout", ["csr", "dense"])
@pytest.mark.parametrize(("value", "flag"), [(np.nan, 1), (np.inf, 1), (-2.0, 2), (-0.0, 2),
                                             (0.5, 4)])
def test_flags_on_threads(device, layout, value, flag):
    x = _counts(40, 20, np.float64, seed=9)
    if layout == "csr":
        m = sparse.csr_matrix(x)
        m.data[m.indptr[6] + 1] = value  # a stored value (-0.0 stays stored)
        got = moments.moments_device(m.data, m.indices, m.indptr, m.shape, None, 1, MODE_CLIP,
                                     1.0, np.full((1, 20), 2.0), True, COUNT_NONE)
    else:
        x[6, 1] = value
        got = moments.moments_device(x, None, None, x.shape, None, 1, MODE_CLIP, 1.0,
                                     np.full((1, 20), 2.0), True, COUNT_NONE)
    assert got.flags == flag  # inf clipped to 2.0 is still reported


@pytest.mark.parametrize(("n_obs", "n_vars"), [(200, 50), (600, 2000)])
def test_workspace_within_the_stated_bound(device, monkeypatch, n_obs, n_vars):
    """The launcher allocates no more than device_workspace_bytes states (the matrix itself
    aside); with many genes the partial buffers stay within DEVICE_PART_BYTES (here shrunk to
    64 KiB so the test stays small) plus one slice per group."""
    monkeypatch.setattr(moments, "DEVICE_PART_BYTES", 1 << 16)
    x = sparse.random(n_obs, n_vars, density=0.01 if n_vars > 1000 else 0.3, format="csr",
                      dtype=np.float32, random_state=10)
    codes = _codes(n_obs, seed=11)
    for groups, squares, count in ((codes, True, COUNT_POSITIVE), (None, False, COUNT_NONE)):
        device.clear()
        n_groups = N_GROUPS if groups is not None else 1
        moments.moments_device(x.data, x.indices, x.indptr, x.shape, groups, n_groups,
                               MODE_IDENTITY, 1.0, None, squares, count)
        bound = moments.device_workspace_bytes(n_obs, n_vars, n_groups, squares=squares,
                                               count=count, grouped=groups is not None)
        assert sum(device) <= bound
        assert max(device) <= (1 << 16) + n_groups * 8 * n_vars * (1 + squares + (count > 0))


# ---------------------------------------------------------------- Pearson residual sums

def _residual_sums(x, codes, gene_sums, theta, clip):
    """The definition: the explicit residual matrix of each group, summed."""
    s, s2 = np.zeros((N_GROUPS, x.shape[1])), np.zeros((N_GROUPS, x.shape[1]))
    for g in range(N_GROUPS):
        xg = x[codes == g].astype(np.float64)
        keep = gene_sums[g] != 0
        if not keep.any():
            continue
        mu = np.outer(xg.sum(axis=1), gene_sums[g, keep]) / gene_sums[g].sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.clip((xg[:, keep] - mu) / np.sqrt(mu + mu**2 / theta), -clip, clip)
        s[g, keep], s2[g, keep] = r.sum(axis=0), (r**2).sum(axis=0)
    return s, s2


@pytest.mark.parametrize("value_type", V_TYPES)
@pytest.mark.parametrize("layout", ["csr-int32", "csr-int64", "dense"])
def test_pearson_sums_on_threads(device, value_type, layout):
    x = _counts(130, 40, value_type, seed=12)
    codes = _codes(130, seed=13)
    gene_sums = np.stack([x[codes == g].sum(axis=0, dtype=np.float64) for g in range(N_GROUPS)])
    theta, clip = 100.0, 3.0
    cell_sums = x.sum(axis=1, dtype=np.float64)
    if layout == "dense":
        got = moments.pearson_sums_device(x, None, None, x.shape, codes, N_GROUPS, cell_sums,
                                          gene_sums, theta, clip)
    else:
        m = _csr(x, np.int64 if layout.endswith("64") else np.int32)
        got = moments.pearson_sums_device(m.data, m.indices, m.indptr, m.shape, codes, N_GROUPS,
                                          cell_sums, gene_sums, theta, clip)
    want = _residual_sums(x, codes, gene_sums, theta, clip)
    twin = moments.pearson_residual_sums(x, codes, N_GROUPS, gene_sums, theta=theta, clip=clip)
    # residuals are irrational: sums in other orders (and f(v) - f(0) corrections) agree to
    # rounding; an empty row (5) gives NaN in its group, as scanpy's residuals
    for g, w, t in zip(got, want, twin, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-9, equal_nan=True)
        np.testing.assert_allclose(g, t, rtol=1e-10, atol=1e-9, equal_nan=True)
    assert np.isnan(got[0][codes[5]]).any() if codes[5] >= 0 else True
