"""`gpusc run` (gpusc.__main__.main): the pipeline table, report.json and result.h5ad, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from gpusc.__main__ import STEPS, main


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["run", "--n-obs", "2000", "--out", str(out), "--device", "cpu"])
    return code, out


def test_run_synthetic_writes_report_and_result(synthetic_run, capsys):
    code, out = synthetic_run
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "cpu"
    assert [s["step"] for s in report["steps"]] == [s.name for s in STEPS]
    assert all(s["seconds"] >= 0 for s in report["steps"])
    assert report["steps"][0]["n_obs"] == 2000 and report["steps"][0]["n_vars"] == 5000
    for key in ("python", "numpy", "scanpy", "anndata", "gpusc"):
        assert key in report["versions"]
    result = ad.read_h5ad(out / "result.h5ad")
    assert list(result.shape) == report["final_shape"] == [report["steps"][-1]["n_obs"], report["steps"][-1]["n_vars"]]
    assert sparse.issparse(result.X)
    assert "log1p" in result.uns
    for key in ("total_counts", "n_genes_by_counts", "pct_counts_mt", "n_genes"):
        assert key in result.obs
    assert "n_cells" in result.var
    assert result.obs["n_genes"].min() >= 100  # filter_cells(min_genes=100)


def test_run_matches_scanpy(synthetic_run):
    import scanpy as sc

    from gpusc.datasets import synthetic

    _, out = synthetic_run
    expected = synthetic(n_obs=2000, n_vars=5000, seed=0)
    sc.pp.calculate_qc_metrics(expected, qc_vars=["mt"], inplace=True)
    sc.pp.filter_cells(expected, min_genes=100)
    sc.pp.filter_genes(expected, min_cells=3)
    sc.pp.normalize_total(expected)
    sc.pp.log1p(expected)
    result = ad.read_h5ad(out / "result.h5ad")
    assert result.shape == expected.shape
    np.testing.assert_allclose(result.X.toarray(), expected.X.toarray(), rtol=1e-5, atol=1e-6)


def test_run_input_file_resampled(tmp_path):
    from gpusc.datasets import synthetic

    source = synthetic(n_obs=500, n_vars=600, seed=1)  # >= 500 genes: percent_top default
    path = tmp_path / "in.h5ad"
    source.write_h5ad(path)
    out = tmp_path / "out"
    assert main(["run", str(path), "--n-obs", "800", "--groupby", "cell_type", "--out", str(out),
                 "--device", "cpu", "--min-genes", "10"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "model-drawn" in report["input"]
    assert report["steps"][0]["n_obs"] == 800


def test_missing_input_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_non_counts_input_is_refused(tmp_path, capsys):
    adata = ad.AnnData(sparse.csr_matrix(np.array([[0.5, 1.0], [2.0, 0.0]], dtype=np.float32)))
    path = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(path)
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "raw counts" in capsys.readouterr().err
    adata.X = sparse.csr_matrix(np.array([[-1.0, 1.0], [2.0, 0.0]], dtype=np.float32))
    adata.write_h5ad(path)
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2


def test_gpu_without_device_exits_2(tmp_path, capsys):
    from conftest import HAS_GPU

    if HAS_GPU:
        pytest.skip("a GPU is present")
    assert main(["run", "--device", "gpu", "--n-obs", "100", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gpusc", "run", str(tmp_path / "nope.h5ad")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "not found" in done.stderr


@pytest.mark.gpu
def test_run_on_gpu(tmp_path):
    assert main(["run", "--n-obs", "2000", "--out", str(tmp_path), "--device", "gpu"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["device"] == "gpu"
    assert report["steps"][0]["step"] == "anndata_to_GPU" and report["steps"][-1]["step"] == "anndata_to_CPU"
    result = ad.read_h5ad(tmp_path / "result.h5ad")
    assert isinstance(result.X, sparse.spmatrix | sparse.sparray)
