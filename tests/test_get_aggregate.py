"""gpusc.get.aggregate against scanpy 1.12's get.aggregate run on an identical copy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import gpusc as rsc
from _compare import (
    assert_same_signature,
    assert_unchanged,
    assert_warns_like,
    dense,
    host_copy,
    is_device,
    make_pair,
    run_recording,
    snapshot,
)
from conftest import HOST_TYPES, read_real, synthetic_counts, to_device

FUNCS = ["count_nonzero", "sum", "median", "mean", "var"]
DTYPES = [np.float32, np.float64]


def labelled_obs(n_obs: int, seed: int = 0) -> pd.DataFrame:
    """Two categorical keys: ``cluster`` with an unused category ("e") and NaN cells, and
    ``batch``; and a boolean ``keep`` that masks every cell of cluster "c" out."""
    rng = np.random.default_rng(seed)
    cluster = rng.choice(np.array(["a", "b", "c", "d"]), n_obs)
    cluster_cat = pd.Categorical(cluster, categories=["d", "a", "b", "c", "e"])
    cluster_cat[rng.random(n_obs) < 0.05] = np.nan
    return pd.DataFrame(
        {"cluster": cluster_cat, "batch": pd.Categorical(rng.choice(["x", "y", "z"], n_obs)),
         "keep": cluster != "c"},
        index=[f"cell{i}" for i in range(n_obs)])


def run_both(ref, test, **kwargs):
    """scanpy on ``ref``, gpusc on ``test``: (scanpy's result, ours, scanpy's warnings, ours)."""
    expected, ref_warnings = run_recording(sc.get.aggregate, ref, **kwargs)
    got, got_warnings = run_recording(rsc.get.aggregate, test, **kwargs)
    return expected, got, ref_warnings, got_warnings


# Sums and means are float64 sums in both (other orders: a few ulps); variances come from
# Welford's update in scanpy and from the sums of squares here, which agree to ~1e-15 of
# mean**2 (measured below 1e-12 relative on these data); medians are the same algorithm.
RTOL = {"median": 0.0, "count_nonzero": 0.0}

# What scanpy 1.11's get.aggregate (Python 3.11) does differently; a test meeting one of them
# needs scanpy 1.12 as its oracle (conftest's scanpy_112 marker).
NAN_GROUPS_111 = ("cells whose `by` category is NaN make 1.11 raise 'negative axis 0 index: -1' "
                  "(1.12 leaves them out)")
N_OBS_111 = "1.11 writes no obs['n_obs_aggregated']"
MASK_111 = ("1.11's mean and var divide by the group sizes before the mask and its median "
            "ignores the mask")
VAR_111 = ("1.11's var is E[x²] - E[x]² (dense float32: squared in float32, up to 7e-9 "
           "relative off) and never warns 'Group counts matches dof'")
DTYPES_111 = ("1.11's count_nonzero of sparse input and sum of sparse integers are float64 "
              "(1.12: int64), and under a mask its count_nonzero and sums of float32 are float32")


def scanpy_112(*differences: str):
    return pytest.mark.scanpy_112("get.aggregate: " + "; ".join(differences))


def assert_like_scanpy(got, expected, *, device: bool = False):
    """Same obs, var, layer names in scanpy's order, dtypes and values."""
    pd.testing.assert_frame_equal(got.obs, expected.obs)
    pd.testing.assert_frame_equal(got.var, expected.var)
    assert list(got.layers) == list(expected.layers)
    for name, want in expected.layers.items():
        have = got.layers[name]
        assert is_device(have) == device, f"{name}: {type(have)}"
        assert have.dtype == want.dtype, f"{name}: dtype {have.dtype}, scanpy {want.dtype}"
        have = dense(have)
        if RTOL.get(name) == 0.0:
            np.testing.assert_array_equal(have, want, err_msg=name)
        else:
            scale = np.nanmax(np.abs(want)) if np.isfinite(want).any() else 1.0
            np.testing.assert_allclose(have, want, rtol=1e-10, atol=1e-12 * scale,
                                       equal_nan=True, err_msg=name)


