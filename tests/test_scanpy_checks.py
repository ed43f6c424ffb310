"""Where gpusc differed from scanpy 1.12 when called as scanpy's own tests call scanpy: dtypes,
warnings, errors, deprecated arguments and edge cases. scanpy runs on an identical copy and is
the oracle; one test per finding. Where gpusc deliberately raises and scanpy does not, the test
shows what scanpy does instead."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from _compare import adata_of, assert_unchanged, quiet, snapshot
from scipy import sparse

import gpusc

# scanpy's tests' small PCA matrix (tests/test_pca.py)
A_LIST = np.array([
    [0, 0, 7, 0, 0],
    [8, 5, 0, 2, 0],
    [6, 0, 0, 2, 5],
    [0, 0, 0, 1, 0],
    [8, 8, 2, 1, 0],
    [0, 0, 0, 4, 5],
], dtype=np.float32)


def counts(n_obs=60, n_vars=30, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.poisson(1.0, (n_obs, n_vars)).astype(dtype)


def recorded(fn, *args, **kwargs):
    """(result or the exception, [(category name, message)] of the warnings raised)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            out = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - compared with scanpy's
            out = err
    return out, [(w.category.__name__, str(w.message)) for w in rec]


def relevant(msgs, *needles):
    return sorted(m for m in msgs if any(n in m[1] for n in needles))


# ---------------------------------------------------------------- calculate_qc_metrics


QC_FLOAT32_112 = pytest.mark.scanpy_112(
    "scanpy 1.11's calculate_qc_metrics gives float64 mean_counts for float32 X (1.12: float32)")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, bool, pytest.param(np.float32, marks=QC_FLOAT32_112),
                                   np.float64])
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_qc_dtypes_and_values_like_scanpy(dtype, fmt):
    """scanpy: integer totals (numpy's sum dtype: int64, uint64 for unsigned) and float64
    means/percentages/log1p for integer and bool X. gpusc gave float32 columns."""
    x = counts().astype(dtype)
    x = sparse.csr_matrix(x) if fmt == "csr" else x
    adata = ad.AnnData(x)
    adata.var["mt"] = np.arange(adata.n_vars) < 5
    # scanpy's own top-n kernel does not compile for bool CSR: percent_top only elsewhere
    top = None if (dtype is bool and fmt == "csr") else (5, 10)
    ref = sc.pp.calculate_qc_metrics(adata.copy(), qc_vars=["mt"], percent_top=top)
    got = gpusc.pp.calculate_qc_metrics(adata.copy(), qc_vars=["mt"], percent_top=top)
    for r, g in zip(ref, got, strict=True):
        assert list(g.columns) == list(r.columns)
        for col in r.columns:
            assert g[col].dtype == r[col].dtype, f"{col}: {g[col].dtype}, scanpy {r[col].dtype}"
            np.testing.assert_allclose(g[col].to_numpy(np.float64), r[col].to_numpy(np.float64),
                                       rtol=1e-12, err_msg=col)


# ---------------------------------------------------------------- views, deprecated arguments


def _pearson_hvg(m):
    return sc.experimental.pp.highly_variable_genes if m is sc else gpusc.pp.highly_variable_genes_pearson_residuals


def _pearson_norm(m):
    return sc.experimental.pp.normalize_pearson_residuals if m is sc else gpusc.pp.normalize_pearson_residuals


VIEW_CALLS = {
    "normalize_total": lambda m, a: m.pp.normalize_total(a),
    "normalize_total_not_inplace": lambda m, a: m.pp.normalize_total(a, inplace=False),
    "log1p": lambda m, a: m.pp.log1p(a),
    "scale": lambda m, a: m.pp.scale(a),
    "regress_out": lambda m, a: m.pp.regress_out(a, "k"),
    "regress_out_strings": lambda m, a: m.pp.regress_out(a, "k"),
    "hvg": lambda m, a: m.pp.highly_variable_genes(a),
    "hvg_seurat_v3": lambda m, a: m.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=10),
    "hvg_batch": lambda m, a: m.pp.highly_variable_genes(a, batch_key="b"),
    "normalize_pearson_residuals": lambda m, a: _pearson_norm(m)(a),
    "pearson_hvg_not_inplace": lambda m, a: _pearson_hvg(m)(a, n_top_genes=10, inplace=False),
}


