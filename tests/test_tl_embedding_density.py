"""tl.embedding_density against scanpy 1.12's (scipy.stats.gaussian_kde at every cell, scaled
to [0, 1] per category): pbmc3k's PCA (1,500 cells, by cell type) and seeded synthetic
embeddings, float32 and float64. Equal within rtol 1e-5 (measured: ~1e-13)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from anndata import AnnData

import gpusc


def _check(ours, ref, key):
    assert key in ours.obs and ours.obs[key].dtype == ref.obs[key].dtype == np.float64
    np.testing.assert_allclose(ours.obs[key], ref.obs[key], rtol=1e-5, atol=0)
    assert ours.uns[f"{key}_params"] == ref.uns[f"{key}_params"]


def test_pbmc3k_pca_by_cell_type(pbmc_graph):
    ref, ours = pbmc_graph.copy(), pbmc_graph.copy()
    groupby = "seurat_cell_type" if "seurat_cell_type" in ref.obs else None
    sc.tl.embedding_density(ref, "pca", groupby=groupby, components="1,2")
    gpusc.tl.embedding_density(ours, "pca", groupby=groupby, components="1,2", device="cpu")
    _check(ours, ref, "pca_density" + (f"_{groupby}" if groupby else ""))


def _embedding(n, dtype, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(5, 3))
    x = centres[rng.integers(0, 5, n)] + rng.normal(size=(n, 3)) * [1.0, 0.3, 2.0]
    adata = AnnData(obsm={"X_umap": x.astype(dtype), "X_diffmap": x.astype(dtype)})
    adata.obs["batch"] = pd.Categorical(rng.choice(["b1", "b2", "b3"], n))
    return adata


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("groupby", [None, "batch"])
def test_synthetic_as_scanpy(dtype, groupby):
    adata = _embedding(2000, dtype, seed=1)
    ref, ours = adata.copy(), adata.copy()
    sc.tl.embedding_density(ref, groupby=groupby)
    gpusc.tl.embedding_density(ours, groupby=groupby, device="cpu")
    _check(ours, ref, "umap_density" + (f"_{groupby}" if groupby else ""))


def test_options_as_scanpy():
    """diffmap's shifted components, a component list, key_added, a string column (made
    categorical, as scanpy), a missing label (density 0)."""
    adata = _embedding(600, np.float32, seed=2)
    adata.obs["label"] = np.asarray(adata.obs["batch"]).astype(object)
    adata.obs.loc[adata.obs_names[:5], "batch"] = np.nan
    for kwargs in ({"basis": "diffmap", "components": ["1", "2"]},
                   {"basis": "UMAP", "components": "2,3", "key_added": "dens"},
                   {"basis": "umap", "groupby": "label"},
                   {"basis": "umap", "groupby": "batch"}):
        ref, ours = adata.copy(), adata.copy()
        sc.tl.embedding_density(ref, **kwargs)
        gpusc.tl.embedding_density(ours, **kwargs, device="cpu")
        key = kwargs.get("key_added") or (f"{kwargs['basis'].lower()}_density"
                                          + (f"_{kwargs['groupby']}" if "groupby" in kwargs else ""))
        _check(ours, ref, key)
        assert ours.obs["label"].dtype == ref.obs["label"].dtype
    assert (ours.obs["umap_density_batch"][:5] == 0).all()


def test_deterministic():
    adata = _embedding(800, np.float64, seed=3)
    a, b = adata.copy(), adata.copy()
    gpusc.tl.embedding_density(a, device="cpu")
    gpusc.tl.embedding_density(b, device="cpu")
    np.testing.assert_array_equal(a.obs["umap_density"], b.obs["umap_density"])


def _unchanged(adata):
    return list(adata.obs.columns), list(adata.uns)


@pytest.mark.parametrize(("kwargs", "error", "scanpy_message"), [
    ({"basis": "tsne"}, ValueError, "Cannot find the embedded representation `adata.obsm['X_tsne']`"),
    ({"groupby": "nope"}, ValueError, "Could not find 'nope' `.obs` column."),
    ({"groupby": "n"}, ValueError, "'n' column does not contain categorical data"),
    ({"components": "1,2,3"}, ValueError, "Please specify exactly 2 components, or `None`."),
    ({"groupby": "tiny"}, ValueError, "Number of dimensions is greater than number of samples"),
    ({"groupby": "line"}, np.linalg.LinAlgError, "lower-dimensional subspace"),
])
def test_bad_input_as_scanpy(kwargs, error, scanpy_message):
    adata = _embedding(100, np.float32, seed=4)
    adata.obs["n"] = np.arange(100)
    adata.obs["tiny"] = pd.Categorical(["a"] * 99 + ["b"])  # a group of one cell
    adata.obs["line"] = pd.Categorical(["b"] * 5 + ["a"] * 95)  # b on a line: singular covariance
    adata.obsm["X_umap"][:5, 1] = 2 * adata.obsm["X_umap"][:5, 0]
    before = _unchanged(adata)
    with pytest.raises(error, match=re.escape(scanpy_message)):
        sc.tl.embedding_density(adata.copy(), **kwargs)
    with pytest.raises(error, match=re.escape(scanpy_message)):
        gpusc.tl.embedding_density(adata, **kwargs, device="cpu")
    assert _unchanged(adata) == before


@pytest.mark.gpu
def test_device_as_scanpy():
    adata = _embedding(3000, np.float32, seed=5)
    ref, ours = adata.copy(), adata.copy()
    sc.tl.embedding_density(ref, groupby="batch")
    gpusc.tl.embedding_density(ours, groupby="batch", device="gpu")
    _check(ours, ref, "umap_density_batch")
    again = adata.copy()
    gpusc.tl.embedding_density(again, groupby="batch", device="gpu")
    np.testing.assert_array_equal(again.obs["umap_density_batch"], ours.obs["umap_density_batch"])
