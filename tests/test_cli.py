"""`gpusc run` (gpusc.__main__.main): the pipeline table, report.json and result.h5ad, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal
from scipy import sparse
from sklearn.metrics import adjusted_rand_score

from gpusc.__main__ import STEPS, _PieceFile, _write_h5ad, main


def _main_capturing(argv):
    """main(argv) with its stdout captured (module-scoped fixtures cannot use capsys)."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code, printed = _main_capturing(["run", "--n-obs", "1500", "--out", str(out), "--device", "cpu"])
    return code, out, printed


REPORT_KEYS = {"command", "input", "device", "device_requested", "options", "steps", "skipped", "calls",
               "total_seconds", "timing_note", "host_peak_rss_gib", "device_peak_gib", "final_shape", "ari", "plot", "plot_note",
               "machine", "versions", "platform", "result", "time", "html", "numba", "load_seconds",
               "write_seconds", "report_seconds", "run_seconds", "numpy_madvise_hugepage"}
STEP_KEYS = {"step", "status", "seconds", "numba_compile_seconds", "n_obs", "n_vars", "host_peak_rss_gib",
             "device_peak_gib", "warnings"}


def test_run_synthetic_writes_report_and_result(synthetic_run):
    code, out, printed = synthetic_run
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["device"] == "cpu" and report["device_peak_gib"] is None
    assert report["options"]["n_top_genes"] == 2000 and report["options"]["resolution"] == 1.0
    assert [s["step"] for s in report["steps"]] == [s.name for s in STEPS]
    for row in report["steps"]:  # every step is in gpusc now: none is skipped
        assert set(row) == STEP_KEYS
        assert row["status"] == "ran", row
        assert row["seconds"] >= 0 and row["device_peak_gib"] is None
        assert row["host_peak_rss_gib"] > 0  # psutil is in the bench extra
    assert report["skipped"] == []
    assert report["steps"][0]["n_obs"] == 1500 and report["steps"][0]["n_vars"] == 5000
    for key in ("python", "numpy", "scanpy", "anndata", "gpusc"):
        assert key in report["versions"]
    assert {"cpu_model", "logical_cores"} <= set(report["machine"])
    # the table: one line per step, skipped steps said so
    for name in (s.name for s in STEPS):
        assert name in printed
    assert "seconds" in printed and "cells x genes" in printed and "total" in printed

    result = ad.read_h5ad(out / "result.h5ad")
    last = [s for s in report["steps"] if s["status"] == "ran"][-1]
    assert list(result.shape) == report["final_shape"] == [last["n_obs"], last["n_vars"]]
    assert result.n_vars == 2000  # subset to the highly variable genes
    assert isinstance(result.X, np.ndarray)  # scale densifies, as scanpy
    assert float(result.X.max()) <= 10
    assert "log1p" in result.uns and "hvg" in result.uns
    for key in ("total_counts", "n_genes_by_counts", "pct_counts_mt", "n_genes", "cell_type"):
        assert key in result.obs
    assert "n_cells" in result.var and result.var["highly_variable"].all()
    assert result.obs["n_genes"].min() >= 100  # filter_cells(min_genes=100)
    assert result.obsm["X_pca"].shape == (result.n_obs, 50)
    assert result.obsp["connectivities"].shape == (result.n_obs, result.n_obs)

    assert (out / "umap.png").read_bytes()[:4] == b"\x89PNG"
    assert report["plot"].endswith("umap.png") and report["plot_note"] is None
    assert "X_umap" in result.obsm and "leiden" in result.obs
    # the ARI reported is scikit-learn's on the result's labels; the synthetic cell types are
    # recovered (measured 0.81 with 8 clusters for 8 types)
    assert report["ari"]["labels"] == "cell_type" and report["ari"]["cluster_key"] == "leiden"
    assert report["ari"]["ari"] == pytest.approx(adjusted_rand_score(result.obs["cell_type"], result.obs["leiden"]))
    assert report["ari"]["ari"] > 0.7
    assert f"ARI of the Leiden clusters against obs['cell_type']: {report['ari']['ari']:.3f}" in printed


def test_run_matches_scanpy(synthetic_run):
    import scanpy as sc

    from gpusc.datasets import synthetic

    _, out, _ = synthetic_run
    expected = synthetic(n_obs=1500, n_vars=5000, seed=0)
    sc.pp.calculate_qc_metrics(expected, qc_vars=["mt"], inplace=True)
    sc.pp.filter_cells(expected, min_genes=100)
    sc.pp.filter_genes(expected, min_cells=3)
    sc.pp.normalize_total(expected)
    sc.pp.log1p(expected)
    sc.pp.highly_variable_genes(expected, n_top_genes=2000)
    expected = expected[:, expected.var["highly_variable"]].copy()
    sc.pp.scale(expected, max_value=10)
    result = ad.read_h5ad(out / "result.h5ad")
    assert result.shape == expected.shape
    assert list(result.var_names) == list(expected.var_names)
    np.testing.assert_allclose(result.X, expected.X, rtol=1e-5, atol=1e-5)