@pytest.mark.parametrize("call", list(VIEW_CALLS))
def test_view_warns_like_scanpy(call):
    """scanpy: "Received a view of an AnnData. Making a copy." (UserWarning) in
    normalize_total, regress_out, log1p, scale and the Pearson functions, anndata's
    ImplicitModificationWarning where it writes to the view (hvg). gpusc made views actual
    silently."""
    base = ad.AnnData(counts())
    base.obs["k"] = np.random.default_rng(1).random(base.n_obs)
    base.obs["b"] = pd.Categorical(np.repeat(["a", "b"], base.n_obs // 2))
    results = []
    for m in (sc, gpusc):
        view = base[:50]
        if call == "regress_out_strings":  # a string column: scanpy's sanitize_anndata writes obs
            view = base.copy()
            view.obs["s"] = "x"
            view = view[:50]
        _, msgs = recorded(VIEW_CALLS[call], m, view)
        results.append((relevant(msgs, "view", "View"), view.is_view))
    assert results[1] == results[0]


def test_regress_out_and_batched_hvg_make_strings_categorical_like_scanpy():
    """scanpy's sanitize_anndata turns string obs columns into categoricals in regress_out and
    in highly_variable_genes with batch_key (even with inplace=False)."""
    for call in (lambda m, a: m.pp.regress_out(a, "k"),
                 lambda m, a: m.pp.highly_variable_genes(a, batch_key="b", inplace=False)):
        dtypes = []
        for m in (sc, gpusc):
            adata = ad.AnnData(counts())
            adata.obs["k"] = np.random.default_rng(1).random(adata.n_obs)
            adata.obs["b"] = np.repeat(["a", "b"], adata.n_obs // 2)
            with quiet():
                call(m, adata)
            dtypes.append(adata.obs.dtypes.astype(str).to_dict())
        assert dtypes[1] == dtypes[0]


OLD_CALLS = {
    "log1p(X=)": lambda m: m.pp.log1p(X=counts()),
    "scale(X=)": lambda m: m.pp.scale(X=counts()),
    "scale positional": lambda m: m.pp.scale(ad.AnnData(counts()), False),
    "normalize_total positional": lambda m: m.pp.normalize_total(ad.AnnData(counts()), 1e4),
    "filter_cells positional": lambda m: m.pp.filter_cells(ad.AnnData(counts()), 1),
    "filter_genes positional": lambda m: m.pp.filter_genes(ad.AnnData(counts()), None, 1),
    "hvg positional": lambda m: m.pp.highly_variable_genes(ad.AnnData(np.log1p(counts())), None, 10),
    "regress_out positional": lambda m: m.pp.regress_out(
        ad.AnnData(counts(), obs=pd.DataFrame({"k": np.arange(60.0)}, index=[str(i) for i in range(60)])),
        "k", None),
}


@pytest.mark.parametrize("call", list(OLD_CALLS))
def test_deprecated_arguments_warn_like_scanpy(call):
    """scanpy accepts ``X=`` (renamed ``data``) and its formerly positional parameters with a
    FutureWarning; gpusc raised a TypeError."""
    ref, ref_msgs = recorded(OLD_CALLS[call], sc)
    got, got_msgs = recorded(OLD_CALLS[call], gpusc)
    assert not isinstance(ref, Exception) and not isinstance(got, Exception), (ref, got)
    future = [m for m in ref_msgs if m[0] == "FutureWarning"]
    assert future and [m for m in got_msgs if m[0] == "FutureWarning"] == future


def test_deprecation_warning_points_at_the_caller():
    with pytest.warns(FutureWarning, match=r"argument `X` was renamed to `data`") as rec:
        gpusc.pp.log1p(X=counts())
    assert rec[0].filename == __file__


def test_nested_warning_points_at_the_caller():
    """A warning raised two gpusc frames down (and under legacy_api_wrap's wrapper) names the
    caller's line, on Python 3.11 too, which has no skip_file_prefixes."""
    adata = ad.AnnData(counts())
    with pytest.warns(UserWarning, match="Received a view of an AnnData") as rec:
        gpusc.pp.normalize_total(adata[:30], target_sum=1e4)
    assert rec[0].filename == __file__


# ---------------------------------------------------------------- pca


PCA_SOLVERS = [None, "auto", "full", "arpack", "randomized", "covariance_eigh", "lobpcg", "tsqr"]


@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize(("zero_center", "chunked"), [(True, False), (False, False), (True, True)])
def test_pca_solver_warnings_like_scanpy(fmt, zero_center, chunked):
    """scanpy warns "Ignoring svd_solver=... and using ..." where its estimator does not take
    the name, and gives a FutureWarning for lobpcg with sparse input; gpusc warned differently
    (and not at all for sparse 'randomized', 'auto', 'full')."""
    for solver in PCA_SOLVERS:
        out = []
        for m in (sc, gpusc):
            x = sparse.csr_matrix(A_LIST) if fmt == "csr" else A_LIST.copy()
            result, msgs = recorded(m.pp.pca, ad.AnnData(x), 3, svd_solver=solver,
                                    zero_center=zero_center, chunked=chunked, chunk_size=3)
            assert not isinstance(result, Exception), result
            out.append(sorted(w for w in msgs if w[0] in ("UserWarning", "FutureWarning")
                              and "LOBPCG" not in w[1]))  # scipy's, from scanpy's lobpcg
        assert out[1] == out[0], solver


def test_pca_unknown_solver_raises():
    """scanpy warns and runs its default solver for a name it does not know; gpusc raises,
    naming the valid ones, before anything changes (a typo must not pick another solver)."""
    with pytest.warns(UserWarning, match=r"Ignoring svd_solver='arpak'"):
        sc.pp.pca(ad.AnnData(A_LIST.copy()), 3, svd_solver="arpak")
    adata = ad.AnnData(A_LIST.copy())
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"unknown svd_solver='arpak'.*'arpack'.*'randomized'"):
        gpusc.pp.pca(adata, 3, svd_solver="arpak")
    assert_unchanged(adata, before)


PCA_ERRORS = {
    "n_comps above min": dict(n_comps=100),
    "n_comps at min (arpack)": dict(n_comps=20),
    "n_comps negative": dict(n_comps=-1),
    "n_comps above n_vars (TruncatedSVD)": dict(n_comps=40, zero_center=False),
    "mask_var missing": dict(mask_var="nope"),
    "mask_var length": dict(mask_var=np.ones(31, bool)),
    "mask_var not bool": dict(mask_var="number"),
    "use_highly_variable missing": dict(use_highly_variable=True),
    "use_highly_variable and mask_var": dict(use_highly_variable=True, mask_var="even"),
    "obsm and mask_var": dict(obsm="emb", mask_var="even"),
    "layer and chunked": dict(layer="counts", chunked=True),
}
PCA_ERRORS_112 = {
    "obsm and mask_var": "scanpy 1.11's pca has no obsm parameter",
    "layer and chunked": "scanpy 1.11 says 'Cannot use `layer` and `chunked`' (1.12: '`layer`/`obsm`')",
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.scanpy_112(PCA_ERRORS_112[c]))
                                  if c in PCA_ERRORS_112 else c for c in PCA_ERRORS])
