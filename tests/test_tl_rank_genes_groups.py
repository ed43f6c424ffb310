"""tl.rank_genes_groups and tl.filter_rank_genes_groups against scanpy 1.12 (the oracle, run on
an identical copy): pbmc3k (obs ``louvain``, with unlabelled cells) and kang2018 (``stim``)
after normalize_total + log1p, and seeded synthetic data in every host array type (the
``array_type`` fixture adds GPU-marked device twins).

What is compared: the uns structure (keys in scanpy's order, record names and dtypes, pts
frames), the gene ranking per group, and per gene its score, p-value, corrected p-value, log
fold change and fractions. Tolerances (measured on these data):
  scores (float32 as stored): wilcoxon equal to the last bit (exact rank sums, scanpy's
    arithmetic); t-tests from float64 moments (sums of squares, scanpy: Welford), measured
    equal after the float32 rounding: rtol 1e-6 (one float32 ulp).
  pvals, pvals_adj (float64): wilcoxon equal; t-tests measured up to 9e-11 relative (scipy's
    t distribution amplifies the 1e-13 score difference at tiny p): rtol 1e-8.
  logfoldchanges (float32): measured equal; rtol 1e-6.
Rankings: identical, except inside blocks of exactly tied scores, where scanpy's order comes
from its sort of float64 scores whose last bits differ from ours. The count of such positions
is asserted small where ties are rare and explained where they are not.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scanpy.logging
from _compare import (
    assert_same_signature,
    assert_unchanged,
    scanpy_float64_input,
    snapshot,
)
from conftest import read_real, skip_unless_scanpy_112
from scipy import sparse

import gpusc
from gpusc.tl import _rank_genes_groups

KEY = "rank_genes_groups"


def _scanpy(adata, *args, **kwargs):
    ref = adata.copy()
    if kwargs.get("method") in (None, "t-test", "t-test_overestim_var"):
        # scanpy 1.11's t-test moments sum float32 in float32: it gets float64 copies
        ref.X = scanpy_float64_input(ref.X)
        for name in [n for n in ref.layers if n is not None]:  # anndata 0.13 lists X as None
            ref.layers[name] = scanpy_float64_input(ref.layers[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(ref, *args, **kwargs)
    return ref


def _gpusc(adata, *args, **kwargs):
    got = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpusc.tl.rank_genes_groups(got, *args, **kwargs)
    return got


def assert_like_scanpy(got, ref, key=KEY, *, exact=False, score_rtol=1e-6, p_rtol=1e-8) -> int:
    """got.uns[key] has scanpy's structure and values; returns the number of ranked positions
    whose gene differs from scanpy's (each inside a block of equal scores)."""
    g, r = got.uns[key], ref.uns[key]
    assert list(g) == list(r), f"uns keys {list(g)} != scanpy {list(r)}"
    assert g["params"] == r["params"]
    for frame in ("pts", "pts_rest"):
        if frame in r:
            pd.testing.assert_index_equal(g[frame].index, r[frame].index)
            pd.testing.assert_index_equal(g[frame].columns, r[frame].columns)
            np.testing.assert_allclose(g[frame].to_numpy(), r[frame].to_numpy(), rtol=1e-12)
    for column in ("names", "scores", "pvals", "pvals_adj", "logfoldchanges"):
        if column in r:
            assert type(g[column]) is type(r[column]) and g[column].dtype == r[column].dtype, column
    abs_rank = r["params"].get("rankby_abs", False)
    moved = 0
    for group in r["names"].dtype.names:
        ours = sc.get.rank_genes_groups_df(got, group, key=key)
        theirs = sc.get.rank_genes_groups_df(ref, group, key=key)
        differ = (ours["names"] != theirs["names"]).to_numpy()
        moved += int(differ.sum())
        score = theirs["scores"].to_numpy()
        for tied in np.unique(np.abs(score[differ]) if abs_rank else score[differ]):
            block = (np.abs(score) if abs_rank else score) == tied
            assert set(ours["names"][block]) == set(theirs["names"][block]), (group, tied)
        joined = theirs.merge(ours, on="names", suffixes=("", "_gpusc"))
        for column in theirs.columns[1:]:  # scanpy's columns, ours suffixed
            ours_v, theirs_v = joined[f"{column}_gpusc"], joined[column]
            if exact:
                np.testing.assert_array_equal(ours_v, theirs_v, err_msg=f"{group} {column}")
                continue
            rtol = {"scores": score_rtol, "pvals": p_rtol, "pvals_adj": p_rtol}.get(column, 1e-6)
            np.testing.assert_allclose(ours_v, theirs_v, rtol=rtol, atol=1e-300,
                                       err_msg=f"{group} {column}")
    return moved


