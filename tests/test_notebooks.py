"""The tutorial notebooks run from top to bottom (on the CPU here), and their results are scanpy's.

Each notebook is executed in a fresh kernel with nbclient, a time limit per cell; the
committed copy keeps the outputs the docs render (`make notebooks` refreshes them).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Per cell. The whole pbmc3k notebook takes 20-40 s on a 2-core machine (numba compiles
# included); the limit only stops a hang.
CELL_TIMEOUT_S = 300

# Appended to a notebook before it runs: its results against scanpy's own functions on the
# same data (the tutorial claims scanpy's results).
SCANPY_CHECKS = {
    "pbmc3k.ipynb": """
import scanpy as sc
ref = rsc.datasets.pbmc3k()
ref.var_names_make_unique()
ref.var["mt"] = ref.var_names.str.startswith("MT-")
sc.pp.calculate_qc_metrics(ref, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
sc.pp.filter_cells(ref, min_genes=200)
sc.pp.filter_genes(ref, min_cells=3)
ref = ref[(ref.obs["n_genes_by_counts"] < 2500) & (ref.obs["pct_counts_mt"] < 5)].copy()
sc.pp.normalize_total(ref, target_sum=1e4)
sc.pp.log1p(ref)
sc.pp.highly_variable_genes(ref, min_mean=0.0125, max_mean=3, min_disp=0.5)
assert list(adata.obs_names) == list(ref.obs_names), "cells after filtering differ from scanpy's"
assert list(adata.var_names) == list(ref.var_names), "genes after filtering differ from scanpy's"
assert (adata.var["highly_variable"] == ref.var["highly_variable"]).all(), "HVGs differ from scanpy's"
assert adata.obs["leiden"].nunique() > 1
assert set(adata.uns["rank_genes_groups"]["names"].dtype.names) == set(adata.obs["leiden"].cat.categories)
""",
}


def _plot_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and "sc.pl." in c.source]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_holds_its_outputs(path):
    # The docs render the stored outputs (myst-nb without execution): a notebook edited
    # and not re-run (make notebooks) would show stale or no results.
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "run `make notebooks`"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run `make notebooks`"
    for cell in _plot_cells(nb):
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, data_dir, tmp_path, monkeypatch):
    assert path.name in SCANPY_CHECKS, f"{path.name}: add its scanpy check to SCANPY_CHECKS"
    monkeypatch.setenv("GPUSC_DATA", str(data_dir))  # the kernel inherits it: no download
    # The kernel's connection file and IPython profile go to tmp_path, not the home folder
    # (which a CI machine may not let us write).
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(SCANPY_CHECKS[path.name]))
    # Runs in tmp_path: anything a notebook writes (scanpy's figures/, data/) lands there.
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the cell and traceback on any error
    for cell in _plot_cells(nb):
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
