"""kernels/aggregate.cu run as written on the CPU (tests/_on_threads.py: every CUDA thread a
std::thread), launched by gpusc._kernels.aggregate's device launchers with NumPy standing in
for CuPy (tests/_on_threads.numpy_as_cupy, plus the sorts the launcher asks CuPy for).
Compared with sklearn's csc_median_axis_0 on each group's rows (scanpy's own path) and with
the numba twin: the same algorithm, so the medians are equal bit for bit.
"""

from __future__ import annotations

import _on_threads as on_threads
import numpy as np
import pytest
from scipy import sparse
from sklearn.utils.sparsefuncs import csc_median_axis_0

from gpusc._core import cuda
from gpusc._kernels import aggregate

N_GROUPS = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return on_threads.build("aggregate", tmp_path_factory.mktemp("aggregate"))


@pytest.fixture
def device(built, monkeypatch):
    fake = on_threads.numpy_as_cupy(monkeypatch)
    as_device = on_threads.DeviceArray
    fake.argsort = lambda a: np.argsort(a, kind="stable").view(as_device)  # cupy's is stable
    fake.searchsorted = lambda a, v, side="left": np.searchsorted(a, v, side=side).view(as_device)
    monkeypatch.setattr(cuda, "get_kernel", lambda family, names, name: built[name])
    return fake


def _values(n_obs, n_vars, dtype, seed):
    """Ties, negative values, explicit zeros, an all-zero gene (2) and a gene stored in every
    cell (0), so every branch of the rank lookup is taken."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 6, (n_obs, n_vars)) * (rng.random((n_obs, n_vars)) < 0.4)
    x = (x * 0.75).astype(dtype)
    x[:, 0] = rng.integers(1, 4, n_obs)
    x[:, 2] = 0
    return x


def _codes(n_obs, seed):
    """Groups of odd and even sizes, one empty (3) and one of a single cell, cells left out."""
    codes = np.random.default_rng(seed).choice(np.array([-1, 0, 1, 2, 4], np.int32), n_obs)
    codes[codes == 4] = 2
    codes[7] = 4
    return codes


def _sklearn(x, codes):
    out = np.full((N_GROUPS, x.shape[1]), np.nan)
    for g in range(N_GROUPS):
        rows = x[codes == g]
        if rows.shape[0]:
            out[g] = csc_median_axis_0(sparse.csc_matrix(rows))
    return out


@pytest.mark.parametrize("value_type", [np.float32, np.float64])
@pytest.mark.parametrize("index_type", [np.int32, np.int64])
def test_median_sorted_on_threads(device, value_type, index_type):
    # 70 genes x 5 groups: 350 threads, two blocks of 256
    x = _values(90, 70, value_type, seed=1)
    codes = _codes(90, seed=2)
    m = sparse.csc_matrix(x)
    m.indices, m.indptr = m.indices.astype(index_type), m.indptr.astype(index_type)
    got = aggregate.sparse_medians_device(m.data, m.indices, m.indptr, m.shape, codes, N_GROUPS)
    want = _sklearn(x, codes)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.isnan(got[3]).all()  # the empty group
    np.testing.assert_array_equal(aggregate.group_medians(m, codes, N_GROUPS), want)
    np.testing.assert_array_equal(aggregate.group_medians(m.tocsr(), codes, N_GROUPS), want)


def test_even_counts_average_in_the_values_precision(device):
    # (a + b) / 2 of two float32 values rounds in float32, as sklearn's scalar arithmetic
    a, b = np.float32(16777216.0), np.float32(1.0)  # 2**24 + 1 is not a float32
    x = np.array([[a], [b]], np.float32)
    codes = np.zeros(2, np.int32)
    m = sparse.csc_matrix(x)
    got = aggregate.sparse_medians_device(m.data, m.indices, m.indptr, m.shape, codes, 1)
    assert got[0, 0] == csc_median_axis_0(m)[0] == np.float64((a + b) / np.float32(2))
