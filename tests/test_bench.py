"""`gpusc bench` (gpusc._bench): the files it writes, their keys, and its helpers."""

from __future__ import annotations

import json
import sys
import time

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from gpusc import _bench
from gpusc.__main__ import main

RECORD_KEYS = {"benchmark", "command", "device", "device_requested", "machine", "versions", "libraries", "git",
               "data", "method", "repeats", "steps_requested", "steps_skipped", "steps_run", "runs", "time"}
RUN_KEYS = {"n_obs", "data", "load_average_before", "load_average_after", "steps", "geometric_mean_speedup"}
LIB_KEYS = {"seconds", "best", "peak_rss_gib", "peak_rss_increase_gib", "device_peak_gib"}


@pytest.fixture(scope="module")
def synthetic_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--cells", "2000", "--repeats", "1", "--steps", "normalize,qc", "--out", str(out),
                 "--device", "cpu"])
    return code, out


def test_bench_writes_json_markdown_png(synthetic_bench):
    code, out = synthetic_bench
    assert code == 0
    record = json.loads((out / "bench.json").read_text())
    assert RECORD_KEYS <= set(record)
    assert record["device"] == "cpu" and record["repeats"] == 1
    assert record["command"].startswith("gpusc bench --cells 2000")
    assert {"cpu_model", "logical_cores", "ram_gib"} <= set(record["machine"]) and "gpu" not in record["machine"]
    assert {"python", "scanpy", "gpusc", "numpy"} <= set(record["versions"])
    assert set(record["libraries"]) == {"scanpy", "gpusc", "rapids_singlecell"}
    try:
        import rapids_singlecell  # noqa: F401
    except Exception:
        assert record["libraries"]["rapids_singlecell"] == "not installed"
    assert "commit" in record["git"] and "dirty" in record["git"]
    assert record["data"]["source"] == "gpusc.datasets.synthetic"
    assert record["steps_run"] == ["calculate_qc_metrics", "normalize_total"]  # pipeline order, aliases resolved
    (run,) = record["runs"]
    assert set(run) == RUN_KEYS and run["n_obs"] == 2000
    assert run["data"]["shape"] == [2000, 5000] and run["data"]["nnz"] > 0
    assert [s["step"] for s in run["steps"]] == record["steps_run"]
    for row in run["steps"]:
        for lib in ("scanpy", "gpusc"):
            assert LIB_KEYS <= set(row[lib])
            assert len(row[lib]["seconds"]) == 1 and row[lib]["best"] > 0
            assert row[lib]["device_peak_gib"] is None and row[lib]["peak_rss_gib"] > 0
        assert row["speedup"] == pytest.approx(row["scanpy"]["best"] / row["gpusc"]["best"])
        assert row["max_abs_diff_X"] < 1e-4
        assert "rapids_singlecell" not in row
    assert run["geometric_mean_speedup"] == pytest.approx(
        float(np.sqrt(run["steps"][0]["speedup"] * run["steps"][1]["speedup"])))

    md = (out / "bench.md").read_text()
    assert "| step | scanpy s | gpusc s | speedup |" in md
    assert "| calculate_qc_metrics |" in md and "Geometric mean speedup" in md
    assert "- machine: " in md and "no GPU" in md
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_resamples_data_file(tmp_path):
    from gpusc.datasets import synthetic

    source = synthetic(n_obs=300, n_vars=600, seed=2)
    path = tmp_path / "src.h5ad"
    source.write_h5ad(path)
    out = tmp_path / "out"
    assert main(["bench", "--cells", "400,500", "--data", str(path), "--groupby", "cell_type", "--steps",
                 "log1p,qc", "--repeats", "1", "--out", str(out), "--name", "small", "--device", "cpu"]) == 0
    record = json.loads((out / "small.json").read_text())
    assert [r["n_obs"] for r in record["runs"]] == [400, 500]
    assert all("model-drawn from src.h5ad" in r["data"]["description"] for r in record["runs"])
    assert record["data"]["groupby"] == "cell_type"
    assert (out / "small.md").exists() and (out / "small.png").exists()