def compare(ref, test, **kwargs):
    """Both on identical copies; ours leaves ``test`` unchanged, and its layers live where the
    aggregated matrix does."""
    source = (test.obsm[kwargs["obsm"]] if kwargs.get("obsm") else
              test.varm[kwargs["varm"]] if kwargs.get("varm") else
              test.layers[kwargs["layer"]] if kwargs.get("layer") else test.X)
    before = snapshot(test)
    expected, got, ref_warnings, got_warnings = run_both(ref, test, **kwargs)
    assert_like_scanpy(got, expected, device=is_device(source))
    if is_device(source):  # cupy's median of no rows does not warn as numpy's does
        assert_warns_like(ref_warnings, got_warnings, "Group counts matches dof")
    else:
        assert sorted(got_warnings) == sorted(ref_warnings)
    assert_unchanged(test, before)
    return got


def test_signature():
    assert_same_signature(rsc.get.aggregate, sc.get.aggregate)


# Each (format, dtype) makes scanpy's numba kernels compile anew (~1 s each, the bulk of this
# file's time): every format in both dtypes, a scipy sparse array (our path is the matrices')
# in one.
FORMATS = [(f, d) for f in ("dense", "csr_matrix", "csc_matrix", "cupy-dense", "cupy-csr_matrix",
                            "cupy-csc_matrix") for d in DTYPES]
FORMATS += [("csr_array", np.float32)]


def format_params():
    return [pytest.param(f, d, id=f"{f}-{np.dtype(d).name}",
                         marks=[pytest.mark.gpu] if f.startswith("cupy") else [])
            for f, d in FORMATS]


def maker(fmt):
    if fmt.startswith("cupy-"):
        host = HOST_TYPES[fmt.removeprefix("cupy-")]
        return lambda x: to_device(host(x))
    return HOST_TYPES[fmt]


@scanpy_112(NAN_GROUPS_111, N_OBS_111, MASK_111, VAR_111, DTYPES_111)
@pytest.mark.parametrize(("fmt", "dtype"), format_params())
def test_every_func_matches_scanpy(fmt, dtype):
    array_type = maker(fmt)
    # cluster: NaN cells, an unused category, a category first in the order but not the data
    x = synthetic_counts(300, 120, dtype=dtype, density=0.2, seed=1)
    x[:40] *= dtype(0.37)  # non-integer values, a few tied
    x[5, :60] = -x[5, :60]  # negative values below the implicit zeros of the medians
    obs = labelled_obs(300)
    ref, test = make_pair(x, array_type, obs=obs)
    compare(ref, test, by="cluster", func=FUNCS)
    compare(ref, test, by=["cluster", "batch"], func=FUNCS)
    compare(ref, test, by="batch", func="median")
    compare(ref, test, by="cluster", func=["sum", "mean"])
    # a masked-out group: NaN means without var, 0 with it; NaN variances with scanpy's warning
    compare(ref, test, by="cluster", func=FUNCS, mask="keep")
    compare(ref, test, by="cluster", func=["mean", "count_nonzero"], mask=obs["keep"].to_numpy())
    compare(ref, test, by="batch", func=["mean", "var"], dof=0)
    compare(ref, test, by="batch", func="var", dof=3)


@scanpy_112(N_OBS_111, NAN_GROUPS_111, MASK_111, VAR_111)
@pytest.mark.parametrize(("fmt", "dtype"), format_params()[:12])  # the scipy array: above
def test_axis_var_layer_obsm_varm(fmt, dtype):
    array_type = maker(fmt)
    x = synthetic_counts(150, 90, dtype=dtype, density=0.3, seed=2)
    rng = np.random.default_rng(3)
    var = pd.DataFrame({"module": pd.Categorical(rng.choice(["m1", "m2", "m3"], 90)),
                        "picked": rng.random(90) < 0.7}, index=[f"gene{j}" for j in range(90)])
    ref, test = make_pair(x, array_type, obs=labelled_obs(150, seed=4), var=var)
    half = array_type(x / 2)
    ref.layers["half"], test.layers["half"] = host_copy(half), half
    pca, loadings = rng.normal(size=(150, 5)).astype(dtype), rng.normal(size=(90, 4))
    frame = pd.DataFrame(rng.normal(size=(150, 2)), index=ref.obs_names, columns=["u", "v"])
    for a in (ref, test):
        a.obsm["X_pca"], a.obsm["frame"], a.varm["loadings"] = pca.copy(), frame.copy(), loadings.copy()
    compare(ref, test, by="module", func=FUNCS, axis="var")
    compare(ref, test, by="module", func=["sum", "var"], axis=1, mask="picked")
    compare(ref, test, by="cluster", func=FUNCS, layer="half")
    compare(ref, test, by="module", func=["mean", "median"], axis="var", layer="half")
    compare(ref, test, by="cluster", func=["mean", "var", "median"], obsm="X_pca")
    compare(ref, test, by="cluster", func="sum", obsm="frame")
    compare(ref, test, by="module", func=["mean", "count_nonzero"], varm="loadings")


