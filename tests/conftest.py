"""Shared fixtures: real data, array types, tolerances, the gpu marker."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from packaging.version import Version
from scipy import sparse

DATA = Path(os.environ.get("GPUSC_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def _gpu_status() -> tuple[bool, str]:
    """(usable, why): CuPy imports and sees a device, or the reason it does not."""
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        return n > 0, f"cupy {cupy.__version__} sees {n} device(s)"
    except Exception as err:  # no cupy, no driver, a broken CUDA install
        return False, f"{type(err).__name__}: {err}"


HAS_GPU, GPU_STATUS = _gpu_status()

# gpusc mirrors scanpy 1.12 on every Python; on Python 3.11 pip installs scanpy 1.11 (1.12 needs
# 3.12), whose results, names or arguments differ in places. A test whose oracle only 1.12 gives
# carries @pytest.mark.scanpy_112("what scanpy 1.11 does differently") and skips on 1.11 with
# that reason; everything else holds on both versions.
SCANPY_VERSION = Version(version("scanpy"))
SCANPY_112 = SCANPY_VERSION >= Version("1.12")


def _scanpy_112_reason(reason: str) -> str:
    return f"oracle needs scanpy 1.12 (have {SCANPY_VERSION}): {reason}"


def skip_unless_scanpy_112(reason: str) -> None:
    """The scanpy_112 marker's skip, called in the test: for a case that is one combination of a
    fixture's parameter and the test's own, which a marker cannot single out."""
    if not SCANPY_112:
        pytest.skip(_scanpy_112_reason(reason))


def pytest_configure(config):
    # On a GPU runner (make test-gpu) a broken CUDA install must fail the run, not skip it.
    if os.environ.get("GPUSC_REQUIRE_GPU") == "1" and not HAS_GPU:
        raise pytest.UsageError(f"GPUSC_REQUIRE_GPU=1 but no CUDA device is usable: {GPU_STATUS}")
    # gpusc run keeps the synthetic cells it draws in a cache folder: the tests' own, not the user's
    # (in-process runs and `python -m gpusc` subprocesses both read the environment)
    if "GPUSC_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["GPUSC_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpusc-test-cache-")


def pytest_report_header(config):
    return f"gpusc GPU tests: {'run' if HAS_GPU else 'skipped'} ({GPU_STATUS})"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"needs a CUDA device ({GPU_STATUS})")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)
        for mark in item.iter_markers("scanpy_112"):
            if len(mark.args) != 1 or not isinstance(mark.args[0], str) or not mark.args[0]:
                raise pytest.UsageError(f"{item.nodeid}: scanpy_112 takes one reason: "
                                        "what scanpy 1.11 does differently")
            if not SCANPY_112:
                item.add_marker(pytest.mark.skip(reason=_scanpy_112_reason(mark.args[0])))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"real data not found at {DATA}; set $GPUSC_DATA")
    return DATA


def read_real(name: str):
    import anndata as ad

    path = DATA / name
    if not path.exists():
        pytest.fail(f"real dataset {path} missing; set $GPUSC_DATA")
    return ad.read_h5ad(path)


# Host array types every pp function accepts; device twins are made from these.
HOST_TYPES = {
    "dense": np.asarray,
    "csr_matrix": sparse.csr_matrix,
    "csr_array": sparse.csr_array,
    "csc_matrix": sparse.csc_matrix,
    "csc_array": sparse.csc_array,
}


def to_device(x):
    import cupy
    from cupyx.scipy import sparse as cpsparse

    if sparse.issparse(x):
        return (cpsparse.csr_matrix if x.format == "csr" else cpsparse.csc_matrix)(x)
    return cupy.asarray(x)


@pytest.fixture(params=list(HOST_TYPES))
def host_type(request):
    return HOST_TYPES[request.param]


@pytest.fixture(
    params=[*HOST_TYPES, *(pytest.param(f"cupy-{n}", marks=pytest.mark.gpu)
                           for n in ("dense", "csr_matrix", "csc_matrix"))]
)
def array_type(request):
    """Makes an array of one supported kind from a host array (dense or scipy)."""
    name = request.param
    if name.startswith("cupy-"):
        host = HOST_TYPES[name.removeprefix("cupy-")]
        return lambda x: to_device(host(x))
    return HOST_TYPES[name]


def tolerance(dtype) -> dict:
    """rtol for comparing with scanpy: 1e-5 (DESIGN.md) for float32 input, tighter for float64."""
    return {"rtol": 1e-5, "atol": 1e-6} if np.dtype(dtype) == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


def synthetic_counts(n_obs=300, n_vars=200, *, dtype=np.float32, density=0.1, seed=0,
                     empty_rows=(3, 17), empty_cols=(5, 40)):
    """Seeded integer counts with a few all-zero cells and genes."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n_obs, n_vars)) < density
    x = np.where(mask, rng.negative_binomial(2, 0.3, (n_obs, n_vars)) + 1, 0).astype(dtype)
    x[list(empty_rows), :] = 0
    x[:, list(empty_cols)] = 0
    return x


def scanpy_pca(adata):
    """scanpy's own normalize_total, log1p, highly_variable_genes(2000) and pca(50, on the
    HVGs), in place: the representation the neighbour and graph tests compare on."""
    import warnings

    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(adata, n_top_genes=2000)
        sc.pp.pca(adata, n_comps=50, mask_var="highly_variable")
    return adata


def read_only(x):
    """``x`` with its arrays made read-only in place: a NumPy array, a SciPy sparse matrix's
    buffers, or an AnnData's X, layers, obsm, varm and obsp. For fixtures shared by several
    tests: a function that writes into one fails loudly instead of changing later tests'
    input (``.copy()`` gives writable arrays again). obs, var and uns cannot be locked: copy
    a shared AnnData before handing it to a function that may write there."""
    import anndata as ad

    if isinstance(x, ad.AnnData):
        for m in (x.X, *x.layers.values(), *x.obsm.values(), *x.varm.values(), *x.obsp.values()):
            read_only(m)
    elif sparse.issparse(x):
        for buffer in (x.data, *((x.indices, x.indptr) if x.format in ("csr", "csc") else ())):
            buffer.flags.writeable = False
    elif isinstance(x, np.ndarray):
        x.flags.writeable = False
    return x


@pytest.fixture(scope="session")
def pbmc_pca():
    """pbmc3k's X_pca from :func:`scanpy_pca`, C-ordered, read-only."""
    return read_only(np.ascontiguousarray(scanpy_pca(read_real("pbmc3k_counts_labeled.h5ad")).obsm["X_pca"]))


@pytest.fixture(scope="session")
def pbmc_graph():
    """1,500 pbmc3k cells through :func:`scanpy_pca`, then neighbors 15 (exact, sklearn):
    the graph the tl tests compare on. Its arrays are read-only (:func:`read_only`); copy it
    before handing it to a function that may write into it."""
    import warnings

    import scanpy as sc

    adata = read_real("pbmc3k_counts_labeled.h5ad")
    rng = np.random.default_rng(0)
    adata = scanpy_pca(adata[np.sort(rng.choice(adata.n_obs, 1500, replace=False))].copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(adata, n_neighbors=15, transformer="sklearn")
    return read_only(adata)
