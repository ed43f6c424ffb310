"""gpusc.datasets.pbmc3k: the real counts from $GPUSC_DATA, else scanpy's own downloader."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
from conftest import read_real
from scipy import sparse

from gpusc import datasets


def test_reads_the_real_counts_from_gpusc_data(data_dir, monkeypatch):
    monkeypatch.setenv("GPUSC_DATA", str(data_dir))
    monkeypatch.setattr(sc.datasets, "pbmc3k", lambda: pytest.fail("downloaded although $GPUSC_DATA has the file"))
    adata = datasets.pbmc3k()
    expected = read_real("pbmc3k_counts_labeled.h5ad")
    assert adata.shape == (2700, 13714)
    assert isinstance(adata.X, sparse.csr_matrix) and adata.X.dtype == np.float32
    assert (adata.X != expected.X).nnz == 0
    assert list(adata.obs_names) == list(expected.obs_names)
    assert list(adata.var_names) == list(expected.var_names)
    assert {"louvain", "seurat_cell_type"} <= set(adata.obs.columns)
    # Counts as scanpy's pbmc3k holds them: integers, and already through the tutorial's
    # filter_genes(min_cells=3) (scanpy's own filter removes nothing more).
    np.testing.assert_array_equal(adata.X.data, np.round(adata.X.data))
    sc.pp.filter_genes(adata, min_cells=3)
    assert adata.n_vars == 13714
    assert adata.var_names.str.startswith("MT-").sum() == 13


@pytest.mark.parametrize("where", ["unset", "folder without the file"])
def test_falls_back_to_scanpys_downloader(where, tmp_path, monkeypatch):
    if where == "unset":
        monkeypatch.delenv("GPUSC_DATA", raising=False)
    else:
        monkeypatch.setenv("GPUSC_DATA", str(tmp_path))
    downloaded = sc.AnnData(sparse.csr_matrix((3, 2), dtype=np.float32))
    calls = []
    monkeypatch.setattr(sc.datasets, "pbmc3k", lambda: calls.append(1) or downloaded)
    assert datasets.pbmc3k() is downloaded
    assert calls == [1]