@scanpy_112(NAN_GROUPS_111, N_OBS_111, DTYPES_111)
def test_integer_matrices():
    # scanpy: int64 sums and counts for sparse integers, float64 for dense ones, float64
    # medians; var (a float64 path here as for floats) left out: it costs scanpy two compiles
    x = synthetic_counts(120, 50, seed=5).astype(np.int64)
    obs = labelled_obs(120, seed=6)
    for make in (np.asarray, lambda a: sparse.csr_matrix(a.astype(np.int32))):
        ref, test = make_pair(x, make, obs=obs)
        compare(ref, test, by="cluster", func=["count_nonzero", "sum", "median", "mean"])


@scanpy_112(NAN_GROUPS_111, N_OBS_111, DTYPES_111)
def test_pbmc3k_louvain():
    # louvain has NaN cells (62 of 2,700); medians on 2,000 genes keep scanpy's time down
    adata = read_real("pbmc3k_counts_labeled.h5ad")
    compare(adata.copy(), adata, by="louvain", func=["count_nonzero", "sum", "mean", "var"])
    compare(adata.copy(), adata, by=["louvain", "seurat_cell_type"], func=["sum", "var"])
    genes = adata[:, :2000].copy()
    compare(genes.copy(), genes, by="seurat_cell_type", func="median")


@scanpy_112(N_OBS_111, MASK_111, DTYPES_111)
def test_kang2018_stim():
    adata = read_real("kang2018_pbmc_ctrl_stim_2000.h5ad")
    adata.X = adata.X.tocsc()
    mask = np.asarray(adata.X.sum(axis=1)).ravel() > np.median(np.asarray(adata.X.sum(axis=1)))
    compare(adata.copy(), adata, by="stim", func=["count_nonzero", "sum", "mean", "var"],
            mask=mask)
    genes = adata[:, :1500].copy()
    compare(genes.copy(), genes, by="stim", func=["median", "mean"])


# ---------------------------------------------------------------- bad input

@pytest.fixture
def small():
    return make_pair(synthetic_counts(40, 12, seed=7, empty_cols=(5,)), sparse.csr_matrix,
                     obs=labelled_obs(40))


@pytest.mark.parametrize(("kwargs", "error", "scanpy_says"), [
    (dict(by="nope", func="sum"), KeyError, "nope"),
    (dict(by=["cluster", "nope"], func="sum"), KeyError, "nope"),
    # by "batch" (no NaN cells): scanpy 1.11 checks func after grouping, where NaN cells raise
    (dict(by="batch", func="nope"), ValueError, "is not one of"),
    (dict(by="batch", func=["sum", "mode"]), ValueError, "is not one of"),
    (dict(by="cluster", func="sum", mask=np.ones(39, bool)), ValueError,
     "The shape of the mask do not match the data."),
    (dict(by="cluster", func="sum", mask="nope"), ValueError, "Did not find `adata.obs['nope']`"),
    (dict(by="cluster", func="sum", mask=np.ones(40)), ValueError, "Mask array must be boolean."),
    (dict(by="cluster", func="sum", layer="nope"), KeyError, "nope"),
    (dict(by="cluster", func="sum", axis=2), ValueError, "`axis` must be either"),
    (dict(by="cluster", func="sum", obsm="a", layer="b"), TypeError, "only provide one"),
    (dict(by="cluster", func="sum", axis="var", obsm="X"), ValueError, "obsm can only be used"),
    (dict(by="cluster", func="sum", varm="X", axis=0), ValueError, "varm can only be used"),
])
def test_bad_input_raises_like_scanpy(small, kwargs, error, scanpy_says):
    ref, test = small
    with pytest.raises(error, match=None) as scanpy_error:
        sc.get.aggregate(ref, **kwargs)
    assert scanpy_says in str(scanpy_error.value)
    before = snapshot(test)
    with pytest.raises(error) as ours:
        rsc.get.aggregate(test, **kwargs)
    assert scanpy_says in str(ours.value)
    assert_unchanged(test, before)


