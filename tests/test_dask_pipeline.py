"""Out of core end to end (issue 11, items 5 and 6): a zarr store written here, read lazily with
anndata's reader, through QC → filter → normalize → log1p → HVG → scale → PCA on a
dask.distributed LocalCluster whose workers may each hold less than the matrix; and
``gpusc run --chunk-size``. The oracle is the same pipeline in memory (which the other test
files hold to scanpy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gpusc
from gpusc import _outofcore
from gpusc.__main__ import main

distributed = pytest.importorskip("distributed")

N_OBS, N_VARS, CHUNK = 60_000, 3_500, 6_000
# Each worker may hold 700 MiB: less than the matrix (60,000 x 3,500 float32 = 801 MiB dense;
# scale makes it dense) plus the ~340 MiB of a worker that has imported gpusc. A worker past
# 95 % of its limit is killed by its nanny, so finishing shows that no worker held the matrix.
WORKER_LIMIT = 700 * 2**20


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    adata = gpusc.datasets.synthetic(n_obs=N_OBS, n_vars=N_VARS, seed=3)
    path = tmp_path_factory.mktemp("ooc") / "cells.zarr"
    adata.write_zarr(path)
    return path


def _pipeline(adata):
    gpusc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], inplace=True)
    gpusc.pp.filter_cells(adata, min_genes=50)
    gpusc.pp.filter_genes(adata, min_cells=3)
    gpusc.pp.normalize_total(adata)
    gpusc.pp.log1p(adata)
    gpusc.pp.highly_variable_genes(adata, n_top_genes=1000)
    gpusc.pp.filter_highly_variable(adata)
    gpusc.pp.scale(adata, max_value=10)
    gpusc.pp.pca(adata, n_comps=30)
    return adata


def test_pipeline_on_a_local_cluster_with_less_memory_per_worker_than_the_matrix(store):
    assert WORKER_LIMIT < N_OBS * N_VARS * 4
    lazy = _outofcore.read_lazy(store, CHUNK)
    assert lazy.X.chunks[0] == (CHUNK,) * (N_OBS // CHUNK)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=WORKER_LIMIT,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        _pipeline(lazy)
    memory = _pipeline(__import__("anndata").read_zarr(store))
    assert lazy.shape == memory.shape
    np.testing.assert_array_equal(lazy.var_names, memory.var_names)
    for key in ("total_counts", "n_genes_by_counts", "pct_counts_mt"):
        np.testing.assert_allclose(lazy.obs[key], memory.obs[key], rtol=1e-6)
    # the same Gram matrices summed in another grouping: components equal up to sign
    np.testing.assert_allclose(lazy.uns["pca"]["variance"], memory.uns["pca"]["variance"], rtol=1e-5)
    signs = np.sign((lazy.varm["PCs"] * memory.varm["PCs"]).sum(axis=0))
    np.testing.assert_allclose(lazy.obsm["X_pca"] * signs, memory.obsm["X_pca"], rtol=1e-4,
                               atol=1e-4 * np.abs(memory.obsm["X_pca"]).max())


def test_run_with_chunk_size_writes_what_the_in_memory_run_writes(tmp_path, capsys):
    import anndata as ad

    source = gpusc.datasets.synthetic(n_obs=2_500, n_vars=1_500, seed=5)
    source.write_h5ad(tmp_path / "cells.h5ad")
    code = main(["run", str(tmp_path / "cells.h5ad"), "--chunk-size", "700", "--device", "cpu",
                 "--memory-limit", "3GiB", "--out", str(tmp_path / "lazy")])
    printed = capsys.readouterr().out
    assert code == 0 and "dask dashboard: http" in printed
    assert main(["run", str(tmp_path / "cells.h5ad"), "--device", "cpu", "--out", str(tmp_path / "memory")]) == 0
    lazy, memory = ad.read_h5ad(tmp_path / "lazy" / "result.h5ad"), ad.read_h5ad(tmp_path / "memory" / "result.h5ad")
    assert lazy.shape == memory.shape
    np.testing.assert_array_equal(lazy.var_names, memory.var_names)
    np.testing.assert_allclose(np.abs(lazy.obsm["X_pca"]), np.abs(memory.obsm["X_pca"]), rtol=1e-4, atol=1e-4)
    assert (lazy.obs["leiden"] == memory.obs["leiden"]).mean() > 0.99
    for name in ("report.html", "report.json", "umap.png"):
        assert (tmp_path / "lazy" / name).stat().st_size > 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpus", "2"], "--gpus and --memory-limit set up the dask cluster of --chunk-size"),
    (["--chunk-size", "100", "--gpus", "1", "--device", "cpu"], "--gpus K runs on GPUs"),
])
def test_run_out_of_core_options_are_checked(tmp_path, capsys, argv, message):
    assert main(["run", "--n-obs", "300", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_run_with_chunk_size_refuses_a_10x_folder(tmp_path, capsys):
    folder = tmp_path / "tenx"
    folder.mkdir()
    (folder / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n1 1 0\n")
    assert main(["run", str(folder), "--chunk-size", "100", "--out", str(tmp_path / "out")]) == 2
    assert "--chunk-size reads an .h5ad file or a .zarr store lazily" in capsys.readouterr().err