def test_pca_errors_like_scanpy(case):
    """scanpy's (and scikit-learn's) messages, within gpusc's, for the same bad arguments."""
    def make():
        adata = ad.AnnData(counts(20, 30))
        adata.var["even"] = np.arange(30) % 2 == 0
        adata.var["number"] = np.arange(30.0)
        adata.layers["counts"] = adata.X.copy()
        adata.obsm["emb"] = np.ones((20, 3))
        return adata

    ref, ref_msgs = recorded(sc.pp.pca, make(), **PCA_ERRORS[case])
    adata = make()
    before = snapshot(adata)
    got, got_msgs = recorded(gpusc.pp.pca, adata, **PCA_ERRORS[case])
    # scanpy's InvalidParameterError is a ValueError (and a TypeError): a ValueError here
    assert isinstance(ref, Exception) and isinstance(got, ValueError if isinstance(ref, ValueError) else type(ref))
    assert str(ref).strip("'\"") in str(got), (str(ref), str(got))
    assert relevant(got_msgs, "use_highly_variable") == relevant(ref_msgs, "use_highly_variable")
    assert_unchanged(adata, before)


@pytest.mark.parametrize(("fmt", "zero_center"), [("dense", True), ("dense", False), ("csr", False)])
def test_pca_random_state_matters_for_randomized_solver(fmt, zero_center):
    """Randomized solver: the same seed gives the same bits, another seed (slightly) other
    results, both as close to scanpy's randomized PCA as its own seeds are to each other."""
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, (300, 120)).astype(np.float64)
    x = sparse.csr_matrix(x) if fmt == "csr" else x

    def run(m, seed):
        return m.pp.pca(x.copy(), 10, svd_solver="randomized", zero_center=zero_center,
                        random_state=seed, return_info=True, dtype="float64")

    a, b, c = run(gpusc, 42), run(gpusc, 42), run(gpusc, 0)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    # the oracle: scanpy's exact solver (its randomized one stops after a few power iterations
    # and is 1% off on the trailing variances of this flat spectrum, measured); ours iterates
    # until the singular values settle
    with quiet():
        ref = sc.pp.pca(x.copy(), 10, svd_solver="arpack", zero_center=zero_center,
                        return_info=True, dtype="float64")
    for got in (a, c):
        np.testing.assert_allclose(got[3], ref[3], rtol=1e-6)
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-6)


