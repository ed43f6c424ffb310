"""`gpusc run` on real inputs (.h5ad, .zarr, a 10x folder, a 10x .h5 built from pbmc3k), its
report.html seen in headless Chromium, and numba's on-disk cache across two runs.

The readers' oracle is the AnnData the inputs were written from; the page is checked in a real
browser (tests/_browser.py). Without chromium the browser test skips here, and fails where
GPUSC_REQUIRE_BROWSER=1 (set by .ci/run, which installs chromium).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import read_real
from scipy import io as spio
from scipy import sparse

import gpusc as rsc
from gpusc import _report
from gpusc.__main__ import main, read_counts

N_CELLS = 1200  # a seeded subset of pbmc3k: enough cells for 8+ Leiden clusters
LABELS = "louvain"


@pytest.fixture(scope="module")
def source():
    """pbmc3k counts (a seeded subset of the cells), with Ensembl-like gene ids for 10x's files."""
    full = read_real("pbmc3k_counts_labeled.h5ad")
    rng = np.random.default_rng(0)
    adata = full[np.sort(rng.choice(full.n_obs, N_CELLS, replace=False))].copy()
    adata.X = sparse.csr_matrix(adata.X)
    adata.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    return adata


def _write_10x_folder(adata, folder: Path) -> None:
    """Cell Ranger 3's layout: genes x cells Matrix Market, features and barcodes, gzipped."""
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
        spio.mmwrite(f, sparse.csr_matrix(adata.X.T).astype(np.int64))
    with gzip.open(folder / "features.tsv.gz", "wt") as f:
        for gene_id, name in zip(adata.var["gene_ids"], adata.var_names, strict=True):
            f.write(f"{gene_id}\t{name}\tGene Expression\n")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        f.write("\n".join(adata.obs_names) + "\n")


def _write_10x_h5(adata, path: Path) -> None:
    """Cell Ranger 3's filtered_feature_bc_matrix.h5: CSC of genes x cells under /matrix."""
    import h5py

    by_cell = sparse.csr_matrix(adata.X)  # rows = cells: CSC of the genes x cells matrix
    with h5py.File(path, "w") as f:
        matrix = f.create_group("matrix")
        matrix.create_dataset("barcodes", data=np.array(adata.obs_names, dtype="S"))
        matrix.create_dataset("data", data=by_cell.data.astype(np.int32))
        matrix.create_dataset("indices", data=by_cell.indices.astype(np.int64))
        matrix.create_dataset("indptr", data=by_cell.indptr.astype(np.int64))
        matrix.create_dataset("shape", data=np.array([adata.n_vars, adata.n_obs], dtype=np.int32))
        features = matrix.create_group("features")
        features.create_dataset("id", data=np.array(adata.var["gene_ids"], dtype="S"))
        features.create_dataset("name", data=np.array(adata.var_names, dtype="S"))
        features.create_dataset("feature_type", data=np.array(["Gene Expression"] * adata.n_vars, dtype="S"))
        features.create_dataset("genome", data=np.array(["GRCh38"] * adata.n_vars, dtype="S"))
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