# ---------------------------------------------------------------- data

def _log(adata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
    return adata


@pytest.fixture(scope="module")
def pbmc_full():
    """pbmc3k after normalize_total + log1p (CSR float32); 62 cells without a louvain label."""
    return _log(read_real("pbmc3k_counts_labeled.h5ad"))


@pytest.fixture(scope="module")
def pbmc(pbmc_full):
    """2,000 of pbmc3k's genes (seeded): what the wilcoxon and option tests compare on."""
    genes = np.sort(np.random.default_rng(0).choice(pbmc_full.n_vars, 2000, replace=False))
    return pbmc_full[:, genes].copy()


@pytest.fixture(scope="module")
def kang():
    adata = _log(read_real("kang2018_pbmc_ctrl_stim_2000.h5ad"))
    genes = np.sort(np.random.default_rng(1).choice(adata.n_vars, 3000, replace=False))
    return adata[:, genes].copy()


def synthetic(n_obs=240, n_vars=120, dtype=np.float32, seed=0):
    """Log-like values with ties (a few distinct values per gene), negative values in some
    genes, an all-zero gene, a gene without zeros; four groups, one of two cells, and cells
    without a label."""
    rng = np.random.default_rng(seed)
    levels = np.log1p(rng.integers(1, 6, (n_obs, n_vars)) * rng.choice([1.0, 1.5], n_vars))
    x = np.where(rng.random((n_obs, n_vars)) < 0.3, levels, 0.0)
    x[:, :10] -= 0.5 * (rng.random((n_obs, 10)) < 0.2)  # negative values below the zeros
    x[:, 20] = 0
    x[:, 21] = levels[:, 21]
    labels = rng.choice(np.array(["a", "b", "c"], dtype=object), n_obs, p=[0.5, 0.3, 0.2])
    labels[:2] = "tiny"
    labels[2:6] = np.nan
    obs = pd.DataFrame({"group": pd.Categorical(labels, categories=["a", "b", "c", "tiny"])},
                       index=[f"c{i}" for i in range(n_obs)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_vars)])
    return ad.AnnData(x.astype(dtype), obs=obs, var=var)


# ---------------------------------------------------------------- real data

def test_signatures_match_scanpy():
    assert_same_signature(gpusc.tl.rank_genes_groups, sc.tl.rank_genes_groups)
    assert_same_signature(gpusc.tl.filter_rank_genes_groups, sc.tl.filter_rank_genes_groups)


@pytest.mark.parametrize("method", ["t-test", "t-test_overestim_var"])
def test_t_tests_pbmc3k_all_genes(pbmc_full, method):
    ref = _scanpy(pbmc_full, "louvain", method=method, pts=True)
    got = _gpusc(pbmc_full, "louvain", method=method, pts=True)
    assert assert_like_scanpy(got, ref) == 0  # measured: no tie moved


@pytest.mark.parametrize("tie_correct", [False, True])
def test_wilcoxon_pbmc3k(pbmc, tie_correct):
    ref = _scanpy(pbmc, "louvain", method="wilcoxon", tie_correct=tie_correct, pts=True)
    got = _gpusc(pbmc, "louvain", method="wilcoxon", tie_correct=tie_correct, pts=True)
    assert assert_like_scanpy(got, ref, exact=True) == 0


@pytest.mark.parametrize("method", ["wilcoxon", "t-test"])
def test_reference_pbmc3k(pbmc, method):
    kw = {"method": method, "reference": "B cells", "pts": True, "tie_correct": True}
    ref = _scanpy(pbmc, "louvain", **kw)
    got = _gpusc(pbmc, "louvain", **kw)
    moved = assert_like_scanpy(got, ref, exact=method == "wilcoxon")
    if method == "wilcoxon":
        assert moved == 0
    # t-test: genes seen in one cell of a group and in no B cell all score exactly 1 (and the
    # like), large blocks of mathematically equal scores whose float64 rounding orders them
    # differently in scanpy; assert_like_scanpy checked each moved gene stays in its block


def test_kang2018_stim(kang):
    for kw in ({"method": "wilcoxon", "tie_correct": True}, {"method": "t-test", "pts": True},
               {"method": "wilcoxon", "reference": "ctrl"}):
        ref = _scanpy(kang, "stim", **kw)
        got = _gpusc(kang, "stim", **kw)
        assert assert_like_scanpy(got, ref, exact=kw["method"] == "wilcoxon") <= 2, kw