def test_pca_sparse_randomized_is_scanpys_arpack():
    """scanpy ignores 'randomized' for centred sparse input (warning) and runs ARPACK, the
    exact PCA (scanpy's test_pca_transform_randomized); gpusc ran its randomized solver."""
    x = sparse.csr_matrix(A_LIST)
    with pytest.warns(UserWarning, match=r"Ignoring svd_solver='randomized' and using arpack"):
        got = gpusc.pp.pca(x, 4, svd_solver="randomized", random_state=14, dtype="float64")
    with quiet():
        ref = sc.pp.pca(x, 4, svd_solver="randomized", random_state=14, dtype="float64")
    # scanpy's ARPACK runs in float32 here: 3.9e-6 off the exact values at most (measured);
    # scanpy's own test allows a norm of 2e-5
    np.testing.assert_allclose(np.abs(got), np.abs(ref), atol=1e-5)


def test_pca_sparse_equals_dense_at_rtol_1e7():
    """scanpy's test_pca_sparse: implicitly centred sparse PCA equals dense PCA at rtol 1e-7,
    tiny loadings included. gpusc left rounding residue (1e-17..1e-48, different in the two
    paths) in the loadings of genes that are 0 in every cell; they are exactly 0 now. (scanpy's
    own two paths differ by up to 1.3e-16 there, measured on this data: its test passes on
    its data, where no selected gene is 0 in all of the 200 cells.)"""
    rng = np.random.default_rng(3)
    x = sparse.random(200, 300, density=0.1, format="csr", random_state=rng, dtype=np.float64)
    x.data = np.log1p(x.data * 10)
    x = x[:, 40:]
    x = sparse.hstack([sparse.csr_matrix((200, 40)), x], format="csr")  # genes without counts
    implicit = gpusc.pp.pca(ad.AnnData(x.copy()), dtype=np.float64, copy=True)
    explicit = gpusc.pp.pca(ad.AnnData(x.toarray()), dtype=np.float64, copy=True)
    for key in ("variance", "variance_ratio"):
        np.testing.assert_allclose(implicit.uns["pca"][key], explicit.uns["pca"][key], rtol=1e-7)
    np.testing.assert_allclose(implicit.obsm["X_pca"], explicit.obsm["X_pca"], rtol=1e-7)
    np.testing.assert_allclose(implicit.varm["PCs"], explicit.varm["PCs"], rtol=1e-7)
    assert np.all(implicit.varm["PCs"][:40] == 0) and np.all(explicit.varm["PCs"][:40] == 0)
    with quiet():
        ref = sc.pp.pca(ad.AnnData(x.toarray()), dtype=np.float64, copy=True)
    np.testing.assert_allclose(implicit.uns["pca"]["variance"], ref.uns["pca"]["variance"], rtol=1e-10)
    np.testing.assert_allclose(np.abs(implicit.varm["PCs"]), np.abs(ref.varm["PCs"]), atol=1e-9)