def test_run_input_file_resampled(tmp_path):
    from gpusc.datasets import synthetic

    source = synthetic(n_obs=500, n_vars=600, seed=1)  # >= 500 genes: percent_top default
    path = tmp_path / "in.h5ad"
    source.write_h5ad(path)
    out = tmp_path / "out"
    assert main(["run", str(path), "--n-obs", "800", "--groupby", "cell_type", "--out", str(out),
                 "--device", "cpu", "--min-genes", "10", "--n-top-genes", "300"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "model-drawn" in report["input"]
    assert report["steps"][0]["n_obs"] == 800
    assert report["final_shape"][1] == 300
    assert report["ari"]["labels"] == "cell_type"  # leiden ran: scored against --groupby


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


def test_counts_in_a_layer_are_named_in_the_error(tmp_path, capsys):
    adata = ad.AnnData(sparse.csr_matrix(np.array([[0.5, 1.0], [2.0, 0.0]], dtype=np.float32)))
    adata.layers["counts"] = sparse.csr_matrix(np.array([[1.0, 2.0], [3.0, 0.0]], dtype=np.float32))
    path = tmp_path / "layer.h5ad"
    adata.write_h5ad(path)
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "layers['counts']" in capsys.readouterr().err


def test_not_h5ad_and_unreadable_exit_2(tmp_path, capsys):
    text = tmp_path / "counts.csv"
    text.write_text("a,b\n1,2\n")
    assert main(["run", str(text), "--out", str(tmp_path / "o")]) == 2
    assert ".h5ad" in capsys.readouterr().err
    broken = tmp_path / "broken.h5ad"
    broken.write_text("not hdf5")
    assert main(["run", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "could not read" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", "--no-such-option"], "unrecognized arguments"),
    (["run", "--device", "tpu"], "invalid choice"),
    (["run", "--n-top-genes", "0"], "positive int"),
    (["run", "--resolution", "-1"], "positive float"),
    (["run", "--n-obs", "many"], "positive int"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
    (["run", "--groupby", "cell_type"], "needs an INPUT"),
    (["bench", "--steps", "qc,nonsense"], "unknown step"),
    (["bench", "--cells", "ten"], "comma list of integers"),
    (["bench", "--data", "/no/such/file.h5ad"], "not found"),
    (["bench", "--compare", "seurat"], "invalid choice"),
])
def test_bad_arguments_exit_2(argv, message, tmp_path, capsys):
    if argv and argv[0] in ("run", "bench") and "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_exits_0(capsys):
    assert main(["run", "--help"]) == 0
    assert "--n-top-genes" in capsys.readouterr().out


def test_gpu_without_device_exits_2(tmp_path, capsys, monkeypatch):
    from gpusc import _settings

    monkeypatch.setattr(_settings, "gpu_available", lambda: False)  # a machine without a GPU
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
    assert isinstance(result.X, np.ndarray)  # scale densifies, as on the CPU (and as scanpy)
    assert float(result.X.max()) <= 10


def _h5_contents(path) -> dict:
    """Every group's and dataset's attributes, and every dataset's dtype, shape, layout and values."""
    import h5py

    def value(ds):
        v = ds[()]
        return repr(v.tolist() if hasattr(v, "tolist") else v) if ds.dtype.kind in "OV" or ds.shape in ((), None) \
            else v.tobytes()

    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = dict(f.attrs)

        def visit(name, obj):
            attrs = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in obj.attrs.items()}
            out[name] = ((obj.dtype.str, obj.shape, obj.chunks, obj.compression, attrs, value(obj))
                         if isinstance(obj, h5py.Dataset) else attrs)

        f.visititems(visit)
    return out


def test_result_h5ad_is_what_write_h5ad_writes(synthetic_run, tmp_path):
    """gpusc run writes result.h5ad through 64 KiB writes (gpusc.__main__._PieceFile): the file
    holds exactly what anndata's write_h5ad writes for the same AnnData (raw, strings, uns, obsp)."""
    _, out, _ = synthetic_run
    adata = ad.read_h5ad(out / "result.h5ad")
    assert adata.raw is not None and "rank_genes_groups" in adata.uns and "connectivities" in adata.obsp
    adata.obs["note"] = np.where(np.arange(adata.n_obs) % 2, "odd", "even")  # strings: made categorical by both
    copy = adata.copy()
    with ad.settings.override(allow_write_nullable_strings=True):
        copy.write_h5ad(tmp_path / "anndata.h5ad")
    _write_h5ad(adata, tmp_path / "gpusc.h5ad")
    assert _h5_contents(tmp_path / "gpusc.h5ad") == _h5_contents(tmp_path / "anndata.h5ad")
    assert_frame_equal(adata.obs, copy.obs)  # the same change to the object: strings to categoricals


def test_piece_file_writes_every_byte_and_syncs_every_window(tmp_path, monkeypatch):
    import os

    synced, dropped = [], []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: dropped.append(a) or real_fadvise(*a))
    data = np.random.default_rng(0).integers(0, 255, 2 * _PieceFile.WINDOW + 3 * _PieceFile.PIECE + 123,
                                             dtype=np.uint8)
    with _PieceFile(tmp_path / "f", "w+") as f:
        assert f.write(memoryview(data)) == data.size  # one large write, as HDF5's of a dense X
        assert f.write(b"tail") == 4
    assert (tmp_path / "f").read_bytes() == data.tobytes() + b"tail"
    assert len(synced) == 2 and len(dropped) == 2  # after each full 16 MiB, not after the rest
    assert all(a[3] == os.POSIX_FADV_DONTNEED for a in dropped)
