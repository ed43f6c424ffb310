"""highly_variable_genes(flavor="poisson_gene_selection") against a plain-numpy reference.

The flavor is scvi-tools' poisson_gene_selection (not in scanpy) with its Monte Carlo
probability replaced by the exact one, so the oracle is written here from the definition:
per batch, the dense ``exp(-outer(scaled_means, totals))`` mean over cells, the exact
``observed * (1 - expected)``, and scvi's merge (argsort ranks, medians, ``nlargest``) with
pandas itself. Tolerances: float64 statistics allclose rtol 1e-10; ranks, nbatches and the
highly_variable set identical. Ties: genes with the same count sum and expressed cells in a
batch have bitwise-equal statistics on both sides (the stable sort then ranks them by gene
order on both), and no two genes' probabilities lie within 1e-10 of each other otherwise on
these data sets (checked in ``assert_same``), so no tie is excused.

scvi-tools itself (torch) is not a dependency; compared by hand with scvi-tools 1.4.2 on
pbmc3k (n_samples=10000, n_top_genes=2000): fractions of zeros within 3.5e-7 (scvi computes
in float32), probabilities within Monte Carlo noise (0.20% of genes beyond 3 sd), 1974 of
2000 genes shared, the others all within 110 ranks of the cut-off.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import gpusc
from _compare import adata_of, dense
from conftest import read_real, synthetic_counts
from gpusc._kernels.hvg import poisson_expected_zeros

RTOL = 1e-10
STATS = ("observed_fraction_zeros", "expected_fraction_zeros", "prob_zero_enrichment")
FLAVOR = "poisson_gene_selection"


def reference(x, batches, var_names, n_top_genes) -> pd.DataFrame:
    """scvi's poisson_gene_selection from its definition, with the exact probability."""
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)
    batches = np.zeros(x.shape[0], int) if batches is None else np.asarray(batches)
    obs, exp, prob = [], [], []
    for b in np.unique(batches):
        xb = x[batches == b]
        sum_0 = xb.sum(axis=0)
        scaled_means = sum_0 / sum_0.sum()
        total_counts = xb.sum(axis=1)
        observed = 1.0 - (xb > 0).sum(axis=0) / xb.shape[0]
        expected = np.exp(-np.outer(scaled_means, total_counts)).mean(axis=1)
        obs.append(observed)
        exp.append(expected)
        prob.append(observed * (1.0 - expected))  # P(Bern(observed) > Bern(expected))
    obs, exp, prob = np.array(obs), np.array(exp), np.array(prob)
    ranks = prob.argsort(axis=1, kind="stable").argsort(axis=1)
    df = pd.DataFrame(index=pd.Index(var_names))
    df["observed_fraction_zeros"] = np.median(obs, axis=0)
    df["expected_fraction_zeros"] = np.median(exp, axis=0)
    df["prob_zero_enriched_nbatches"] = np.sum(ranks >= x.shape[1] - n_top_genes, axis=0)
    df["prob_zero_enrichment"] = np.median(prob, axis=0)
    df["prob_zero_enrichment_rank"] = np.median(ranks, axis=0)
    df["highly_variable"] = False
    top = df.nlargest(n_top_genes, ["prob_zero_enriched_nbatches", "prob_zero_enrichment_rank"])
    df.loc[top.index, "highly_variable"] = True
    return df


def assert_same(got: pd.DataFrame, expected: pd.DataFrame):
    pd.testing.assert_index_equal(got.index, expected.index)
    assert list(got.columns) == list(expected.columns)
    for col in expected.columns:
        g, e = got[col].to_numpy(), expected[col].to_numpy()
        if col in STATS:
            assert g.dtype == np.float64, col
            np.testing.assert_allclose(g, e, rtol=RTOL, atol=1e-15, err_msg=col)
        else:
            assert g.dtype == e.dtype, (col, g.dtype, e.dtype)
            np.testing.assert_array_equal(g, e, err_msg=col)
    # no near-ties that rounding could flip: distinct probabilities are > 1e-10 apart
    p = np.sort(expected["prob_zero_enrichment"].to_numpy())
    gap = np.diff(p)
    assert not ((gap > 0) & (gap <= 1e-10 * p[1:])).any()