def test_pca_n_comps_min_dim_with_randomized_like_scanpy():
    """scanpy's randomized and full solvers take n_comps = min(n_obs, n_vars); gpusc allowed
    at most min - 1 whatever the solver."""
    x = np.random.default_rng(1).random((20, 8))
    for solver in ("randomized", "full"):
        with quiet():
            ref = sc.pp.pca(x, 8, svd_solver=solver, return_info=True, dtype="float64")
        got = gpusc.pp.pca(x, 8, svd_solver=solver, return_info=True, dtype="float64")
        np.testing.assert_allclose(np.abs(got[0]), np.abs(ref[0]), atol=1e-10)
        np.testing.assert_allclose(got[3], ref[3], rtol=1e-10)


# ---------------------------------------------------------------- log1p


def test_log1p_backed_chunked_like_scanpy(tmp_path):
    """scanpy's test_log1p: a backed AnnData (X an HDF5 dataset, mode r+) with chunked=True is
    transformed chunk by chunk in the file; gpusc raised a TypeError."""
    x = np.random.default_rng(0).random((200, 10)).astype(np.float32)
    results = []
    for m, name in ((sc, "ref"), (gpusc, "test")):
        adata = ad.AnnData(x.copy())
        with quiet():
            adata.filename = tmp_path / f"{name}.h5ad"
        with pytest.raises(NotImplementedError, match=r"log1p is not implemented for matrices of "
                                                      r"type .*h5py.*without `chunked=True`"):
            m.pp.log1p(adata)
        m.pp.log1p(adata, chunked=True, chunk_size=64)
        results.append(adata.X[:])
        assert adata.uns["log1p"] == {"base": None}
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_backed_normalize_total_and_qc_read_the_file_chunk_by_chunk(tmp_path, fmt):
    """A backed AnnData (issue 11): normalize_total works where scanpy's does (dense on disk:
    scanpy reads X into memory) and also on CSR on disk (scanpy fails); QC metrics work on both
    (scanpy 1.12 fails on both). Oracle: scanpy on the same data in memory. 13,000 cells: three
    chunks of 6,000 rows."""
    from scipy import sparse

    x = np.random.default_rng(1).poisson(0.4, (13_000, 30)).astype(np.float32)
    x[5] = 0  # an empty cell
    memory = ad.AnnData(sparse.csr_matrix(x) if fmt == "csr" else x)
    memory.var["mt"] = np.arange(30) < 3
    memory.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    gpusc.pp.calculate_qc_metrics(backed, qc_vars=["mt"], percent_top=(5, 10), inplace=True)
    with quiet():
        sc.pp.calculate_qc_metrics(memory, qc_vars=["mt"], percent_top=(5, 10), inplace=True)
    pd.testing.assert_frame_equal(backed.obs, memory.obs, check_dtype=False, rtol=1e-6)
    pd.testing.assert_frame_equal(backed.var, memory.var, check_dtype=False, rtol=1e-6)
    with pytest.warns(UserWarning, match="Some cells have zero counts"):
        gpusc.pp.normalize_total(backed, key_added="factor")
    with quiet():
        sc.pp.normalize_total(memory, key_added="factor")
    got = backed.X.toarray() if sparse.issparse(backed.X) else backed.X
    want = memory.X.toarray() if sparse.issparse(memory.X) else memory.X
    assert isinstance(got, np.ndarray)  # in memory afterwards, as scanpy leaves a backed X
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(backed.obs["factor"], memory.obs["factor"], rtol=1e-6)


