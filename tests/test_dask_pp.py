"""A dask X (row chunks) through calculate_qc_metrics, filter_cells/genes, normalize_total, log1p
and filter_highly_variable (issue 11, item 1).

Oracles: scanpy 1.12 run on the same dask AnnData (where scanpy accepts it) and on the same
matrix in memory; gpusc's own in-memory result must agree too (the same kernels per chunk).
Lazy steps must trigger no dask computation; reductions exactly one per pass.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import gpusc as rsc
from _compare import assert_frame_like_scanpy, dense, quiet
from _dask import as_dask, count_computes, da
from conftest import skip_unless_scanpy_112, synthetic_counts, tolerance

N_OBS, N_VARS = 70, 60
PERCENT_TOP = (5, 20)

CHUNK_TYPES = {"dense": np.asarray, "csr_matrix": sparse.csr_matrix, "csr_array": sparse.csr_array}
# (chunk type, row chunks, index dtype, value dtype): every chunk type with uneven and empty
# chunks, int32 and int64 indices, float32 and float64 values
CASES = [
    ("dense", "uneven", None, np.float32),
    ("dense", "empty", None, np.float64),
    ("csr_matrix", "uneven", np.int32, np.float32),
    ("csr_matrix", "empty", np.int64, np.float64),
    ("csr_matrix", "uneven", np.int64, np.float32),
    ("csr_array", "empty", np.int32, np.float64),
    ("csr_array", "uneven", np.int64, np.float64),
    ("csr_array", "one", np.int64, np.float32),
]
CASE_IDS = [f"{c}-{k}-{np.dtype(i).name if i else 'no_index'}-{np.dtype(v).name}" for c, k, i, v in CASES]


def counts(dtype=np.float32, seed=0) -> np.ndarray:
    return synthetic_counts(N_OBS, N_VARS, dtype=dtype, density=0.3, seed=seed)


def host_matrix(x: np.ndarray, chunk: str, index_dtype=None):
    m = CHUNK_TYPES[chunk](x.copy())
    if index_dtype is not None:
        m.indices, m.indptr = m.indices.astype(index_dtype), m.indptr.astype(index_dtype)
    return m


def annotated(x) -> ad.AnnData:
    n_obs, n_vars = x.shape
    var = pd.DataFrame({"mt": np.arange(n_vars) % 9 == 1}, index=[f"g{j}" for j in range(n_vars)])
    return ad.AnnData(x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_obs)]), var=var)


def dask_pair(case, seed=0):
    """(in-memory AnnData, dask AnnData, scanpy's dask AnnData, scanpy's in-memory AnnData)."""
    chunk, kind, index_dtype, dtype = case
    x = counts(dtype, seed)
    return (annotated(host_matrix(x, chunk, index_dtype)),
            annotated(as_dask(host_matrix(x, chunk, index_dtype), kind, index_dtype)),
            annotated(as_dask(host_matrix(x, chunk, index_dtype), kind, index_dtype)),
            annotated(host_matrix(x, chunk)))


def computed(x):
    return dense(x.compute() if hasattr(x, "compute") else x)


def assert_close(got, expected, dtype, err_msg=""):
    np.testing.assert_allclose(computed(got), computed(expected), err_msg=err_msg, **tolerance(dtype))


# ---------------------------------------------------------------- calculate_qc_metrics


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_qc_metrics_one_computation_same_as_in_memory_and_scanpy(case):
    memory, lazy, sc_lazy, sc_memory = dask_pair(case)
    dtype = case[3]
    kwargs = {"qc_vars": ["mt"], "percent_top": PERCENT_TOP, "inplace": True}
    rsc.pp.calculate_qc_metrics(memory, **kwargs)
    with count_computes() as c:
        rsc.pp.calculate_qc_metrics(lazy, **kwargs)
    assert c.computes == 1  # every chunk's partials in one dask computation
    for frame in ("obs", "var"):
        assert_frame_like_scanpy(getattr(lazy, frame), getattr(memory, frame), dtype)
    if case[0] == "csr_array":
        skip_unless_scanpy_112("calculate_qc_metrics takes no csr_array (axis_nnz dispatches on "
                               "spmatrix only): 'ValueError: setting an array element with a sequence'")
    with quiet():
        sc.pp.calculate_qc_metrics(sc_memory, **kwargs)
    for frame in ("obs", "var"):
        assert_frame_like_scanpy(getattr(lazy, frame), getattr(sc_memory, frame), dtype)
    if case[:2] == ("dense", "empty"):
        return  # scanpy 1.12 raises here: "Cannot apply_along_axis when any iteration dimensions are 0"
    with quiet():
        sc.pp.calculate_qc_metrics(sc_lazy, **kwargs)
    for frame in ("obs", "var"):
        assert_frame_like_scanpy(getattr(lazy, frame), getattr(sc_lazy, frame), dtype)
    if dtype is np.float32:
        skip_unless_scanpy_112("var mean_counts and log1p_mean_counts of a float32 X are float64, not float32")
    for frame in ("obs", "var"):
        got, expected = getattr(lazy, frame), getattr(sc_lazy, frame)
        assert (got.dtypes == expected[got.columns].dtypes).all(), (got.dtypes, expected.dtypes)


def test_qc_metrics_return_frames_on_dask():
    memory, lazy, _, _ = dask_pair(CASES[2])
    expected = rsc.pp.calculate_qc_metrics(memory, percent_top=PERCENT_TOP, log1p=False)
    got = rsc.pp.calculate_qc_metrics(lazy, percent_top=PERCENT_TOP, log1p=False)
    for g, e in zip(got, expected):
        pd.testing.assert_frame_equal(g, e)
    assert "total_counts" not in lazy.obs  # inplace=False wrote nothing


# ---------------------------------------------------------------- filter_cells / filter_genes

FILTERS = [
    (rsc.pp.filter_cells, sc.pp.filter_cells, {"min_genes": 18}),
    (rsc.pp.filter_cells, sc.pp.filter_cells, {"max_counts": 150}),
    (rsc.pp.filter_genes, sc.pp.filter_genes, {"min_cells": 20}),
    (rsc.pp.filter_genes, sc.pp.filter_genes, {"max_counts": 200}),
]


@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
@pytest.mark.parametrize(("ours", "theirs", "kwargs"), FILTERS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_filter_same_as_in_memory_and_scanpy(case, ours, theirs, kwargs):
    memory, lazy, sc_lazy, _ = dask_pair(case)
    ours(memory, **kwargs)
    with count_computes() as c:
        ours(lazy, **kwargs)
    assert c.computes == 1
    assert isinstance(lazy.X, da.Array)  # the subset stays lazy
    with quiet():
        theirs(sc_lazy, **kwargs)
    for expected in (memory, sc_lazy):
        assert lazy.shape == expected.shape
        pd.testing.assert_frame_equal(lazy.obs, expected.obs)
        pd.testing.assert_frame_equal(lazy.var, expected.var)
        assert_close(lazy.X, expected.X, case[3])


def test_filter_arrays_return_host_numbers():
    x = host_matrix(counts(), "csr_matrix")
    for ours, axis_kwargs in ((rsc.pp.filter_cells, {"min_counts": 100}), (rsc.pp.filter_genes, {"min_cells": 20})):
        subset, number = ours(as_dask(x, "empty"), **axis_kwargs)
        expected_subset, expected_number = ours(x, **axis_kwargs)
        assert isinstance(subset, np.ndarray) and isinstance(number, np.ndarray)
        np.testing.assert_array_equal(subset, expected_subset)
        np.testing.assert_array_equal(number, expected_number)
        assert number.dtype == expected_number.dtype


@pytest.mark.parametrize("chunk", ["dense", "csr_matrix"])
def test_filter_counts_positive_values_with_negatives(chunk):
    # negative values: scanpy counts values > 0, a second pass over the chunks
    x = counts() - 1
    with quiet():
        expected = [sc.pp.filter_genes(host_matrix(x, chunk), min_cells=5, inplace=False),
                    sc.pp.filter_cells(host_matrix(x, chunk), min_genes=5, inplace=False)]
    with count_computes() as c:
        got = [rsc.pp.filter_genes(as_dask(host_matrix(x, chunk), "empty"), min_cells=5),
               rsc.pp.filter_cells(as_dask(host_matrix(x, chunk), "empty"), min_genes=5)]
    assert c.computes == 4  # counts, then the positive counts, per call
    for (g_subset, g_number), (e_subset, e_number) in zip(got, expected):
        np.testing.assert_array_equal(g_subset, e_subset)
        np.testing.assert_array_equal(g_number, e_number)


# ---------------------------------------------------------------- normalize_total

NORMALIZE = [
    ({"target_sum": 1e4}, 0),
    ({}, 1),
    ({"target_sum": 1e4, "key_added": "norm"}, 1),
    ({"exclude_highly_expressed": True, "max_fraction": 0.1, "target_sum": 1e4}, 1),
    ({"exclude_highly_expressed": True, "max_fraction": 0.1, "key_added": "norm"}, 2),
]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("kwargs", "n_computes"), NORMALIZE, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_normalize_total_passes_same_as_in_memory_and_scanpy(case, kwargs, n_computes):
    memory, lazy, sc_lazy, _ = dask_pair(case)
    dtype = case[3]
    with quiet():
        rsc.pp.normalize_total(memory, **kwargs)
        with count_computes() as c:
            rsc.pp.normalize_total(lazy, **kwargs)
    assert c.computes == n_computes
    assert isinstance(lazy.X, da.Array) and lazy.X.chunks == sc_lazy.X.chunks
    assert type(lazy.X._meta) is type(memory.X) and lazy.X.dtype == dtype
    result = lazy.X.compute()
    assert type(result) is type(memory.X)
    np.testing.assert_array_equal(dense(result), dense(memory.X))  # the same kernels, chunk by chunk
    if "key_added" in kwargs:
        np.testing.assert_array_equal(lazy.obs["norm"], memory.obs["norm"])
    if case[0] == "csr_array":
        skip_unless_scanpy_112("normalize_total's dask axis_sum calls np.sum(keepdims=...) on csr_array chunks: "
                               "'TypeError: _cs_matrix.sum() got an unexpected keyword argument 'keepdims''")
    with quiet():
        sc.pp.normalize_total(sc_lazy, **kwargs)
    assert_close(result, sc_lazy.X, dtype)
    if "key_added" in kwargs:
        assert lazy.obs["norm"].dtype == sc_lazy.obs["norm"].dtype
        assert_close(lazy.obs["norm"].to_numpy(), sc_lazy.obs["norm"].to_numpy(), dtype)


def test_normalize_total_inplace_false_and_integers():
    x = counts().astype(np.int64)
    with quiet():
        expected = sc.pp.normalize_total(annotated(as_dask(sparse.csr_matrix(x))), target_sum=100, inplace=False)
    lazy = annotated(as_dask(sparse.csr_matrix(x)))
    before = lazy.X
    with count_computes() as c:
        got = rsc.pp.normalize_total(lazy, target_sum=100, inplace=False)
    assert c.computes == 0 and lazy.X is before
    assert got["X"].dtype == expected["X"].dtype == np.float32  # scanpy's float32 for integers
    assert isinstance(got["norm_factor"], da.Array)  # lazy, as scanpy's
    assert_close(got["X"], expected["X"], np.float32)
    assert_close(got["norm_factor"], expected["norm_factor"], np.float32)


def test_normalize_total_nonfinite_in_a_lazy_chunk_raises_when_computed():
    x = counts()
    x[40, 3] = np.nan
    lazy = annotated(as_dask(sparse.csr_matrix(x)))
    before = lazy.X
    with pytest.raises(ValueError, match="NaN or inf"):  # a pass: before anything changes
        rsc.pp.normalize_total(lazy)
    assert lazy.X is before
    rsc.pp.normalize_total(lazy, target_sum=10)  # lazy: the chunk raises when computed
    with pytest.raises(ValueError, match="NaN or inf"):
        lazy.X.compute()


# ---------------------------------------------------------------- log1p


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_log1p_lazy_same_as_in_memory_and_scanpy(case):
    memory, lazy, sc_lazy, _ = dask_pair(case)
    rsc.pp.log1p(memory, base=2)
    with count_computes() as c:
        rsc.pp.log1p(lazy, base=2)
    sc.pp.log1p(sc_lazy, base=2)
    assert c.computes == 0
    assert lazy.uns["log1p"] == {"base": 2}
    assert type(lazy.X._meta) is type(memory.X) and lazy.X.dtype == case[3]
    result = lazy.X.compute()
    np.testing.assert_array_equal(dense(result), dense(memory.X))
    assert_close(result, sc_lazy.X, case[3])


def test_log1p_array_integers_and_domain():
    x = sparse.csr_matrix(counts().astype(np.int32))
    lazy = as_dask(x, "empty")
    with count_computes() as c:
        got = rsc.pp.log1p(lazy)
    assert c.computes == 0 and got.dtype == np.float64 == sc.pp.log1p(as_dask(x)).dtype
    np.testing.assert_allclose(dense(got.compute()), np.log1p(x.toarray()), rtol=1e-12)
    bad = rsc.pp.log1p(as_dask(sparse.csr_matrix(counts() - 2)))  # lazy: the check runs per chunk
    with pytest.raises(ValueError, match="values below -1"):
        bad.compute()


# ---------------------------------------------------------------- filter_highly_variable and laziness


@pytest.mark.parametrize("copy", [False, True])
def test_filter_highly_variable_stays_lazy(copy):
    memory, lazy, _, _ = dask_pair(CASES[3])
    for a in (memory, lazy):
        a.var["highly_variable"] = np.arange(N_VARS) % 3 == 0
    expected = rsc.pp.filter_highly_variable(memory, copy=copy) or memory
    with count_computes() as c:
        got = rsc.pp.filter_highly_variable(lazy, copy=copy) or lazy
    assert c.computes == 0
    assert isinstance(got.X, da.Array) and len(got.X.chunks[1]) == 1 and got.X.chunks[0] == lazy.X.chunks[0]
    pd.testing.assert_frame_equal(got.var, expected.var)
    np.testing.assert_array_equal(computed(got.X), dense(expected.X))


def test_lazy_pipeline_triggers_no_computation():
    memory, lazy, _, _ = dask_pair(CASES[4])
    for a in (memory, lazy):
        a.var["highly_variable"] = np.arange(N_VARS) % 2 == 0
    counts_before = lazy.X
    with count_computes() as c, quiet():  # the in-memory call warns of the empty cells
        for a in (memory, lazy):
            rsc.pp.normalize_total(a, target_sum=1e4)
            rsc.pp.log1p(a)
            rsc.pp.filter_highly_variable(a)
    assert c.computes == 0
    np.testing.assert_array_equal(computed(lazy.X), dense(memory.X))
    np.testing.assert_array_equal(computed(counts_before), counts(CASES[4][3]))  # input chunks unchanged


# ---------------------------------------------------------------- bad input


def rebuilt(x, name: str, change_blocks, meta):
    """The row chunks of ``as_dask(csr_matrix(x))`` changed by ``change_blocks``, with ``meta``
    (dask's map_blocks would not keep a COO meta)."""
    csr = as_dask(sparse.csr_matrix(x))
    blocks = change_blocks([b.compute() for b in csr.to_delayed().ravel()])
    graph = {(name, i, 0): b for i, b in enumerate(blocks)}
    return da.Array(graph, name, chunks=csr.chunks, meta=meta)


def mixed_chunks(x):
    """A dask array whose meta is CSR but whose second chunk is dense."""
    return rebuilt(x, "mixed-chunks", lambda b: [b[0], b[1].toarray(), *b[2:]], sparse.csr_matrix((0, 0)))


def coo_chunks(x):
    return rebuilt(x, "coo-chunks", lambda b: [sparse.coo_array(c) for c in b], sparse.coo_array((0, 0)))


BAD_CHUNKS = {
    "csc": (lambda x: as_dask(sparse.csc_matrix(x)), TypeError, "chunks are CSC"),
    "gene split": (lambda x: as_dask(sparse.csr_matrix(x)).rechunk({1: 20}), ValueError, "split along genes"),
    "mixed types": (mixed_chunks, TypeError, "chunks are not all one type"),
    "coo": (coo_chunks, TypeError, "not supported"),
}
STEPS = {
    "calculate_qc_metrics": lambda a: rsc.pp.calculate_qc_metrics(a, percent_top=PERCENT_TOP, inplace=True),
    "filter_cells": lambda a: rsc.pp.filter_cells(a, min_genes=3),
    "filter_genes": lambda a: rsc.pp.filter_genes(a, min_cells=3),
    "normalize_total": lambda a: rsc.pp.normalize_total(a),
    "log1p": lambda a: rsc.pp.log1p(a),
}


@pytest.mark.parametrize("bad", list(BAD_CHUNKS))
@pytest.mark.parametrize("step", list(STEPS))
def test_bad_chunks_clear_error_and_adata_unchanged(step, bad):
    make, error, message = BAD_CHUNKS[bad]
    adata = annotated(make(counts()))
    x, obs, var = adata.X, adata.obs.copy(), adata.var.copy()
    if bad == "mixed types" and step == "log1p":
        STEPS[step](adata)  # lazy: the chunk that breaks the rule raises when computed
        with pytest.raises(error, match=message):
            adata.X.compute()
        return
    with pytest.raises(error, match=message):
        STEPS[step](adata)
    assert adata.X is x and "log1p" not in adata.uns
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)


# ---------------------------------------------------------------- GPU twins: cupyx CSR chunks


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=CASE_IDS[2:4])
def test_device_chunks_same_as_host_chunks(case):
    import cupyx.scipy.sparse as cpsparse

    _, host, _, _ = dask_pair(case)
    _, device, _, _ = dask_pair(case)
    device.X = device.X.map_blocks(cpsparse.csr_matrix, meta=cpsparse.csr_matrix((0, N_VARS), dtype=case[3]))
    for a in (host, device):
        rsc.pp.calculate_qc_metrics(a, qc_vars=["mt"], percent_top=PERCENT_TOP, inplace=True)
        rsc.pp.filter_cells(a, min_genes=3, inplace=False)
        rsc.pp.normalize_total(a, key_added="norm")
        rsc.pp.log1p(a)
    pd.testing.assert_frame_equal(device.obs, host.obs, check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(device.var, host.var, check_exact=False, rtol=1e-6)
    result = device.X.compute()
    assert isinstance(result, cpsparse.csr_matrix)
    assert_close(result.get(), host.X, case[3])