def test_options_pbmc3k(pbmc):
    """groups, n_genes, rankby_abs, bonferroni, key_added, a log base, copy."""
    adata = pbmc.copy()
    adata.uns["log1p"] = {"base": 2}
    kw = {"groups": ["B cells", "NK cells", "CD8 T cells"], "n_genes": 40, "rankby_abs": True,
          "corr_method": "bonferroni", "key_added": "markers", "method": "t-test"}
    ref = _scanpy(adata, "louvain", **kw)
    got = gpusc.tl.rank_genes_groups(adata, "louvain", copy=True, **kw)
    assert "markers" not in adata.uns  # copy=True leaves the input alone
    assert assert_like_scanpy(got, ref, key="markers") == 0
    assert len(got.uns["markers"]["names"]) == 40


def test_mask_var_layer_and_raw(pbmc):
    adata = pbmc.copy()
    adata.var["keep"] = np.arange(adata.n_vars) % 3 != 0
    for kw in ({"mask_var": "keep"}, {"mask_var": adata.var["keep"].to_numpy(), "pts": True}):
        assert assert_like_scanpy(_gpusc(adata, "louvain", **kw), _scanpy(adata, "louvain", **kw)) == 0
    # layer: the log values in a layer, counts-like garbage in X
    layered = adata.copy()
    layered.layers["log"] = layered.X.copy()
    layered.X = layered.X * 3
    kw = {"layer": "log", "method": "wilcoxon"}
    assert assert_like_scanpy(_gpusc(layered, "louvain", **kw), _scanpy(layered, "louvain", **kw),
                              exact=True) == 0
    # raw: every gene in raw, a subset (scaled) in X; use_raw=None means raw
    with_raw = adata.copy()
    with_raw.raw = with_raw
    with_raw = with_raw[:, :500].copy()
    with_raw.X = with_raw.X * 2
    for use_raw in (None, False):
        kw = {"use_raw": use_raw, "method": "wilcoxon", "pts": True}
        ref, got = _scanpy(with_raw, "louvain", **kw), _gpusc(with_raw, "louvain", **kw)
        assert len(got.uns[KEY]["names"]) == (2000 if use_raw is None else 500)
        assert assert_like_scanpy(got, ref, exact=True) == 0


@pytest.mark.parametrize("groups", [["B cells", "NK cells"], "all"])
def test_logreg(pbmc, groups):
    adata = pbmc[:, :150].copy()  # scikit-learn's fit is the cost: few genes
    kw = {"method": "logreg", "groups": groups, "max_iter": 200, "pts": True}
    ref, got = _scanpy(adata, "louvain", **kw), _gpusc(adata, "louvain", **kw)
    # the same scikit-learn fit on the same matrix: equal; no pts (scanpy computes none)
    assert assert_like_scanpy(got, ref, exact=True) == 0
    assert "pts" not in got.uns[KEY]


def test_scanpy_reads_and_plots_the_result(pbmc):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adata = _gpusc(pbmc, "louvain", method="wilcoxon", pts=True)
    frame = sc.get.rank_genes_groups_df(adata, None)
    assert {"group", "names", "scores", "pvals", "pvals_adj", "logfoldchanges", "pct_nz_group",
            "pct_nz_reference"} <= set(frame.columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pl.rank_genes_groups(adata, n_genes=5, show=False)
        sc.pl.rank_genes_groups_dotplot(adata, n_genes=3, dendrogram=False, show=False)
        sc.pl.rank_genes_groups_matrixplot(adata, n_genes=3, dendrogram=False, show=False)
        sc.pl.rank_genes_groups_violin(adata, groups=["B cells"], n_genes=3, show=False)
    plt.close("all")


# ---------------------------------------------------------------- synthetic, every array type

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("method", "reference"), [("t-test", "rest"), ("wilcoxon", "rest"),
                                                   ("wilcoxon", "b"), ("t-test_overestim_var", "b")])
def test_synthetic_array_types(array_type, dtype, method, reference):
    base = synthetic(dtype=dtype)
    ref = _scanpy(base, "group", method=method, reference=reference, pts=True, tie_correct=True)
    adata = base.copy()
    adata.X = array_type(base.X)
    got = _gpusc(adata, "group", method=method, reference=reference, pts=True, tie_correct=True)
    moved = assert_like_scanpy(got, ref, exact=method == "wilcoxon")
    # the all-zero gene and genes absent from a small group tie at one score (t-test: 0)
    assert moved <= 10