def test_log1p_chunked_layer_and_array_arguments_like_scanpy():
    adata = ad.AnnData(counts(), layers={"c": counts()})
    for m in (sc, gpusc):
        with pytest.raises(NotImplementedError, match="Currently cannot perform chunked operations"):
            m.pp.log1p(adata.copy(), chunked=True, layer="c")
    with pytest.raises(TypeError, match=r"Arguments \['chunked'\] are only valid if an AnnData"):
        gpusc.pp.log1p(counts(), chunked=True)
    with pytest.raises(TypeError):  # scanpy's array path has no such argument either
        sc.pp.log1p(counts(), chunked=True)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_log1p_below_minus_one_raises(fmt):
    """scanpy writes NaN (numpy's RuntimeWarning) for values below -1; gpusc raises first."""
    x = counts()
    x[3, 4] = -2
    x = sparse.csr_matrix(x) if fmt == "csr" else x
    ref = sc.pp.log1p(x.copy(), copy=True)
    assert np.isnan(ref[3, 4])
    adata = ad.AnnData(x)
    before = snapshot(adata)
    with pytest.raises(ValueError, match="below -1"):
        gpusc.pp.log1p(adata)
    assert_unchanged(adata, before)
    with pytest.raises(ValueError, match="below -1"):
        gpusc.pp.log1p(x)


# ---------------------------------------------------------------- scale


def test_scale_obsm_writes_var_like_scanpy():
    """scanpy's check_rep_results: scaling an obsm entry (one column per gene) writes the
    columns' mean and std into var, as for X or a layer; gpusc wrote nothing."""
    x = counts()
    out = []
    for m in (sc, gpusc):
        adata = ad.AnnData(np.zeros_like(x), obsm={"o": x.copy()})
        m.pp.scale(adata, obsm="o")
        out.append(adata)
    pd.testing.assert_frame_equal(out[1].var, out[0].var, rtol=1e-10)
    np.testing.assert_allclose(out[1].obsm["o"], out[0].obsm["o"], rtol=1e-5, atol=1e-6)


def test_scale_obsm_of_other_width_raises_before_any_change():
    """scanpy scales the entry, then fails writing its mean into var (pandas' length error),
    leaving a half-done AnnData; gpusc raises that error first."""
    def make():
        return ad.AnnData(counts(), obsm={"o": counts(60, 4)})

    with pytest.raises(ValueError, match="Length of values"):
        sc.pp.scale(make(), obsm="o")
    adata = make()
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"Length of values \(4\) does not match length of index \(30\)"):
        gpusc.pp.scale(adata, obsm="o")
    assert_unchanged(adata, before)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_scale_without_genes_like_scanpy(fmt):
    """A matrix with no genes left (scanpy's recipe_seurat on data where its HVG selection keeps
    none) is scaled to itself; gpusc raised 'the matrix is empty'."""
    x = np.zeros((6, 0), np.float32)
    out = []
    for m in (sc, gpusc):
        adata = ad.AnnData(sparse.csr_matrix(x) if fmt == "csr" else x.copy())
        _, msgs = recorded(m.pp.scale, adata)
        out.append((type(adata.X), adata.X.shape, adata.X.dtype, list(adata.var.columns), msgs))
    assert out[1] == out[0]