@pytest.mark.parametrize("func", [["sum"], ["median"], ["mean", "var"]])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_values_raise(small, func, bad):
    _, test = small
    test.X.data[3] = bad
    before = snapshot(test)
    with pytest.raises(ValueError, match="NaN or inf"):
        rsc.get.aggregate(test, by="cluster", func=func)
    assert_unchanged(test, before)


def test_not_an_anndata():
    with pytest.raises(NotImplementedError, match="only implemented for AnnData"):
        rsc.get.aggregate(np.zeros((3, 2)), by="a", func="sum")


def test_negative_dof(small):
    _, test = small
    with pytest.raises(ValueError, match="dof"):
        rsc.get.aggregate(test, by="cluster", func="var", dof=-1)


@pytest.mark.parametrize("fmt", ["dense float32", "csr float64", "csr int64"])
@pytest.mark.parametrize("chunks", ["uneven", "empty"])
def test_dask_layers_are_lazy_and_equal_in_memory(fmt, chunks):
    # as scanpy: a dask X gives lazy layers; computing them is one pass over the chunks, and
    # they equal the in-memory result (values and dtypes: scanpy's dask path makes the int64
    # sums/counts of sparse input float64, its in-memory path and ours keep int64) and scanpy's
    # dask values
    from _dask import as_dask, count_computes

    counts = synthetic_counts(60, 15, seed=3, empty_cols=(4,))
    x = {"dense float32": counts.astype(np.float32), "csr float64": sparse.csr_matrix(counts.astype(np.float64)),
         "csr int64": sparse.csr_matrix(counts.astype(np.int64))}[fmt]
    memory, _ = make_pair(x, lambda m: m, obs=labelled_obs(60))
    lazy = memory.copy()
    lazy.X = as_dask(x, chunks, index_dtype=np.int64 if sparse.issparse(x) else None)
    for func in (["sum", "mean", "count_nonzero"], ["var", "mean"]):
        with count_computes() as c:
            got = rsc.get.aggregate(lazy, by="cluster", func=func, mask="keep")
        assert c.computes == 0 and all(hasattr(v, "dask") for v in got.layers.values())
        with count_computes() as c:
            computed = dict(zip(got.layers, __import__("dask").compute(*got.layers.values())))
        assert c.computes == 1
        want = rsc.get.aggregate(memory, by="cluster", func=func, mask="keep")
        assert list(got.layers) == list(want.layers)
        pd.testing.assert_frame_equal(got.obs, want.obs)
        for name, have in computed.items():
            assert have.dtype == want.layers[name].dtype, name
            np.testing.assert_array_equal(have, want.layers[name], err_msg=name)
        theirs = sc.get.aggregate(lazy, by="cluster", func=func, mask="keep")
        for name, have in computed.items():
            np.testing.assert_allclose(have, theirs.layers[name].compute(), rtol=1e-12, err_msg=name)


def test_dask_median_and_axis_var_are_refused_as_scanpy(small):
    from _dask import as_dask

    _, test = small
    test.X = x = as_dask(test.X)
    obs = test.obs.copy()
    with pytest.raises(NotImplementedError) as ours:
        rsc.get.aggregate(test, by="cluster", func=["sum", "median"])
    with pytest.raises(NotImplementedError) as theirs:
        sc.get.aggregate(test.copy(), by="cluster", func=["sum", "median"]).layers["median"].compute()
    assert theirs.value.args[0] in ours.value.args[0]
    with pytest.raises(NotImplementedError, match="axis='var' on a dask array"):
        rsc.get.aggregate(test, by="cluster", func="sum", axis="var")
    assert test.X is x
    pd.testing.assert_frame_equal(test.obs, obs)