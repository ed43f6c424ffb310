"""highly_variable_genes(flavor="pearson_residuals") against scanpy.experimental.pp (the oracle).

Tolerances: residual_variances / means / variances allclose with rtol 1e-5 (scanpy's own
sparse float32 path sums in float32 and differs from its dense path by ~7e-9 on kang2018);
highly_variable, highly_variable_nbatches and highly_variable_intersection identical, and
highly_variable_rank identical (NaN where scanpy has NaN). Ties: none of the compared cut-offs
falls on a near-tie; ranks among exactly equal residual variances (genes without counts in a
batch: 0.0) come from np.argsort on identical values, so they agree too (checked below with
n_top_genes above the number of expressed genes).
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import gpusc
from _compare import adata_of, to_host
from conftest import read_real, synthetic_counts
from gpusc._kernels.moments import gene_moments, pearson_residual_sums

RTOL = 1e-5
SELECTION = ("highly_variable", "highly_variable_nbatches", "highly_variable_intersection")


def _scanpy(adata, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sc.experimental.pp.highly_variable_genes(adata.copy(), flavor="pearson_residuals",
                                                        inplace=False, **kwargs)


def _ours(adata, **kwargs):
    return gpusc.pp.highly_variable_genes_pearson_residuals(adata, inplace=False, **kwargs)


def assert_same(got: pd.DataFrame, expected: pd.DataFrame):
    pd.testing.assert_index_equal(got.index, expected.index)
    assert list(got.columns) == list(expected.columns)
    assert (got.dtypes == expected.dtypes).all(), (got.dtypes, expected.dtypes)
    for col in expected.columns:
        g, e = got[col].to_numpy(), expected[col].to_numpy()
        if col in SELECTION:
            np.testing.assert_array_equal(g, e, err_msg=col)
        elif col == "highly_variable_rank":
            np.testing.assert_array_equal(g, e, err_msg=col)  # NaN == NaN here
        else:
            np.testing.assert_allclose(g, e, rtol=RTOL, atol=0, equal_nan=True, err_msg=col)


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def pbmc():
    adata = read_real("pbmc3k_counts_labeled.h5ad")
    sc.pp.filter_genes(adata, min_cells=3)
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(adata.n_vars, 2000, replace=False))
    return adata[:, keep].copy()


@pytest.fixture(scope="module")
def kang():
    return read_real("kang2018_pbmc_ctrl_stim_2000.h5ad")


@pytest.mark.parametrize("n_top_genes", [200, 1000])
def test_pbmc3k_inplace(pbmc, n_top_genes):
    ref = pbmc.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.experimental.pp.highly_variable_genes(ref, flavor="pearson_residuals",
                                                 n_top_genes=n_top_genes)
    test = pbmc.copy()
    gpusc.pp.highly_variable_genes(test, flavor="pearson_residuals", n_top_genes=n_top_genes)
    assert_same(test.var, ref.var)
    assert test.uns["hvg"] == ref.uns["hvg"] == {"flavor": "pearson_residuals",
                                                 "computed_on": "adata.X"}
    assert test.var["highly_variable"].sum() == n_top_genes


def test_kang_batches(kang):
    expected = _scanpy(kang, n_top_genes=1000, batch_key="stim")
    got = _ours(kang.copy(), n_top_genes=1000, batch_key="stim")  # never the module's AnnData
    assert_same(got, expected)
    # a real merge: genes selected in one batch only, and in both
    assert set(got["highly_variable_nbatches"]) == {0, 1, 2}


def test_kang_batches_subset_inplace(kang):
    ref, test = kang.copy(), kang.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.experimental.pp.highly_variable_genes(ref, flavor="pearson_residuals",
                                                 n_top_genes=500, batch_key="stim", subset=True)
    gpusc.pp.highly_variable_genes(test, flavor="pearson_residuals", n_top_genes=500,
                                   batch_key="stim", subset=True)
    assert test.n_vars == ref.n_vars == 500
    assert_same(test.var, ref.var)
    assert test.uns["hvg"] == ref.uns["hvg"]


# ---------------------------------------------------------------- synthetic, every array type

def _synthetic(dtype, seed=0):
    x = synthetic_counts(240, 150, dtype=dtype, density=0.15, seed=seed, empty_rows=())
    x[:80, [7, 60]] = 0  # genes without counts in the first batch only
    batches = np.repeat(["b", "c", "a"], [80, 100, 60])  # unsorted labels, unequal sizes
    return x, batches


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_synthetic_every_type(array_type, dtype):
    x, batches = _synthetic(dtype)
    for batch_key, n_top in ((None, 40), ("batch", 40), ("batch", 149)):
        expected = _scanpy(adata_of(sparse.csr_matrix(x), batches), n_top_genes=n_top,
                           batch_key=batch_key)
        test = adata_of(array_type(x.copy()), batches)
        got = _ours(test, n_top_genes=n_top, batch_key=batch_key)
        assert_same(got, expected)
        after = to_host(test.X)
        np.testing.assert_array_equal(after.toarray() if sparse.issparse(after) else after, x)


def test_theta_clip_and_layer():
    x, batches = _synthetic(np.float64, seed=1)
    ref = adata_of(np.zeros_like(x), batches)
    ref.layers["counts"] = sparse.csr_matrix(x)
    for kwargs in ({"theta": 5.0, "clip": 3.0}, {"theta": 1000.0, "clip": 1.5},
                   {"theta": 50, "clip": np.inf}):
        expected = _scanpy(ref, n_top_genes=30, batch_key="batch", layer="counts", **kwargs)
        got = _ours(ref, n_top_genes=30, batch_key="batch", layer="counts", **kwargs)
        assert_same(got, expected)
    test = ref.copy()
    gpusc.pp.highly_variable_genes_pearson_residuals(test, n_top_genes=30, layer="counts")
    assert test.uns["hvg"] == {"flavor": "pearson_residuals", "computed_on": "counts"}


def test_exact_ties_with_tight_clip():
    """clip=0.5: many genes have every residual at ±clip, so equal variances (exact ties in
    exact arithmetic, 1e-16 apart in float). The selection matches scanpy; ranks differ only
    inside tie groups (14 of 150 genes on this seed), never for an untied gene."""
    x, batches = _synthetic(np.float64, seed=1)
    adata = adata_of(sparse.csr_matrix(x), batches)
    kwargs = {"n_top_genes": 30, "batch_key": "batch", "theta": 1000.0, "clip": 0.5}
    expected, got = _scanpy(adata, **kwargs), _ours(adata, **kwargs)
    for col in SELECTION:
        np.testing.assert_array_equal(got[col], expected[col], err_msg=col)
    np.testing.assert_allclose(got["residual_variances"], expected["residual_variances"], rtol=RTOL)
    codes = np.unique(batches, return_inverse=True)[1].astype(np.int32)
    gene_sums = gene_moments(x, codes, 3).sum
    s, s2 = pearson_residual_sums(x, codes, 3, gene_sums, theta=1000.0, clip=0.5)
    n = np.bincount(codes)[:, None]
    var = s2 / n - (s / n) ** 2
    tied = np.zeros(x.shape[1], bool)
    for v in var:  # genes with another gene within 1e-12 (relative) in some batch
        order = np.argsort(v)
        close = np.abs(np.diff(v[order])) <= 1e-12 * np.abs(v[order][1:])
        tied[order[1:][close]] = tied[order[:-1][close]] = True
    rank_g, rank_e = got["highly_variable_rank"].to_numpy(), expected["highly_variable_rank"].to_numpy()
    differ = ~((rank_g == rank_e) | (np.isnan(rank_g) & np.isnan(rank_e)))
    assert differ.sum() <= 14 and not (differ & ~tied).any(), np.flatnonzero(differ & ~tied)


def test_clip_none_uses_first_sorted_batch():
    # batches "a" (60 cells) sorts first: clip = sqrt(60) for every batch, as scanpy
    x, batches = _synthetic(np.float64, seed=2)
    adata = adata_of(sparse.csr_matrix(x), pd.Categorical(batches, categories=["c", "b", "a"]))
    got = _ours(adata, n_top_genes=40, batch_key="batch")
    assert_same(got, _scanpy(adata, n_top_genes=40, batch_key="batch"))
    explicit = _ours(adata, n_top_genes=40, batch_key="batch", clip=np.sqrt(60))
    np.testing.assert_array_equal(got["residual_variances"], explicit["residual_variances"])


def test_cell_without_counts_gives_nan_like_scanpy():
    x, _ = _synthetic(np.float64, seed=3)
    x[5] = 0
    adata = adata_of(sparse.csr_matrix(x))
    expected = _scanpy(adata, n_top_genes=20)
    # NaN for every gene with counts (genes without counts are left out: 0)
    np.testing.assert_array_equal(expected["residual_variances"].isna(), x.sum(axis=0) != 0)
    assert_same(_ours(adata, n_top_genes=20), expected)


def test_integer_counts():
    x, batches = _synthetic(np.float64, seed=4)
    adata = adata_of(x.astype(np.int64), batches)
    assert_same(_ours(adata, n_top_genes=25, batch_key="batch"),
                _scanpy(adata, n_top_genes=25, batch_key="batch"))


def test_residual_sums_against_dense_residuals(host_type):
    """The kernels' sums equal those of the explicit residual matrix; duplicates, unsorted."""
    x, batches = _synthetic(np.float64, seed=5)
    codes = np.unique(batches, return_inverse=True)[1].astype(np.int32)
    theta, clip = 100.0, 4.0
    gene_sums = np.stack([x[codes == b].sum(axis=0) for b in range(3)])
    expected_sum, expected_sq = np.zeros((3, x.shape[1])), np.zeros((3, x.shape[1]))
    for b in range(3):
        xb = x[codes == b]
        keep = gene_sums[b] != 0
        mu = np.outer(xb.sum(axis=1), gene_sums[b, keep]) / gene_sums[b].sum()
        r = np.clip((xb[:, keep] - mu) / np.sqrt(mu + mu**2 / theta), -clip, clip)
        expected_sum[b, keep], expected_sq[b, keep] = r.sum(axis=0), (r**2).sum(axis=0)
    mat = host_type(x)
    if sparse.issparse(mat):  # split every stored value in two and shuffle the order
        coo = sparse.coo_matrix(x)
        order = np.random.default_rng(0).permutation(2 * coo.nnz)
        rows, cols = np.r_[coo.row, coo.row][order], np.r_[coo.col, coo.col][order]
        data = np.r_[coo.data - coo.data // 2, coo.data // 2][order]
        major, minor = (rows, cols) if mat.format == "csr" else (cols, rows)
        by_major = np.argsort(major, kind="stable")  # shuffled order within each line
        indptr = np.r_[0, np.cumsum(np.bincount(major, minlength=x.shape[mat.format == "csc"]))]
        mat = type(mat)((data[by_major], minor[by_major].astype(np.int32), indptr), shape=x.shape)
        assert not mat.has_canonical_format
    got_sum, got_sq = pearson_residual_sums(mat, codes, 3, gene_sums, theta=theta, clip=clip)
    np.testing.assert_allclose(got_sum, expected_sum, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(got_sq, expected_sq, rtol=1e-10, atol=1e-9)
    np.testing.assert_array_equal(gene_moments(x, codes, 3).sum, gene_sums)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_int64_indices_match_int32(fmt):
    x, batches = _synthetic(np.float32, seed=11)
    small = sparse.csr_matrix(x) if fmt == "csr" else sparse.csc_matrix(x)
    large = small.copy()
    large.indices, large.indptr = large.indices.astype(np.int64), large.indptr.astype(np.int64)
    a, b = _ours(adata_of(small, batches), n_top_genes=30, batch_key="batch"), _ours(
        adata_of(large, batches), n_top_genes=30, batch_key="batch")
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_subset_and_inplace_false_leave_adata():
    x, batches = _synthetic(np.float32, seed=6)
    adata = adata_of(sparse.csr_matrix(x), batches)
    before = adata.copy()
    expected = _scanpy(adata, n_top_genes=30, batch_key="batch", subset=True)
    got = _ours(adata, n_top_genes=30, batch_key="batch", subset=True)
    assert len(got) == 30
    assert_same(got, expected)
    _assert_unchanged(adata, before)


def test_default_flavor_dispatch_and_signature():
    x, _ = _synthetic(np.float32, seed=7)
    adata = adata_of(sparse.csr_matrix(x))
    got = gpusc.pp.highly_variable_genes(adata, flavor="pearson_residuals", n_top_genes=30,
                                         inplace=False)
    assert_same(got, _scanpy(adata, n_top_genes=30))
    ours = inspect.signature(gpusc.pp.highly_variable_genes_pearson_residuals).parameters
    theirs = inspect.signature(sc.experimental.pp.highly_variable_genes).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default and ours[name].kind == p.kind, name


# ---------------------------------------------------------------- errors and warnings

def _assert_unchanged(adata, before):
    assert adata.var.equals(before.var) and list(adata.var.columns) == list(before.var.columns)
    assert set(adata.uns) == set(before.uns)
    assert adata.shape == before.shape
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"n_top_genes": None}, ValueError, "requires the argument `n_top_genes`"),
    ({"batch_key": "nope"}, KeyError, "nope"),
    ({"layer": "nope"}, KeyError, "nope"),
    ({"theta": 0}, ValueError, "theta > 0"),
    ({"clip": -1.0}, ValueError, "clip>=0"),
    ({"flavor": "seurat"}, ValueError, "only `flavor=pearson_residuals`"),
])
def test_errors_leave_adata_unchanged(kwargs, exc, match):
    x, batches = _synthetic(np.float32, seed=8)
    adata = adata_of(sparse.csr_matrix(x), batches)
    before = adata.copy()
    kwargs = {"n_top_genes": 20, **kwargs}
    with pytest.raises(exc, match=match):
        gpusc.pp.highly_variable_genes_pearson_residuals(adata, **kwargs)
    _assert_unchanged(adata, before)
    if kwargs.get("flavor") is None and kwargs.get("theta") is None and kwargs.get("clip") is None:
        with pytest.raises(exc, match=match):  # the same through pp.highly_variable_genes
            gpusc.pp.highly_variable_genes(adata, flavor="pearson_residuals", **kwargs)
        _assert_unchanged(adata, before)