def test_recipe_seurat_with_gpusc_steps(monkeypatch):
    """scanpy's test_recipe_plotting with gpusc's steps: the recipe's HVG filter keeps no gene,
    and the scale after it must not fail."""
    x = np.random.default_rng(0).integers(0, 1000, (250, 250)).astype(np.float32)
    with quiet():
        ref = sc.pp.recipe_seurat(ad.AnnData(x.copy()), copy=True)
        for name in ("filter_cells", "filter_genes", "log1p", "scale"):
            monkeypatch.setattr(sc.pp, name, getattr(gpusc.pp, name))
        got = sc.pp.recipe_seurat(ad.AnnData(x.copy()), copy=True)
    assert got.shape == ref.shape == (250, 0)
    assert list(got.var.columns) == list(ref.var.columns)


MASK_ERRORS = {
    "string without AnnData": (lambda m: m.pp.scale(counts(), mask_obs="m"), r"Cannot refer to mask"),
    "missing column": (lambda m: m.pp.scale(ad.AnnData(counts()), mask_obs="m"), r"Did not find `adata\.obs\['m'\]`"),
    "wrong length": (lambda m: m.pp.scale(ad.AnnData(counts()), mask_obs=np.ones(3, bool)), r"shape of the mask"),
}


@pytest.mark.parametrize("case", list(MASK_ERRORS))
def test_scale_mask_errors_like_scanpy(case):
    call, pattern = MASK_ERRORS[case]
    for m in (sc, gpusc):
        with pytest.raises(ValueError, match=pattern):
            call(m)