def _ours(adata, **kwargs):
    return gpusc.pp.highly_variable_genes(adata, flavor=FLAVOR, inplace=False, **kwargs)


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def pbmc():
    return read_real("pbmc3k_counts_labeled.h5ad")


@pytest.fixture(scope="module")
def kang():
    return read_real("kang2018_pbmc_ctrl_stim_2000.h5ad")


def test_pbmc3k_inplace(pbmc):
    expected = reference(pbmc.X, None, pbmc.var_names, 2000)
    test = pbmc.copy()
    gpusc.pp.highly_variable_genes(test, flavor=FLAVOR, n_top_genes=2000)
    # scvi writes every column in place, prob_zero_enriched_nbatches without batches too
    assert list(test.var.columns) == ["highly_variable", "observed_fraction_zeros",
                                      "expected_fraction_zeros", "prob_zero_enriched_nbatches",
                                      "prob_zero_enrichment", "prob_zero_enrichment_rank"]
    assert_same(test.var[expected.columns], expected)
    assert test.uns["hvg"] == {"flavor": "poisson_zeros"}
    assert test.var["highly_variable"].sum() == 2000
    got = _ours(pbmc.copy(), n_top_genes=2000)  # a copy: never write into the module's AnnData
    assert_same(got, expected.drop(columns="prob_zero_enriched_nbatches"))


def test_kang_batches(kang):
    expected = reference(kang.X, kang.obs["stim"], kang.var_names, 1000)
    got = _ours(kang.copy(), n_top_genes=1000, batch_key="stim")  # never the module's AnnData
    assert_same(got, expected)
    # a real merge: genes among the top in one batch only, and in both
    assert set(got["prob_zero_enriched_nbatches"]) == {0, 1, 2}


def test_kang_subset_inplace(kang):
    expected = reference(kang.X, kang.obs["stim"], kang.var_names, 500)
    test = kang.copy()
    gpusc.pp.highly_variable_genes(test, flavor=FLAVOR, n_top_genes=500, batch_key="stim",
                                   subset=True)
    assert test.n_vars == 500
    assert_same(test.var[expected.columns], expected[expected["highly_variable"]])
    np.testing.assert_array_equal(test.X.toarray(), kang[:, expected["highly_variable"]].X.toarray())


# ---------------------------------------------------------------- synthetic, every array type

def _synthetic(dtype, seed=0):
    x = synthetic_counts(240, 150, dtype=dtype, density=0.15, seed=seed)  # empty rows, cols
    x[:80, [7, 60]] = 0  # genes without counts in the first batch only
    batches = np.repeat(["b", "c", "a"], [80, 100, 60])  # unsorted labels, unequal sizes
    return x, batches


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_synthetic_every_type(array_type, dtype):
    x, batches = _synthetic(dtype)
    for batch_key, n_top in ((None, 40), ("batch", 40), ("batch", 149), (None, 150)):
        expected = reference(x, batches if batch_key else None, adata_of(x).var_names, n_top)
        if batch_key is None:
            expected = expected.drop(columns="prob_zero_enriched_nbatches")
        test = adata_of(array_type(x.copy()), batches)
        assert_same(_ours(test, n_top_genes=n_top, batch_key=batch_key), expected)
        np.testing.assert_array_equal(dense(test.X), x)  # the input is left as it was


def test_n_top_genes_above_n_vars_selects_all_like_scvi():
    x, batches = _synthetic(np.float64, seed=1)
    got = _ours(adata_of(x, batches), n_top_genes=500, batch_key="batch")
    assert got["highly_variable"].all()
    assert (got["prob_zero_enriched_nbatches"] == 3).all()  # scvi's threshold n_vars - 500 < 0
    assert_same(got, reference(x, batches, got.index, 500))