@pytest.fixture(scope="module")
def inputs(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    paths = {"h5ad": folder / "pbmc.h5ad", "zarr": folder / "pbmc.zarr", "10x folder": folder / "filtered",
             "10x h5": folder / "filtered.h5"}
    # anndata 0.12 (Python 3.11) reads pbmc3k's names as pandas string arrays and writes them
    # back only when asked
    with ad.settings.override(allow_write_nullable_strings=True):
        source.write_h5ad(paths["h5ad"])
        source.write_zarr(paths["zarr"])
    _write_10x_folder(source, paths["10x folder"])
    _write_10x_h5(source, paths["10x h5"])
    return paths


@pytest.mark.parametrize("kind", ["h5ad", "zarr", "10x folder", "10x h5"])
def test_read_counts_formats(kind, inputs, source):
    adata, read_as = read_counts(inputs[kind])
    assert read_as == {"h5ad": ".h5ad", "zarr": ".zarr", "10x folder": "10x folder", "10x h5": "10x .h5"}[kind]
    assert list(adata.obs_names) == list(source.obs_names)
    expected_names = source.var_names.copy()
    if kind.startswith("10x"):  # symbols made unique, as scanpy's tutorial does after read_10x_*
        made_unique = ad.AnnData(var=source.var.copy())
        made_unique.var_names_make_unique()
        expected_names = made_unique.var_names
        assert list(adata.var["gene_ids"]) == list(source.var["gene_ids"])
    assert list(adata.var_names) == list(expected_names)
    np.testing.assert_array_equal(sparse.csr_matrix(adata.X).toarray(), source.X.toarray())


def test_matrix_mtx_file_reads_its_folder(inputs, source):
    adata, read_as = read_counts(inputs["10x folder"] / "matrix.mtx.gz")
    assert read_as == "10x folder" and adata.shape == source.shape


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("option", ["--groupby", "--batch-key"])
def test_column_not_in_obs_exits_2(option, inputs, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", str(inputs["zarr"]), option, "donor", "--out", str(out), "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert f"{option} 'donor' is not a column of obs" in err and "louvain" in err
    assert not out.exists()


def test_non_counts_zarr_exits_2(source, tmp_path, capsys):
    logged = source.copy()
    logged.X = sparse.csr_matrix(np.log1p(logged.X.toarray()))
    with ad.settings.override(allow_write_nullable_strings=True):  # anndata 0.12, as above
        logged.write_zarr(tmp_path / "logged.zarr")
    assert main(["run", str(tmp_path / "logged.zarr"), "--out", str(tmp_path / "o")]) == 2
    assert "does not hold raw counts" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_help_documents_inputs_and_options(capsys):
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("--qc-vars", "--batch-key", "--groupby", ".zarr", "10x", "examples:",
                   "gpusc run cells.zarr --batch-key sample", "report.html", "exit code 2"):
        assert needle in text, needle


# ---------------------------------------------------------------- two runs: numba's cache, the page


def _run_cli(args: list[str], cache: Path) -> dict:
    """`python -m gpusc run` in a fresh interpreter with numba's cache in ``cache``."""
    env = {**{k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}, "NUMBA_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-m", "gpusc", "run", *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _cache_files(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_size for p in cache.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def two_runs(inputs, tmp_path_factory):
    """The same run twice with an empty numba cache: the first compiles and writes the cache,
    the second must load everything from it."""
    cache = tmp_path_factory.mktemp("numba-cache")
    runs = []
    for name in ("cold", "warm"):
        out = tmp_path_factory.mktemp(name)
        done = _run_cli([str(inputs["zarr"]), "--groupby", LABELS, "--qc-vars", "mt,ribo", "--out", str(out),
                         "--device", "cpu"], cache)
        runs.append({"out": out, "stdout": done.stdout, "stderr": done.stderr,
                     "report": json.loads((out / "report.json").read_text()), "cache": _cache_files(cache)})
    return runs


def test_warm_run_loads_numba_cache(two_runs):
    cold, warm = two_runs
    assert cold["report"]["numba"]["functions_compiled"] > 0  # an empty cache: gpusc's kernels compile
    assert any(f.startswith("gpusc._kernels.") for f in cold["report"]["numba"]["functions"])
    assert cold["cache"], "numba wrote no cache files"
    assert warm["report"]["numba"]["functions_compiled"] == 0, warm["report"]["numba"]["functions"]
    assert warm["report"]["numba"]["compile_seconds"] == 0
    assert warm["cache"] == cold["cache"]  # nothing new written, nothing rewritten
    assert all(r["numba_compile_seconds"] == 0 for r in warm["report"]["steps"] if r["status"] == "ran")
    # the cold run compiled the later steps' kernels in a second process too; the warm one did not need it
    assert cold["report"]["numba"]["compiled_ahead"]["started"]
    assert cold["report"]["numba"]["compiled_ahead"]["returncode"] == 0, cold["report"]["numba"]["compiled_ahead"]
    assert warm["report"]["numba"]["compiled_ahead"] == {"started": False}


def test_command_turns_numpy_huge_pages_off(two_runs):
    """The command's process (not the library) stops numpy's huge-page advice: first touches of
    huge pages stalled a warm run by 1.5-2 s on this project's VM (see gpusc.__main__._small_pages)."""
    for run in two_runs:
        assert run["report"]["numpy_madvise_hugepage"] is False


def test_users_numpy_huge_page_choice_wins(monkeypatch):
    from gpusc.__main__ import _hugepage_switch, _numpy_hugepages, _small_pages

    before = _numpy_hugepages()
    assert before is not None  # numpy 1.26-2.x have the switch
    try:
        _hugepage_switch()(True)
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
        _small_pages()
        assert _numpy_hugepages() is True
        monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE")
        _small_pages()
        assert _numpy_hugepages() is False
    finally:
        _hugepage_switch()(before)


def test_compile_ahead_caches_the_later_steps_kernels(tmp_path):
    """The second process's made-up cells give the later steps the dtypes of a real run: after it,
    a run on an otherwise empty cache compiles the first steps' kernels but none from scale on."""
    from gpusc.__main__ import STEPS
    from gpusc._compile_ahead import FIRST_STEP

    cache = tmp_path / "cache"
    cache.mkdir()
    done = subprocess.run([sys.executable, "-m", "gpusc._compile_ahead"], capture_output=True, text=True,
                          env={**os.environ, "NUMBA_CACHE_DIR": str(cache)}, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _run_cli(["--n-obs", "2000", "--out", str(tmp_path / "out"), "--device", "cpu"], cache)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["numba"]["compiled_ahead"] == {"started": False}  # the cache was warm for them
    compiled = {r["step"]: r["numba_compile_seconds"] for r in report["steps"] if r["status"] == "ran"}
    later = [s.name for s in STEPS][[s.name for s in STEPS].index(FIRST_STEP):]
    assert set(later) <= set(compiled)
    assert {step: compiled[step] for step in later} == dict.fromkeys(later, 0)
    assert compiled["calculate_qc_metrics"] > 0  # the steps before: still compiled by the run


def test_synthetic_cells_drawn_once_then_read_back(tmp_path, monkeypatch):
    """gpusc run's default input: the cached file holds the very cells gpusc.datasets.synthetic draws."""
    from gpusc.__main__ import _synthetic

    monkeypatch.setenv("GPUSC_CACHE_DIR", str(tmp_path))
    drawn = _synthetic(500, seed=3)
    (cached,) = tmp_path.glob("synthetic-500x5000-seed3-*.h5ad")
    read = _synthetic(500, seed=3)
    expected = rsc.datasets.synthetic(n_obs=500, n_vars=5000, seed=3)
    assert drawn.obs.equals(read.obs) and drawn.var.equals(read.var)  # the first run starts as the next
    for got in (drawn, read):
        assert got.X.dtype == expected.X.dtype and got.X.indices.dtype == expected.X.indices.dtype
        assert (got.X != expected.X).nnz == 0
        for frame in ("obs", "var"):  # the same values (anndata writes strings as categories)
            got_frame, expected_frame = getattr(got, frame), getattr(expected, frame)
            assert got_frame.index.equals(expected_frame.index)
            for column in expected_frame:
                np.testing.assert_array_equal(got_frame[column].to_numpy(), expected_frame[column].to_numpy())
    assert list(tmp_path.iterdir()) == [cached]  # no partial file left
    cached.write_bytes(b"not an h5ad file")  # damaged: drawn again, and the file replaced
    assert (_synthetic(500, seed=3).X != expected.X).nnz == 0
    assert cached.stat().st_size > 100


def test_made_up_cells_give_one_connected_graph_and_clusters():
    """One connected graph: umap's spectral start stays gpusc's (not umap-learn's per-component
    layout, whose kernels the run never uses); two or more clusters: rank_genes_groups runs."""
    from scipy.sparse.csgraph import connected_components

    from gpusc._compile_ahead import made_up_cells

    adata = made_up_cells()
    assert adata.X.dtype == np.float32 and adata.X.indices.dtype == np.int32 and adata.raw is not None
    rsc.pp.scale(adata, max_value=10)
    rsc.pp.pca(adata)
    rsc.pp.neighbors(adata)
    rsc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False)
    assert connected_components(adata.obsp["connectivities"])[0] == 1
    assert adata.obs["leiden"].nunique() >= 2


def test_run_report_on_real_input(two_runs, source):
    report = two_runs[1]["report"]
    assert "(.zarr, 1200 x 13714)" in report["input"]
    assert all(r["status"] == "ran" for r in report["steps"]), report["skipped"]
    assert report["options"]["qc_vars"] == ["mt", "ribo"]
    # the genes the flags name, counted on the input's symbols as scanpy's tutorial flags them
    names = source.var_names.str.upper()
    assert report["options"]["qc_var_genes"] == {"mt": int(names.str.startswith("MT-").sum()),
                                                 "ribo": int(names.str.startswith(("RPS", "RPL")).sum())}
    assert report["ari"]["labels"] == LABELS and report["ari"]["ari"] > 0.5  # measured 0.6-0.7
    # no third-party warnings: only scanpy's own wording that gpusc repeats (scale densifies)
    said = [w for r in report["steps"] for w in r["warnings"]]
    assert all("densifies" in w for w in said), said
    result = ad.read_h5ad(report["result"])
    assert {"pct_counts_mt", "pct_counts_ribo", LABELS, "leiden"} <= set(result.obs.columns)
    assert "rank_genes_groups" in result.uns and result.raw is not None
    assert result.raw.n_vars > result.n_vars  # markers come from every gene
    html = Path(report["html"]).read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch


def _chromium() -> str:
    import _browser

    path = _browser.find_chromium()
    if path is None:
        why = "chromium is not installed (apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("GPUSC_REQUIRE_BROWSER") == "1":
            pytest.fail(f"GPUSC_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return path


def test_report_html_in_chromium(two_runs):
    import _browser

    report = two_runs[1]["report"]
    page = _browser.view(Path(report["html"]), _chromium())
    assert page.errors == []
    assert page.section_ids == list(_report.SECTIONS)
    assert len(page.images) == 4  # QC violins, HVG, PCA variance ratio, UMAP
    for image in page.images:
        assert image["scheme"] == "data" and image["complete"] and image["naturalWidth"] > 100, image
    for heading in ("Summary", "Steps", "Quality control", "Highly variable genes", "PCA", "UMAP", "Marker genes"):
        assert heading in page.text
    for step in report["steps"]:
        assert step["step"] in page.text
    assert f"min_genes={report['options']['min_genes']}" in page.text
    assert f"obs['{LABELS}']" in page.text  # the UMAP's second colour
    result = ad.read_h5ad(report["result"])
    top = result.uns["rank_genes_groups"]["names"]["0"][0]
    assert top in page.text  # the first cluster's top marker gene
    assert page.screenshot[:4] == b"\x89PNG"


def test_batch_key_reaches_highly_variable_genes(source, tmp_path):
    """--batch-key: scanpy's per-batch HVG selection (var['highly_variable_nbatches'])."""
    import scanpy as sc

    small = source[:400].copy()
    small.obs["sample"] = np.where(np.arange(small.n_obs) % 2 == 0, "a", "b")
    with ad.settings.override(allow_write_nullable_strings=True):  # anndata 0.12, as above
        small.write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "in.h5ad"), "--batch-key", "sample", "--n-top-genes", "500",
                 "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["batch_key"] == "sample"
    result = ad.read_h5ad(out / "result.h5ad")
    # the oracle: scanpy's steps up to the HVG selection on the same input
    expected = small.copy()
    sc.pp.filter_cells(expected, min_genes=100)
    sc.pp.filter_genes(expected, min_cells=3)
    sc.pp.normalize_total(expected)
    sc.pp.log1p(expected)
    sc.pp.highly_variable_genes(expected, n_top_genes=500, batch_key="sample")
    chosen = expected.var_names[expected.var["highly_variable"]]
    assert sorted(result.var_names) == sorted(chosen)
    np.testing.assert_array_equal(result.var["highly_variable_nbatches"],
                                  expected.var.loc[result.var_names, "highly_variable_nbatches"])