def test_bench_groupby_must_exist(tmp_path, capsys):
    from gpusc.datasets import synthetic

    path = tmp_path / "src.h5ad"
    synthetic(n_obs=100, n_vars=200, seed=2).write_h5ad(path)
    assert main(["bench", "--data", str(path), "--groupby", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_step_names_aliases_and_order():
    names = [s.name for s in _bench.step_names("neighbors,hvg, qc,filter_hv")]
    assert names == ["calculate_qc_metrics", "highly_variable_genes", "filter_highly_variable", "neighbors"]
    assert [s.name for s in _bench.step_names(None)] == [s.name for s in _bench.BENCH_STEPS]
    with pytest.raises(_bench.BenchError, match="unknown step"):
        _bench.step_names("qc,nope")


def test_missing_gpusc_functions_are_skipped(monkeypatch, tmp_path):
    import gpusc

    monkeypatch.delattr(gpusc.pp, "log1p")
    out = tmp_path / "o"
    assert main(["bench", "--cells", "300", "--steps", "qc,log1p", "--repeats", "1", "--out", str(out),
                 "--device", "cpu"]) == 0
    record = json.loads((out / "bench.json").read_text())
    assert record["steps_run"] == ["calculate_qc_metrics"]
    assert "not in gpusc yet" in record["steps_skipped"]["log1p"]


def test_integration_doublet_steps_against_their_references():
    """harmony_integrate, scrublet and bbknn run from inputs of their own (batches drawn, raw
    counts) side by side with harmonypy, scanpy and the bbknn package (exact), and the pipeline
    state is left for the next step."""
    import scanpy as sc

    import gpusc
    from gpusc.datasets import synthetic

    counts = synthetic(n_obs=400, n_vars=1000, seed=3)
    sc.pp.pca(counts, n_comps=20)
    steps = _bench.step_names("harmony,scrublet,bbknn")
    rows = _bench.bench_cells(counts, steps, ["scanpy", "gpusc"], repeats=1, on_gpu=False, device="cpu",
                              mods={"scanpy": sc, "gpusc": gpusc})
    harmony, scrublet, bbknn = rows
    assert [r["step"] for r in rows] == ["harmony_integrate", "scrublet", "bbknn"]
    assert all(r["input"] and r["gpusc"]["best"] > 0 and r["scanpy"]["best"] > 0 for r in rows)
    assert harmony["input_shape"] == bbknn["input_shape"] == [400, 0]  # X_pca and the batches only
    assert scrublet["input_shape"] == [400, 1000]  # the raw counts, not the previous step's output
    assert harmony["correction_correlation"] > 0.5  # different k-means starts: not equal, alike
    assert scrublet["predicted_doublet_equal_share"] > 0.95
    assert scrublet["scrublet_threshold"]["gpusc"] == pytest.approx(scrublet["scrublet_threshold"]["scanpy"],
                                                                    rel=1e-3)
    assert bbknn["edges_differing"] == 0 and bbknn["max_abs_connectivity_diff"] < 1e-4
    assert "X_pca_harmony" not in counts.obsm and "batch" not in counts.obs


def test_tsne_step_on_a_fixed_subset(monkeypatch):
    """The tsne step's input (a fixed subset of X_pca) and calls (use_rep="X_pca": the input has
    no genes, and scanpy would take X when n_vars < 50); t-SNE itself is tested against scanpy
    in test_tl_tsne.py, so the two calls are recorded here instead of run."""
    import scanpy as sc

    import gpusc

    monkeypatch.setattr(_bench, "TSNE_CELLS", 150)
    state = ad.AnnData(obsm={"X_pca": np.random.default_rng(4).normal(size=(400, 10)).astype(np.float32)})
    (step,) = _bench.step_names("tsne")
    made = step.make_input(state, None)
    cells = _bench._cell_subset(400, 150)
    assert np.array_equal(cells, np.unique(cells)) and cells.size == 150
    assert made.shape == (150, 0) and np.array_equal(made.obsm["X_pca"], state.obsm["X_pca"][cells])
    calls = []
    monkeypatch.setattr(sc.tl, "tsne", lambda a, **kw: calls.append(("scanpy", a.shape, kw)))
    monkeypatch.setattr(gpusc.tl, "tsne", lambda a, **kw: calls.append(("gpusc", a.shape, kw)))
    step.scanpy(sc, made)
    step.gpusc(gpusc, made, "cpu")
    assert calls == [("scanpy", (150, 0), {"use_rep": "X_pca"}),
                     ("gpusc", (150, 0), {"use_rep": "X_pca", "device": "cpu"})]


def test_batches_for_integration_steps():
    state = ad.AnnData(obsm={"X_pca": np.random.default_rng(5).normal(size=(1000, 8)).astype(np.float32)})
    first, again = _bench._pca_input(state, batches=True), _bench._pca_input(state, batches=True)
    assert list(first.obs["batch"].cat.categories) == ["b0", "b1", "b2", "b3"]
    assert first.obs["batch"].value_counts().min() > 200
    np.testing.assert_array_equal(first.obsm["X_pca"], again.obsm["X_pca"])  # seeded
    shift = first.obsm["X_pca"] - state.obsm["X_pca"]
    for b in first.obs["batch"].cat.categories:  # one offset per batch
        rows = shift[(first.obs["batch"] == b).to_numpy()]
        np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), atol=1e-5)
    assert _bench._pca_input(state, 300).shape == (300, 0)