def test_default_n_top_genes_warns():
    x = synthetic_counts(300, 2500, density=0.05, seed=2)
    with pytest.warns(UserWarning, match="defaulting to 2000"):
        got = _ours(adata_of(x))
    assert got["highly_variable"].sum() == 2000


def test_layer_and_integer_counts():
    x, batches = _synthetic(np.float64, seed=3)
    adata = adata_of(np.zeros_like(x), batches)
    adata.layers["counts"] = sparse.csr_matrix(x.astype(np.int64))
    got = _ours(adata, n_top_genes=30, batch_key="batch", layer="counts")
    assert_same(got, reference(x, batches, adata.var_names, 30))


def test_categorical_batches_with_unused_category():
    x, batches = _synthetic(np.float32, seed=4)
    cat = pd.Categorical(batches, categories=["c", "z", "b", "a"])  # "z" has no cells
    got = _ours(adata_of(sparse.csr_matrix(x), cat), n_top_genes=30, batch_key="batch")
    assert_same(got, reference(x, batches, got.index, 30))


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_duplicates_and_int64_indices(fmt):
    """A (cell, gene) stored twice counts once as an expressed cell; int64 indices as int32."""
    x, batches = _synthetic(np.float32, seed=5)
    expected = _ours(adata_of(sparse.csr_matrix(x), batches), n_top_genes=30, batch_key="batch")
    coo = sparse.coo_matrix(x)  # every value split in two entries (one may be 0)
    data = np.r_[coo.data - coo.data // 2, coo.data // 2]
    rows, cols = np.r_[coo.row, coo.row], np.r_[coo.col, coo.col]
    major, minor = (rows, cols) if fmt == "csr" else (cols, rows)
    order = np.argsort(major, kind="stable")
    indptr = np.r_[0, np.cumsum(np.bincount(major, minlength=x.shape[fmt == "csc"]))]
    cls = sparse.csr_matrix if fmt == "csr" else sparse.csc_matrix
    dup = cls((data[order], minor[order].astype(np.int64), indptr.astype(np.int64)), shape=x.shape)
    assert not dup.has_canonical_format
    got = _ours(adata_of(dup, batches), n_top_genes=30, batch_key="batch")
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12)
    assert not dup.has_canonical_format  # summed on a copy


def test_deterministic():
    x, batches = _synthetic(np.float32, seed=6)
    adata = adata_of(sparse.csr_matrix(x), batches)
    pd.testing.assert_frame_equal(_ours(adata, n_top_genes=30, batch_key="batch"),
                                  _ours(adata, n_top_genes=30, batch_key="batch"), check_exact=True)


# ---------------------------------------------------------------- the expected-zeros loop

def test_expected_zeros_matches_outer_product():
    """Grouped distinct totals (non-integer ones too) equal the per-cell mean of exp."""
    rng = np.random.default_rng(7)
    scaled = rng.dirichlet(np.ones(50), size=2)  # (2 batches, 50 genes)
    cells = [rng.integers(0, 40, 300).astype(np.float64) * 25, rng.random(120) * 900]
    totals, weights, start = [], [], [0]
    for t in cells:
        values, counts = np.unique(t, return_counts=True)
        totals.append(values)
        weights.append(counts.astype(np.float64))
        start.append(start[-1] + values.size)
    got = poisson_expected_zeros(scaled, np.concatenate(totals), np.concatenate(weights),
                                 np.array(start))
    expected = np.stack([np.exp(-np.outer(scaled[b], cells[b])).mean(axis=1) for b in range(2)])
    np.testing.assert_allclose(got, expected, rtol=1e-13)