def test_stored_zeros_and_unsorted_indices():
    """Explicit zeros and shuffled indices: scanpy drops the zeros (in place); we skip them."""
    base = synthetic(seed=3)
    m = sparse.csr_matrix(base.X)
    m.data[::7] = 0  # stored zeros
    rng = np.random.default_rng(4)
    for r in range(m.shape[0]):  # unsorted indices within each row
        lo, hi = m.indptr[r], m.indptr[r + 1]
        order = lo + rng.permutation(hi - lo)
        m.indices[lo:hi], m.data[lo:hi] = m.indices[order], m.data[order]
    m.has_sorted_indices = False
    adata = base.copy()
    adata.X = m
    ref = _scanpy(adata, "group", method="wilcoxon", pts=True)
    got = adata.copy()
    gpusc.tl.rank_genes_groups(got, "group", method="wilcoxon", pts=True)
    assert got.X.nnz == m.nnz  # not changed in place
    assert assert_like_scanpy(got, ref, exact=True) == 0


def test_group_without_cells_left_out_by_groups():
    base = synthetic()
    base.obs["group"] = base.obs["group"].cat.add_categories(["empty"])
    kw = {"groups": ["a", "b"], "method": "wilcoxon"}
    assert assert_like_scanpy(_gpusc(base, "group", **kw), _scanpy(base, "group", **kw),
                              exact=True) == 0


def test_strings_become_categoricals_as_scanpy():
    base = synthetic()
    base.obs["group"] = base.obs["group"].astype(object)
    base.obs["other"] = np.where(np.arange(base.n_obs) % 2, "x", "y")
    ref, got = _scanpy(base, "group"), _gpusc(base, "group")
    assert assert_like_scanpy(got, ref) <= 10
    pd.testing.assert_frame_equal(got.obs, ref.obs)