def test_steps_without_their_reference_are_skipped(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "harmonypy" else real(name, *a))
    out = tmp_path / "o"
    assert main(["bench", "--cells", "300", "--steps", "qc,harmony", "--repeats", "1", "--out", str(out),
                 "--device", "cpu"]) == 0
    record = json.loads((out / "bench.json").read_text())
    assert record["steps_run"] == ["calculate_qc_metrics"]
    assert "harmonypy" in record["steps_skipped"]["harmony_integrate"]


def test_knn_recall():
    def graph(rows):
        n = len(rows)
        indptr = np.cumsum([0] + [len(r) for r in rows])
        return ad.AnnData(np.zeros((n, 1)), obsp={"distances": sparse.csr_matrix(
            (np.ones(indptr[-1]), np.concatenate(rows), indptr), shape=(n, n))})

    exact = graph([[1, 2], [0, 2], [0, 1]])
    assert _bench.knn_recall(exact, exact) == 1.0
    assert _bench.knn_recall(graph([[1, 2], [0, 2], [1, 0]]), exact) == 1.0
    assert _bench.knn_recall(graph([[1, 0], [0, 2], [0, 1]]), exact) == pytest.approx(5 / 6)


def test_geometric_mean():
    assert _bench.geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert _bench.geometric_mean([None, 3.0]) == pytest.approx(3.0)
    assert _bench.geometric_mean([]) is None


def test_measuring_helpers_off_the_gpu():
    with _bench.DevicePeak(False) as dev, _bench.PeakRSS() as rss:
        np.ones(10**6).sum()
    assert dev.peak is None
    assert rss.peak >= rss.start > 0
    assert _bench.rapids_singlecell_status()[1]  # a version, or "not installed"


@pytest.mark.parametrize("way", ["kernel mark", "sampling thread"])
def test_peak_rss_sees_a_freed_allocation(way, monkeypatch, tmp_path):
    if way == "sampling thread":
        pytest.importorskip("psutil")
        monkeypatch.setattr(_bench.PeakRSS, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    elif not _bench.PeakRSS()._kernel_mark:
        if sys.platform == "linux":
            pytest.fail("Linux offers /proc/self/clear_refs (since 4.0): the kernel mark should work here")
        pytest.skip("no /proc/self/clear_refs off Linux: the sampling thread is the way there")
    big = np.ones(10**6)  # a peak before the block: not counted
    del big
    with _bench.PeakRSS() as rss:
        block = np.ones(40 * 2**20 // 8)  # 40 MiB, touched
        time.sleep(0.05)  # the sampling thread's turn
        del block
    assert rss.peak - rss.start >= 35 * 2**20