def test_errors_carry_scanpy_messages():
    # the same exception as scanpy's, with scanpy's message inside ours
    x, _ = _synthetic(np.float32, seed=8)
    adata = adata_of(sparse.csr_matrix(x))
    for kwargs, exc in (({}, ValueError), ({"n_top_genes": 5, "batch_key": "nope"}, KeyError)):
        with pytest.raises(exc) as theirs:
            sc.experimental.pp.highly_variable_genes(adata.copy(), flavor="pearson_residuals", **kwargs)
        with pytest.raises(exc) as ours:
            _ours(adata.copy(), **kwargs)
        assert str(theirs.value) in str(ours.value), (str(theirs.value), str(ours.value))


def test_nonfinite_raises():
    x, _ = _synthetic(np.float32, seed=9)
    x[3, 4] = np.nan
    adata = adata_of(sparse.csr_matrix(x))
    before = adata.copy()
    with pytest.raises(ValueError, match="NaN|inf|finite"):
        _ours(adata, n_top_genes=10)
    assert adata.var.equals(before.var)


@pytest.mark.parametrize("bad", ["fraction"])  # negative counts raise: tests/test_scanpy_checks.py
def test_check_values_warns_like_scanpy(bad):
    x, _ = _synthetic(np.float64, seed=10)
    x[np.nonzero(x)[0][0], np.nonzero(x)[1][0]] = 0.5 if bad == "fraction" else -1.0
    adata = adata_of(x)
    with pytest.warns(UserWarning, match="expects raw count data"):
        sc.experimental.pp.highly_variable_genes(adata.copy(), n_top_genes=10)
    with pytest.warns(UserWarning, match="expects raw count data"):
        _ours(adata, n_top_genes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ours(adata, n_top_genes=10, check_values=False)
    if bad == "fraction":  # well defined for non-integers: same numbers as scanpy
        assert_same(_ours(adata, n_top_genes=10, check_values=False),
                    _scanpy(adata, n_top_genes=10, check_values=False))