def test_wilcoxon_ranks_each_gene_once(monkeypatch):
    calls = []
    original = _rank_genes_groups.rank_sums

    def counted(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(_rank_genes_groups, "rank_sums", counted)
    for reference in ("rest", "b"):
        calls.clear()
        gpusc.tl.rank_genes_groups(synthetic(), "group", method="wilcoxon", reference=reference,
                                   groups=["a", "b", "c"])
        assert len(calls) == 1  # one ranking for every group (or every pair)


def test_count_data_warns_as_scanpy(monkeypatch):
    messages = []
    monkeypatch.setattr(scanpy.logging, "warning", lambda msg, *a, **k: messages.append(msg))
    counts = read_real("pbmc3k_counts_labeled.h5ad")[:, :300].copy()
    counts.X = counts.X.astype(np.int32)
    for fn in (sc.tl.rank_genes_groups, gpusc.tl.rank_genes_groups):
        messages.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(counts.copy(), "louvain")
        assert any("raw count data" in m for m in messages), fn
    messages.clear()
    gpusc.tl.rank_genes_groups(synthetic(), "group")
    assert not messages


# ---------------------------------------------------------------- bad input

BAD = {
    "unknown groupby": (KeyError, "nope", {}, None, "not a column"),
    "unknown group": (ValueError, "group", {"groups": ["a", "zz"]}, None, "zz"),
    "reference not a group": (ValueError, "group", {"reference": "zz"}, None,
                              "needs to be one of groupby"),
    "unknown method": (ValueError, "group", {"method": "magic"}, None, "Method must be one of"),
    "unknown correction": (ValueError, "group", {"corr_method": "holm"}, None,
                           "Correction method must be one of"),
    "groups as a string": (ValueError, "group", {"groups": "a"}, None,
                           "Specify a sequence of groups"),
    "a group of one cell": (ValueError, "group", {"groups": ["a", "one"]}, "one",
                            "since they only contain one sample"),
    "an empty category": (ValueError, "group", {}, "empty", "since they only contain one sample"),
    "layer with use_raw": (ValueError, "group", {"layer": "log", "use_raw": True}, "raw",
                           "Cannot specify `layer` and have `use_raw=True`"),
    "use_raw without raw": (ValueError, "group", {"use_raw": True}, None, "`adata.raw` is empty"),
    "NaN in the matrix": (ValueError, "group", {"method": "wilcoxon"}, "nan", "NaN"),
    "NaN for logreg": (ValueError, "group", {"method": "logreg"}, "nan", "NaN"),
    "logreg on one group": (ValueError, "group", {"method": "logreg", "groups": ["a"]}, None,
                            "single cluster"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_leaves_adata_unchanged(case):
    error, groupby, kwargs, change, needle = BAD[case]
    adata = synthetic()
    adata.layers["log"] = adata.X.copy()
    if change == "one":
        adata.obs["group"] = adata.obs["group"].cat.add_categories(["one"])
        adata.obs.iloc[10, 0] = "one"
    elif change == "empty":
        adata.obs["group"] = adata.obs["group"].cat.add_categories(["empty"])
    elif change == "nan":
        adata.X[3, 5] = np.nan
    elif change == "raw":
        adata.raw = adata
    before = snapshot(adata)
    with pytest.raises(error, match=needle) as ours:
        gpusc.tl.rank_genes_groups(adata, groupby, **kwargs)
    assert_unchanged(adata, before)
    if case in ("unknown group", "NaN in the matrix", "NaN for logreg"):
        return  # scanpy: an IndexError; NaN: no error (NaN scores)
    with pytest.raises(error) as theirs, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(adata.copy(), groupby, **kwargs)
    assert theirs.value.args[0] in ours.value.args[0]  # scanpy's message inside ours


@pytest.mark.parametrize("chunks", ["uneven", "empty"])
@pytest.mark.parametrize("fmt", ["dense", "csr int64"])
@pytest.mark.parametrize("method", ["t-test", "t-test_overestim_var"])
def test_dask_t_tests_equal_in_memory_and_scanpy_on_dask(chunks, fmt, method):
    # one pass over the row chunks (per-group sums added chunk by chunk): the same tables as
    # in memory, and scanpy's on the same dask AnnData (scanpy 1.12 takes dask for t-tests)
    from _dask import as_dask, count_computes

    adata = synthetic()
    if fmt != "dense":
        adata.X = sparse.csr_matrix(adata.X)
    lazy = adata.copy()
    lazy.X = as_dask(adata.X, chunks, index_dtype=np.int64 if fmt != "dense" else None)
    with count_computes() as c:
        got = _gpusc(lazy, "group", method=method, pts=True)
    assert c.computes == 1
    assert_like_scanpy(got, _gpusc(adata, "group", method=method, pts=True), exact=True)
    if fmt != "dense":  # gpusc's checks above hold on both scanpy versions
        skip_unless_scanpy_112("rank_genes_groups on sparse dask chunks calls np.sum(keepdims=...) on "
                               "scipy sparse matrices, which scanpy 1.11 does not support")
    assert_like_scanpy(got, _scanpy(lazy, "group", method=method, pts=True))


@pytest.mark.parametrize("method", ["wilcoxon", "logreg"])
def test_dask_with_a_method_that_needs_whole_genes_is_refused_clearly(method):
    from _dask import as_dask

    adata = synthetic()
    adata.X = as_dask(adata.X)
    before = snapshot(adata)
    with pytest.raises(TypeError, match="dask array; method=.*t-test"):
        gpusc.tl.rank_genes_groups(adata, "group", method=method)
    assert_unchanged(adata, before)


def test_dask_count_data_warns_as_in_memory(monkeypatch):
    from _dask import as_dask

    messages = []
    monkeypatch.setattr(scanpy.logging, "warning", lambda msg, *a, **k: messages.append(msg))
    counts = synthetic()
    counts.X = np.rint(np.expm1(counts.X).clip(0))
    counts.X = as_dask(sparse.csr_matrix(counts.X))
    gpusc.tl.rank_genes_groups(counts, "group")
    assert any("raw count data" in m for m in messages)


def test_logreg_on_the_device_without_cuml_names_the_extra(monkeypatch):
    """A device matrix with logreg and no cuML: an ImportError naming the extra (the device
    stood in for: placement says device, cupy is NumPy, cuml cannot be imported)."""
    import sys

    import _on_threads

    _on_threads.numpy_as_cupy(monkeypatch)
    monkeypatch.setitem(sys.modules, "cuml", None)
    monkeypatch.setitem(sys.modules, "cuml.linear_model", None)
    monkeypatch.setattr(_rank_genes_groups, "placement", lambda x: "device")
    with pytest.raises(ImportError, match=r"gpusc\[rapids-cu13\]"):
        _rank_genes_groups._fit_logreg(np.ones((4, 3)), np.arange(4), np.array([0, 1, 0, 1]), {})


# ---------------------------------------------------------------- filter_rank_genes_groups

def _assert_filtered_like_scanpy(got, ref, key="rank_genes_groups_filtered"):
    ours, theirs = pd.DataFrame(got.uns[key]["names"]), pd.DataFrame(ref.uns[key]["names"])
    assert list(ours.columns) == list(theirs.columns)
    for group in theirs.columns:  # the genes kept (rankings agree but inside ties)
        assert set(ours[group].dropna()) == set(theirs[group].dropna()), group
        assert ours[group].isna().sum() == theirs[group].isna().sum()
    assert list(got.uns[key]) == list(ref.uns[key])


@pytest.mark.parametrize(("rank_kw", "filter_kw"), [
    ({"method": "t-test", "pts": True}, {}),  # fold changes and fractions from the ranking
    ({"method": "wilcoxon"}, {"min_fold_change": 0.5, "compare_abs": True}),  # fractions from X
    ({"method": "wilcoxon", "reference": "B cells"}, {"key_added": "kept"}),  # all from X
])
def test_filter_like_scanpy(pbmc, rank_kw, filter_kw):
    ref = _scanpy(pbmc, "louvain", **rank_kw)
    got = _gpusc(pbmc, "louvain", **rank_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.filter_rank_genes_groups(ref, **filter_kw)
    gpusc.tl.filter_rank_genes_groups(got, **filter_kw)
    _assert_filtered_like_scanpy(got, ref, filter_kw.get("key_added", "rank_genes_groups_filtered"))


def test_filter_without_ranking_is_a_clear_error():
    with pytest.raises(KeyError, match="run rank_genes_groups first"):
        gpusc.tl.filter_rank_genes_groups(synthetic())


# ---------------------------------------------------------------- device twins

@pytest.mark.gpu
@pytest.mark.parametrize("method", ["t-test", "wilcoxon", "logreg"])
def test_device_equals_host_pbmc3k(pbmc, method):
    """The same numbers on the device and the host (wilcoxon: exact rank sums; t-test: float64
    moments summed in another order: stored float32 scores equal to one ulp)."""
    pytest.importorskip("cupy")
    if method == "logreg":
        pytest.importorskip("cuml")
    host = _gpusc(pbmc, "louvain", method=method, pts=method != "logreg", tie_correct=True)
    on_device = pbmc.copy()
    gpusc.get.anndata_to_GPU(on_device)
    device = _gpusc(on_device, "louvain", method=method, pts=method != "logreg", tie_correct=True)
    if method == "logreg":  # cuML's solver is not scikit-learn's: the top genes agree
        for group in host.uns[KEY]["names"].dtype.names:
            top_host = set(host.uns[KEY]["names"][group][:20])
            assert len(top_host & set(device.uns[KEY]["names"][group][:20])) >= 15
        return
    moved = assert_like_scanpy(device, host, exact=method == "wilcoxon")
    if method == "wilcoxon":
        assert moved == 0  # t-test: exact ties may order differently (each stays in its block)


@pytest.mark.parametrize("seed", range(5))
def test_welch_t_test_is_scipys_bit_for_bit(seed):
    """rank_genes_groups' t-test without scipy.stats' import: the same statistics and p-values
    as scipy.stats.ttest_ind_from_stats(equal_var=False), zero variances and one-cell groups included."""
    from scipy import stats as st

    from gpusc.tl._rank_genes_groups import welch_t_test

    rng = np.random.default_rng(seed)
    n_genes = 4000
    mean1, mean2 = rng.normal(0, 1, n_genes), rng.normal(0, 1, n_genes)
    std1, std2 = np.abs(rng.normal(0, 1, n_genes)), np.abs(rng.normal(0, 1, n_genes))
    std1[rng.random(n_genes) < 0.1] = 0
    std2[rng.random(n_genes) < 0.1] = 0
    both_flat = (std1 == 0) & (rng.random(n_genes) < 0.5)
    std2[both_flat] = 0
    same_mean = both_flat & (rng.random(n_genes) < 0.5)  # 0 / 0: a NaN statistic
    mean1[same_mean] = mean2[same_mean]
    for n1, n2 in ((1, 500), (37, 2), (1200, 1800)):
        got = welch_t_test(mean1, std1, n1, mean2, std2, n2)
        with np.errstate(invalid="ignore"):
            want = st.ttest_ind_from_stats(mean1, std1, n1, mean2, std2, n2, equal_var=False)
        for ours, theirs in zip(got, want, strict=True):
            np.testing.assert_array_equal(ours, theirs)
