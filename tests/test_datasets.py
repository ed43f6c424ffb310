"""gpusc.datasets: the synthetic generator and model-based resampling of real data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import read_only, read_real
from scipy import sparse

from gpusc import datasets
from gpusc.datasets._sampler import sample_nb_csr


def _is_counts_csr(X) -> None:
    assert isinstance(X, sparse.csr_matrix)
    assert X.dtype == np.float32
    assert X.has_sorted_indices
    assert np.all(X.data > 0)
    np.testing.assert_array_equal(X.data, np.round(X.data))


def _same(a, b) -> bool:
    return (
        a.shape == b.shape
        and np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
        and np.array_equal(a.data, b.data)
    )


@pytest.fixture(scope="module")
def small():
    return datasets.synthetic(3_000, 1_000, seed=1)


@pytest.fixture(scope="module")
def pbmc():
    return read_only(read_real("pbmc3k_counts_labeled.h5ad"))  # shared: resample must not write into it


@pytest.fixture(scope="module")
def pbmc_resampled(pbmc):
    return datasets.resample(pbmc, 6_000, groupby="seurat_cell_type", seed=3)


# --- the sampler ---------------------------------------------------------------------


@pytest.mark.parametrize("lib", [0.5, 40.0, 3000.0])
def test_sampler_moments_match_negative_binomial(lib):
    n = 40_000
    f = np.array([[0.4, 0.1, 0.01, 1e-3, 0.0, 0.489]])
    phi = np.array([[0.5, 0.1, 1.0, 5.0, 1.0, 0.01]])
    X = sample_nb_csr(np.zeros(n), np.full(n, lib), f, phi, 6, seed_key=7).toarray().astype(np.float64)
    mu = lib * f[0]
    var = mu + phi[0] * mu**2
    assert np.all(np.abs(X.mean(0) - mu) <= 5 * np.sqrt(var / n) + 1e-12)
    p0 = (1 + phi[0] * mu) ** (-1 / phi[0])
    assert np.all(np.abs((X == 0).mean(0) - p0) <= 5 * np.sqrt(p0 * (1 - p0) / n) + 1e-12)
    assert (X[:, 4] == 0).all()


def test_sampler_independent_of_thread_count():
    import numba

    f = np.full((2, 300), 1 / 300)
    phi = np.full((2, 300), 0.3)
    groups = np.arange(500) % 2
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = sample_nb_csr(groups, np.full(500, 200.0), f, phi, 300, seed_key=5)
    finally:
        numba.set_num_threads(before)
    assert _same(one, sample_nb_csr(groups, np.full(500, 200.0), f, phi, 300, seed_key=5))


# --- synthetic -----------------------------------------------------------------------


def test_synthetic_shape_and_types(small):
    assert small.shape == (3_000, 1_000)
    _is_counts_csr(small.X)
    assert isinstance(small.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert small.var_names.is_unique and small.obs_names.is_unique
    assert small.var_names[0] == "GENE0001"


def test_synthetic_cell_types_present():
    adata = datasets.synthetic(4_000, 800, n_types=5, seed=2)
    counts = adata.obs["cell_type"].value_counts()
    assert set(counts.index) == {f"type{t}" for t in range(5)}
    assert (counts > 100).all()


def test_synthetic_cell_types_differ_on_their_markers(small):
    X = small.X.toarray()
    marker_of = small.var["marker_of"].to_numpy()
    for t in small.obs["cell_type"].cat.categories[:3]:
        markers = marker_of == t
        inside = X[(small.obs["cell_type"] == t).to_numpy()][:, markers].mean()
        outside = X[(small.obs["cell_type"] != t).to_numpy()][:, markers].mean()
        assert inside > 2 * outside


def test_synthetic_mito_genes(small):
    mt = small.var["mt"].to_numpy()
    assert mt.dtype == bool and mt.sum() == 13
    np.testing.assert_array_equal(mt, small.var_names.str.startswith("MT-"))
    assert "MT-ND1" in small.var_names
    X = small.X
    fraction = X[:, mt].sum() / X.sum()
    assert 0.005 < fraction < 0.02  # asked 0.01


def test_synthetic_mito_fraction_follows_argument():
    adata = datasets.synthetic(2_000, 1_000, mito_fraction=0.1, seed=4)
    mt = adata.var["mt"].to_numpy()
    assert 0.08 < adata.X[:, mt].sum() / adata.X.sum() < 0.12


@pytest.mark.parametrize("density", [0.02, 0.05, 0.2])
def test_synthetic_density(density):
    adata = datasets.synthetic(2_000, 2_000, density=density, seed=0)
    realised = adata.X.nnz / (adata.n_obs * adata.n_vars)
    assert realised == pytest.approx(density, rel=0.1)


def test_synthetic_deterministic(small):
    again = datasets.synthetic(3_000, 1_000, seed=1)
    assert _same(small.X, again.X)
    np.testing.assert_array_equal(small.obs["cell_type"], again.obs["cell_type"])
    other = datasets.synthetic(3_000, 1_000, seed=2)
    assert not _same(small.X, other.X)


def test_synthetic_library_sizes_spread(small):
    totals = np.asarray(small.X.sum(axis=1)).ravel()
    assert totals.min() > 0
    assert 0.3 < np.std(np.log(totals)) < 0.9  # log-normal with sigma 0.5 plus NB noise


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="density"):
        datasets.synthetic(10, 100, density=1.5)
    with pytest.raises(ValueError, match="mito_fraction"):
        datasets.synthetic(10, 100, mito_fraction=1.0)


# --- resample ------------------------------------------------------------------------


def test_resample_shape_and_types(pbmc, pbmc_resampled):
    new = pbmc_resampled
    assert new.shape == (6_000, pbmc.n_vars)
    _is_counts_csr(new.X)
    assert list(new.var_names) == list(pbmc.var_names)
    assert new.var["mt"].dtype == bool
    np.testing.assert_array_equal(new.var["mt"], pbmc.var_names.str.startswith("MT-"))
    info = new.uns["gpusc_resample"]
    assert info["source_shape"] == [pbmc.n_obs, pbmc.n_vars]
    assert info["groupby"] == "seurat_cell_type" and info["seed"] == 3


def test_resample_group_proportions(pbmc, pbmc_resampled):
    source = pbmc.obs["seurat_cell_type"].value_counts(normalize=True)
    drawn = pbmc_resampled.obs["seurat_cell_type"].value_counts(normalize=True)
    assert list(pbmc_resampled.obs["seurat_cell_type"].cat.categories) == list(
        pbmc.obs["seurat_cell_type"].cat.categories
    )
    np.testing.assert_allclose(drawn[source.index], source, atol=1e-3)


def test_resample_gene_means_follow_source(pbmc, pbmc_resampled):
    source = np.log1p(np.asarray(pbmc.X.mean(axis=0)).ravel())
    drawn = np.log1p(np.asarray(pbmc_resampled.X.mean(axis=0)).ravel())
    assert np.corrcoef(source, drawn)[0, 1] > 0.95
    # and per group: the B cells' means follow the real B cells'
    real_b = pbmc[pbmc.obs["seurat_cell_type"] == "B"].X
    new_b = pbmc_resampled[pbmc_resampled.obs["seurat_cell_type"] == "B"].X
    r = np.corrcoef(np.log1p(np.asarray(real_b.mean(0)).ravel()), np.log1p(np.asarray(new_b.mean(0)).ravel()))
    assert r[0, 1] > 0.9


def test_resample_library_sizes_follow_source(pbmc, pbmc_resampled):
    real = np.median(np.asarray(pbmc.X.sum(axis=1)).ravel())
    drawn = np.median(np.asarray(pbmc_resampled.X.sum(axis=1)).ravel())
    assert drawn == pytest.approx(real, rel=0.1)


def test_resample_cells_are_not_copies(pbmc, pbmc_resampled):
    real = pbmc.X.tocsr()
    real_rows = {(tuple(real[i].indices), tuple(real[i].data)) for i in range(real.shape[0])}
    new = pbmc_resampled.X
    for i in range(0, 600):
        row = new[i]
        assert (tuple(row.indices), tuple(row.data)) not in real_rows


def test_resample_deterministic(pbmc, pbmc_resampled):
    again = datasets.resample(pbmc, 6_000, groupby="seurat_cell_type", seed=3)
    assert _same(again.X, pbmc_resampled.X)
    np.testing.assert_array_equal(again.obs["seurat_cell_type"], pbmc_resampled.obs["seurat_cell_type"])
    other = datasets.resample(pbmc, 6_000, groupby="seurat_cell_type", seed=4)
    assert not _same(other.X, pbmc_resampled.X)


def test_resample_drops_missing_labels(pbmc):
    # louvain is NaN for cells outside the processed tutorial set
    assert pbmc.obs["louvain"].isna().any()
    new = datasets.resample(pbmc, 1_000, groupby="louvain", seed=0)
    assert not new.obs["louvain"].isna().any()
    assert new.shape == (1_000, pbmc.n_vars)


def test_resample_without_groupby(pbmc):
    new = datasets.resample(pbmc, 500, seed=0)
    assert new.shape == (500, pbmc.n_vars)
    assert new.uns["gpusc_resample"]["groupby"] == ""
    _is_counts_csr(new.X)


def test_resample_from_layer(pbmc):
    adata = pbmc[:300].copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.multiply(0.5).tocsr()  # not counts any more
    with pytest.raises(ValueError, match="counts"):
        datasets.resample(adata, 100)
    new = datasets.resample(adata, 100, layer="counts")
    _is_counts_csr(new.X)


def test_resample_bad_groupby_is_keyerror(pbmc):
    with pytest.raises(KeyError, match="not_a_column"):
        datasets.resample(pbmc, 100, groupby="not_a_column")


def test_resample_all_groups_empty_is_keyerror(pbmc):
    adata = pbmc[:200].copy()
    adata.obs["empty"] = pd.Categorical([np.nan] * adata.n_obs, categories=["a", "b"])
    with pytest.raises(KeyError, match="empty"):
        datasets.resample(adata, 100, groupby="empty")


def test_resample_missing_layer_is_keyerror(pbmc):
    with pytest.raises(KeyError, match="nope"):
        datasets.resample(pbmc, 10, layer="nope")


def test_resample_empty_category_is_skipped(pbmc):
    adata = pbmc[:500].copy()
    adata.obs["grp"] = pd.Categorical(
        np.where(np.arange(500) % 2, "x", "y"), categories=["x", "y", "unused"]
    )
    new = datasets.resample(adata, 400, groupby="grp")
    counts = new.obs["grp"].value_counts()
    assert counts["unused"] == 0 and counts["x"] == 200 and counts["y"] == 200