# ---------------------------------------------------------------- filter, hvg


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_filter_counts_positive_values_like_scanpy(fmt):
    """scanpy's filter_genes/filter_cells count values > 0 as expressed (non-zero ones
    before): with negative values (scaled data) gpusc kept other genes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 30))
    x[rng.random(x.shape) < 0.5] = 0
    x = sparse.csr_matrix(x) if fmt == "csr" else x
    for fn, kw in ((sc.pp.filter_genes, dict(min_cells=5)), (sc.pp.filter_cells, dict(min_genes=5))):
        ref = fn(x, **kw)
        got = getattr(gpusc.pp, fn.__name__)(x, **kw)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        assert got[1].dtype == ref[1].dtype


def test_hvg_batches_consistent_like_scanpy():
    """scanpy's test_batches: the batched cell_ranger dispersions are the mean of the per-batch
    ones computed after filter_genes(min_cells=1). gpusc's filter_genes kept genes with only
    negative values, so its per-batch results differed (by 0.014 at gene 100)."""
    adata = sc.datasets.pbmc68k_reduced()  # ships with scanpy: scaled data, negative values
    adata.X[:100, :100] = 0
    adata.obs["batch"] = ["0" if i < 100 else "1" for i in range(adata.n_obs)]
    batch_0 = adata[adata.obs["batch"] == "0"].copy()
    kept = []
    for m in (sc, gpusc):
        b0 = batch_0.copy()
        m.pp.filter_genes(b0, min_cells=1)
        kept.append(b0.var_names.tolist())
    assert kept[1] == kept[0]

    gpusc.pp.highly_variable_genes(adata, batch_key="batch", flavor="cell_ranger", n_top_genes=200)
    hvg = []
    for batch in ("0", "1"):
        part = adata[adata.obs["batch"] == batch].copy()
        gpusc.pp.filter_genes(part, min_cells=1)
        hvg.append(gpusc.pp.highly_variable_genes(part, flavor="cell_ranger", n_top_genes=200,
                                                  inplace=False))
    np.testing.assert_allclose(adata.var["dispersions_norm"].iat[100],
                               0.5 * hvg[0]["dispersions_norm"].iat[0] + 0.5 * hvg[1]["dispersions_norm"].iat[100],
                               rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(adata.var["dispersions_norm"].iat[0],
                               0.5 * hvg[1]["dispersions_norm"].iat[0], rtol=1e-7, atol=1e-7)


@pytest.mark.scanpy_112("scanpy 1.11's warning names no numbers: '`n_top_genes` > number of normalized "
                        "dispersions' (1.12: '`n_top_genes` (=30) > number of normalized dispersions (=21)')")
def test_cell_ranger_n_top_genes_warning_like_scanpy():
    """scanpy warns that n_top_genes exceeds the normalized dispersions, and nothing else;
    gpusc also let numpy's RuntimeWarning (a bin's zero MAD) escape."""
    x = np.random.default_rng(0).poisson(2, (100, 30))
    out = []
    for m in (sc, gpusc):
        adata = ad.AnnData(x.copy())
        with quiet():
            sc.pp.normalize_total(adata)
            sc.pp.log1p(adata)
        _, msgs = recorded(m.pp.highly_variable_genes, adata, n_top_genes=1000, flavor="cell_ranger")
        out.append(msgs)
    assert out[1] == out[0]
    assert any("returning all genes with normalized dispersions" in m for _, m in out[1])


def test_seurat_v3_loess_failure_like_scanpy():
    """Almost empty counts: too few genes with a variance for scikit-misc's loess. scanpy
    1.12 fails with skmisc's ValueError (there is no retry in scanpy; its own
    test_seurat_v3_degenerate passes only because its int64 variances overflow to negative
    values, so no gene is fitted); gpusc raises the same error, explained."""
    x = sparse.random(10, 1000, density=0.001, format="csr", random_state=0)
    x.data = np.ceil(x.data * 100)
    adata = ad.AnnData(x.astype(np.int64))
    with pytest.raises(ValueError) as ref:
        sc.pp.highly_variable_genes(adata.copy(), flavor="seurat_v3")
    before = snapshot(adata)
    with pytest.raises(ValueError, match="loess could not fit") as got:
        gpusc.pp.highly_variable_genes(adata, flavor="seurat_v3")
    assert str(ref.value) in str(got.value)
    assert_unchanged(adata, before)


def test_pearson_hvg_negative_counts_raise():
    """scanpy warns ("expects raw count data") and ranks NaN residual variances; gpusc raises,
    with scanpy's words, before any change."""
    x = counts(seed=4, dtype=np.float64)
    x[0, np.flatnonzero(x[0])[0]] = -1
    with pytest.warns(UserWarning, match="expects raw count data"):
        sc.experimental.pp.highly_variable_genes(adata_of(x), n_top_genes=10)
    adata = adata_of(x)
    before = snapshot(adata)
    for check_values in (True, False):
        with pytest.raises(ValueError, match=r"`flavor='pearson_residuals'` expects raw count data.*negative"):
            gpusc.pp.highly_variable_genes_pearson_residuals(adata, n_top_genes=10, check_values=check_values)
    assert_unchanged(adata, before)


ERRORS = {
    "filter_cells two thresholds": lambda m: m.pp.filter_cells(ad.AnnData(counts()), min_genes=1, min_counts=2),
    "normalize_total max_fraction": lambda m: m.pp.normalize_total(ad.AnnData(counts()), max_fraction=2),
    "qc percent_top": lambda m: m.pp.calculate_qc_metrics(ad.AnnData(counts()), percent_top=[100]),
    "hvg without AnnData": lambda m: m.pp.highly_variable_genes(counts()),
    "hvg unknown flavor": lambda m: m.pp.highly_variable_genes(ad.AnnData(counts()), flavor="nope"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_messages_contain_scanpys(case):
    with pytest.raises(Exception) as ref:  # the class is compared below
        ERRORS[case](sc)
    with pytest.raises(type(ref.value)) as got:
        ERRORS[case](gpusc)
    assert str(ref.value).strip("'\"") in str(got.value)