def test_exact_probability_is_what_scvi_samples():
    """scvi counts observed > expected over n_samples pairs of independent Bernoulli draws;
    that estimate stays within 5 standard deviations of observed * (1 - expected)."""
    x, _ = _synthetic(np.float64, seed=8)
    got = _ours(adata_of(x), n_top_genes=30)
    p_obs = got["observed_fraction_zeros"].to_numpy()
    p_exp = got["expected_fraction_zeros"].to_numpy()
    rng = np.random.default_rng(0)
    n_samples = 10000
    hits = np.zeros(p_obs.size)
    for _ in range(10):  # 10 x 1000 draws of both
        draws = rng.random((2, n_samples // 10, p_obs.size))
        hits += ((draws[0] < p_obs) > (draws[1] < p_exp)).sum(axis=0)
    p = got["prob_zero_enrichment"].to_numpy()
    sd = np.sqrt(p * (1 - p) / n_samples)
    assert np.all(np.abs(hits / n_samples - p) <= 5 * sd + 1e-12)


# ---------------------------------------------------------------- errors

def _assert_unchanged(adata, before):
    assert adata.var.equals(before.var) and list(adata.var.columns) == list(before.var.columns)
    assert set(adata.uns) == set(before.uns)
    assert adata.shape == before.shape
    np.testing.assert_array_equal(dense(adata.X), dense(before.X))


def _bad(kind):
    x, batches = _synthetic(np.float32, seed=9)
    if kind == "negative":
        x[np.nonzero(x)[0][0], np.nonzero(x)[1][0]] = -1
    elif kind == "nan":
        x[3, 4] = np.nan
    elif kind == "fraction":
        x[np.nonzero(x)[0][0], np.nonzero(x)[1][0]] = 0.5
    elif kind == "empty_batch":
        x[batches == "c"] = 0
    elif kind == "no_counts":
        x[:] = 0
    return adata_of(sparse.csr_matrix(x), batches)


@pytest.mark.parametrize(("kind", "kwargs", "exc", "match"), [
    ("ok", {"batch_key": "nope"}, KeyError, "nope"),
    ("ok", {"layer": "nope"}, KeyError, "nope"),
    ("ok", {"n_top_genes": 0}, ValueError, "positive integer"),
    ("ok", {"n_top_genes": 2.5}, ValueError, "positive integer"),
    ("negative", {}, ValueError, "negative"),
    ("nan", {}, ValueError, "NaN"),
    ("fraction", {}, ValueError, "non-integer"),
    ("empty_batch", {"batch_key": "batch"}, ValueError, r"batches \['c'\]"),
    ("no_counts", {}, ValueError, "only zeros"),
])
def test_errors_leave_adata_unchanged(kind, kwargs, exc, match):
    adata = _bad(kind)
    before = adata.copy()
    kwargs = {"n_top_genes": 20, **kwargs}
    with pytest.raises(exc, match=match):
        gpusc.pp.highly_variable_genes(adata, flavor=FLAVOR, **kwargs)
    _assert_unchanged(adata, before)


def test_empty_matrix_raises():
    adata = adata_of(np.zeros((0, 5), np.float32))
    with pytest.raises(ValueError, match="empty"):
        gpusc.pp.highly_variable_genes(adata, flavor=FLAVOR, n_top_genes=2)


def test_non_integers_with_check_values_false():
    """The values as they are: the distinct totals are then not integers, same definition."""
    x, batches = _synthetic(np.float64, seed=10)
    x[x > 0] += 0.25
    got = _ours(adata_of(x, batches), n_top_genes=30, batch_key="batch", check_values=False)
    assert_same(got, reference(x, batches, got.index, 30))


def test_inplace_false_and_subset_leave_adata():
    x, batches = _synthetic(np.float32, seed=11)
    adata = adata_of(sparse.csr_matrix(x), batches)
    before = adata.copy()
    got = _ours(adata, n_top_genes=30, batch_key="batch", subset=True)
    assert len(got) == 30 and got["highly_variable"].all()
    _assert_unchanged(adata, before)
