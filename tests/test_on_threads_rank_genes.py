"""kernels/rank_genes.cu run as written on the CPU (tests/_on_threads.py: every CUDA thread a
std::thread), launched by the device launchers of gpusc._kernels.rank_genes themselves, with
NumPy standing in for CuPy (tests/_on_threads.numpy_as_cupy): the gene blocks, the gather of
the non-zeros of kept cells, the (gene, value) sort, the segments and the launch arguments.

Compared with the definition (scipy.stats.rankdata and tiecorrect on each gene's dense column,
per group against the rest and per pair against a reference) and with the numba twin: rank
sums are half-integers and tie terms integers, exact in float64, so every comparison is exact.
"""

from __future__ import annotations

import _on_threads as on_threads
import numpy as np
import pytest
from scipy import sparse, stats

from gpusc._core import cuda
from gpusc._kernels import rank_genes

N_GROUPS = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return on_threads.build("rank_genes", tmp_path_factory.mktemp("rank_genes"))


@pytest.fixture
def device(built, monkeypatch):
    """The rank_genes launchers with NumPy as CuPy and the kernel on threads; records each
    launch's grid and block."""
    fake = on_threads.numpy_as_cupy(monkeypatch)
    for name in ("lexsort", "stack", "cumsum", "bincount", "searchsorted"):  # beyond the stand-in's
        make = getattr(np, name)
        setattr(fake, name, lambda *a, make=make, **k: np.asarray(make(*a, **k)).view(on_threads.DeviceArray))
    launches = []

    def get_kernel(family, names, name):
        assert family == "rank_genes" and name in names

        def launch(grid, block, args, shared_mem=0):
            launches.append((name, grid, block))
            built[name](grid, block, args, shared_mem=shared_mem)
        return launch

    monkeypatch.setattr(cuda, "get_kernel", get_kernel)
    return launches


def _on_device(m):
    """A CSC matrix whose buffers answer CuPy's ``get()``, as cupyx's do."""
    for name in ("data", "indices", "indptr"):
        setattr(m, name, getattr(m, name).view(on_threads.DeviceArray))
    return m


def _values(n_obs, n_vars, dtype, seed):
    """Sparse values with ties (small integers, halves), negatives, an empty gene (3) and a
    gene without zeros (0)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 5, (n_obs, n_vars)) * 0.5 * (rng.random((n_obs, n_vars)) < 0.4)
    x[:, 0] = rng.integers(1, 4, n_obs)
    x[:, 3] = 0
    return x.astype(dtype)


def _codes(n_obs, seed):
    """Four groups interleaved over the cells, some cells left out (-1)."""
    return np.random.default_rng(seed).choice(np.array([-1, 0, 1, 2, 3], np.int32), n_obs)


def _definition(x, codes, reference):
    """Rank sums and tie terms from scipy on each gene's dense column."""
    n_vars = x.shape[1]
    rank_sum = np.zeros((N_GROUPS, n_vars))
    tie_sum = np.zeros((N_GROUPS if reference >= 0 else 1, n_vars))
    for j in range(n_vars):
        if reference < 0:
            kept = codes >= 0
            ranks = stats.rankdata(x[kept, j])
            for g in range(N_GROUPS):
                rank_sum[g, j] = ranks[codes[kept] == g].sum()
            n = kept.sum()
            tie_sum[0, j] = (1 - stats.tiecorrect(ranks)) * (n**3 - n)
            continue
        for g in range(N_GROUPS):
            if g == reference:
                continue
            pair = (codes == g) | (codes == reference)
            ranks = stats.rankdata(x[pair, j])
            rank_sum[g, j] = ranks[codes[pair] == g].sum()
            n = pair.sum()
            tie_sum[g, j] = (1 - stats.tiecorrect(ranks)) * (n**3 - n)
    return rank_sum, tie_sum


def _check(got, x, codes, reference):
    want_rank, want_tie = _definition(x, codes, reference)
    np.testing.assert_array_equal(got.rank_sum, want_rank)
    # scipy's tiecorrect returns 1 - T / (n^3 - n): T back from it rounds at the last bits
    np.testing.assert_allclose(got.tie_sum, want_tie, rtol=1e-12, atol=1e-6)
    twin = rank_genes.rank_sums(x, codes, N_GROUPS, reference)
    np.testing.assert_array_equal(got.rank_sum, twin.rank_sum)
    np.testing.assert_array_equal(got.tie_sum, twin.tie_sum)  # the same walk: exact


@pytest.mark.parametrize("value_type", [np.float32, np.float64])
@pytest.mark.parametrize("index_type", [np.int32, np.int64])
@pytest.mark.parametrize("reference", [-1, 2])
def test_csc_on_threads(device, monkeypatch, value_type, index_type, reference):
    # 300 genes: two blocks of 256 threads; a block budget of 2,000 values: several gene runs
    x = _values(60, 300, value_type, seed=1)
    codes = _codes(60, seed=2)
    if reference < 0:
        codes[codes < 0] = N_GROUPS - 1  # against the rest every cell is ranked
    m = sparse.csc_matrix(x)
    m.indices, m.indptr = m.indices.astype(index_type), m.indptr.astype(index_type)
    codes, group_size = rank_genes._setup(codes, 60, N_GROUPS, reference)
    monkeypatch.setattr(rank_genes, "DEVICE_BLOCK_VALUES", 2000)
    got = rank_genes.rank_sums_csc_device(_on_device(m), codes, group_size, reference)
    _check(got, x, codes, reference)
    assert len(device) > 1 and {name for name, *_ in device} == {
        cuda.template_name("rank_sums", value_type)}


@pytest.mark.parametrize("reference", [-1, 1])
def test_dense_on_threads(device, monkeypatch, reference):
    x = _values(50, 70, np.float32, seed=3)
    codes = _codes(50, seed=4)
    codes, group_size = rank_genes._setup(codes, 50, N_GROUPS, reference)
    monkeypatch.setattr(rank_genes, "DEVICE_BLOCK_VALUES", 50 * 30)  # blocks of 30 genes
    got = rank_genes.rank_sums_dense_device(x, codes, group_size, reference)
    _check(got, x, codes, reference)
    assert len(device) == 3


def test_every_value_tied_on_threads(device):
    """One value everywhere: one tie block (and the zero block) per gene; a gene without a
    non-zero value; a group without cells."""
    x = np.zeros((40, 5), np.float32)
    x[::2, 1] = 1.5
    x[:, 2] = -1.0
    codes = np.tile(np.array([0, 1, 3, 0], np.int32), 10)  # group 2 has no cells
    codes, group_size = rank_genes._setup(codes, 40, N_GROUPS, -1)
    got = rank_genes.rank_sums_csc_device(_on_device(sparse.csc_matrix(x)), codes, group_size, -1)
    _check(got, x, codes, -1)


def test_gene_blocks():
    indptr = np.array([0, 5, 5, 30, 31, 40, 41])
    assert rank_genes.gene_blocks(indptr, 10) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert rank_genes.gene_blocks(indptr, 100, most_genes=4) == [(0, 4), (4, 6)]
