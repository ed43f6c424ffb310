"""pp.scrublet and pp.scrublet_simulate_doublets against scanpy 1.12's (the oracle).

scanpy runs with ``use_approx_neighbors=False`` (scikit-learn's exact brute force); its
neighbour lists are captured where its Scrublet reads them, and so are gpusc's, so the
comparison is row by row: the cells whose lists differ (exact ties and last-bit differences
of the float32 normalisation) are counted and bounded, and every other score must be equal.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scanpy.preprocessing._scrublet.core as sc_scrublet_core
from _compare import assert_unchanged, snapshot
from conftest import SCANPY_112, read_real, to_device
from scipy import sparse

import gpusc
from gpusc.pp import _scrublet

GPU = pytest.mark.gpu


@contextmanager
def captured_lists():
    """The neighbour lists scanpy's and gpusc's Scrublet count in, one entry per run."""
    lists = {"scanpy": [], "gpusc": [], "manifold": []}
    theirs = sc_scrublet_core._get_indices_distances_from_sparse_matrix
    ours = _scrublet._doublet_neighbors

    def capture_theirs(d, k):
        idx, dist = theirs(d, k)
        lists["scanpy"].append(idx)
        return idx, dist

    def capture_ours(manifold, *args, **kwargs):
        idx, k_adj = ours(manifold, *args, **kwargs)
        lists["gpusc"].append(idx)
        lists["manifold"].append(manifold)
        return idx, k_adj

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sc_scrublet_core, "_get_indices_distances_from_sparse_matrix", capture_theirs)
        mp.setattr(_scrublet, "_doublet_neighbors", capture_ours)
        yield lists


def run_both(adata, *, global_seed=None, **kwargs):
    """(scanpy's AnnData, gpusc's AnnData, lists), each on its own copy; ``global_seed`` seeds
    numpy's global generator before each (scanpy's thinning draws from it). The UserWarnings of
    both must match."""
    with captured_lists() as lists, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs, ours = adata.copy(), adata.copy()
        if global_seed is not None:
            np.random.seed(global_seed)
        sc.pp.scrublet(theirs, use_approx_neighbors=False, verbose=False, **kwargs)
        n_theirs = len(caught)
        if global_seed is not None:
            np.random.seed(global_seed)
        gpusc.pp.scrublet(ours, verbose=False, **kwargs)
    user = [[str(w.message) for w in part if w.category is UserWarning]
            for part in (caught[:n_theirs], caught[n_theirs:])]
    assert user[1] == user[0], f"gpusc warned {user[1]}, scanpy {user[0]}"
    assert len(lists["scanpy"]) == len(lists["gpusc"]) >= 1
    return theirs, ours, lists


def differing_rows(theirs: np.ndarray, ours: np.ndarray, manifold: np.ndarray) -> np.ndarray:
    """Rows whose neighbour sets differ, after checking that each difference is a tie: the
    points only scanpy lists and those only gpusc lists lie at the same distances from the row
    (relative 1e-6 of its farthest listed neighbour: scanpy's coordinates differ from ours in
    the last bits of its float32 normalisation)."""
    assert theirs.shape == ours.shape, f"lists of {theirs.shape[1]} vs {ours.shape[1]} neighbours"
    a, b = np.sort(theirs, axis=1), np.sort(ours, axis=1)
    rows = np.flatnonzero((a != b).any(axis=1))
    for r in rows:
        only_theirs = np.setdiff1d(theirs[r], ours[r])
        only_ours = np.setdiff1d(ours[r], theirs[r])
        d_theirs = np.sort(np.linalg.norm(manifold[only_theirs] - manifold[r], axis=1))
        d_ours = np.sort(np.linalg.norm(manifold[only_ours] - manifold[r], axis=1))
        reach = np.linalg.norm(manifold[ours[r]] - manifold[r], axis=1).max()
        np.testing.assert_allclose(d_ours, d_theirs, rtol=0, atol=1e-6 * reach,
                                   err_msg=f"row {r}: not a tie ({only_theirs} vs {only_ours})")
    return rows


# Rows whose neighbour lists may differ from scanpy's (every one checked to be a tie): measured
# 0 to 7 of 1,500. The two copies of a doublet drawn as (i, j) and (j, i) (scanpy keeps the
# point itself and drops its twin in one of their lists, and either copy may take the k-th
# place), and a doublet (i, i) against cell i, which coincide here and differ in the last bits
# of scanpy's float32 normalisation.
MAX_DIFFERING = 0.01


def compare_run(uns_theirs, uns_ours, scores_theirs, scores_ours, list_theirs, list_ours, manifold):
    """One Scrublet run: same doublets, same scores where the lists agree, same threshold where
    every simulated score agrees. Returns the number of rows whose lists differ."""
    np.testing.assert_array_equal(uns_ours["doublet_parents"], uns_theirs["doublet_parents"])
    assert uns_ours["doublet_parents"].dtype == np.int64
    n_obs = len(scores_theirs)
    differ = differing_rows(list_theirs, list_ours, manifold)
    assert differ.size <= MAX_DIFFERING * len(list_theirs), f"{differ.size} rows' lists differ"
    same = np.ones(len(list_theirs), bool)
    same[differ] = False
    np.testing.assert_allclose(scores_ours[same[:n_obs]], scores_theirs[same[:n_obs]], rtol=1e-12)
    sim_theirs, sim_ours = uns_theirs["doublet_scores_sim"], uns_ours["doublet_scores_sim"]
    assert sim_ours.dtype == np.float64
    np.testing.assert_allclose(sim_ours[same[n_obs:]], sim_theirs[same[n_obs:]], rtol=1e-12)
    assert uns_ours["parameters"] == uns_theirs["parameters"]
    assert uns_ours.keys() == uns_theirs.keys()
    if np.array_equal(sim_ours, sim_theirs):
        assert uns_ours.get("threshold") == uns_theirs.get("threshold")
    return differ.size


def compare(theirs, ours, lists):
    compare_run(theirs.uns["scrublet"], ours.uns["scrublet"], theirs.obs["doublet_score"].to_numpy(),
                ours.obs["doublet_score"].to_numpy(), lists["scanpy"][0], lists["gpusc"][0],
                lists["manifold"][0])
    assert ours.obs["doublet_score"].dtype == np.float64
    assert ours.obs["predicted_doublet"].dtype == theirs.obs["predicted_doublet"].dtype
    if ours.uns["scrublet"].get("threshold") == theirs.uns["scrublet"].get("threshold"):
        agree = ours.obs["doublet_score"].to_numpy() == theirs.obs["doublet_score"].to_numpy()
        pd.testing.assert_series_equal(ours.obs["predicted_doublet"][agree], theirs.obs["predicted_doublet"][agree])


@pytest.fixture(scope="module")
def pbmc():
    adata = read_real("pbmc3k_counts_labeled.h5ad")
    rng = np.random.default_rng(0)
    return adata[np.sort(rng.choice(adata.n_obs, 1000, replace=False))].copy()


@pytest.fixture(scope="module")
def pbmc_small(pbmc):
    return pbmc[::2].copy()  # 500 cells


@pytest.fixture(scope="module")
def pbmc_tiny(pbmc):
    return pbmc[::5].copy()  # 200 cells


def test_matches_scanpy_on_pbmc3k(pbmc):
    theirs, ours, lists = run_both(pbmc)
    compare(theirs, ours, lists)
    assert ours.uns["scrublet"]["threshold"] == theirs.uns["scrublet"]["threshold"]
    assert isinstance(ours.uns["scrublet"]["threshold"], float)
    pd.testing.assert_frame_equal(ours.obs.drop(columns="doublet_score"), theirs.obs.drop(columns="doublet_score"))


def test_batches_match_scanpy_on_kang2018():
    adata = read_real("kang2018_pbmc_ctrl_stim_2000.h5ad")[::2].copy()  # 500 cells per batch
    theirs, ours, lists = run_both(adata, batch_key="stim")
    if not SCANPY_112:
        # scanpy 1.11 concatenates the batches' obs without casting back, so the categorical
        # "stim" comes back as object; 1.12 casts to adata.obs.dtypes (gpusc's behaviour)
        theirs.obs = theirs.obs.astype(adata.obs.dtypes)
    scored = ["doublet_score", "predicted_doublet"]
    pd.testing.assert_frame_equal(ours.obs.drop(columns=scored), theirs.obs.drop(columns=scored))  # n_genes
    for column in scored:
        assert ours.obs[column].dtype == theirs.obs[column].dtype
    assert ours.uns["scrublet"]["batched_by"] == "stim"
    batches = ours.uns["scrublet"]["batches"]
    assert list(batches) == list(theirs.uns["scrublet"]["batches"]) == ["ctrl", "stim"]
    for b, name in enumerate(batches):
        members = (adata.obs["stim"] == name).to_numpy()
        compare_run(theirs.uns["scrublet"]["batches"][name], batches[name],
                    theirs.obs["doublet_score"].to_numpy()[members], ours.obs["doublet_score"].to_numpy()[members],
                    lists["scanpy"][b], lists["gpusc"][b], lists["manifold"][b])
        if batches[name].get("threshold") == theirs.uns["scrublet"]["batches"][name].get("threshold"):
            agree = members & (ours.obs["doublet_score"] == theirs.obs["doublet_score"]).to_numpy()
            np.testing.assert_array_equal(ours.obs["predicted_doublet"][agree], theirs.obs["predicted_doublet"][agree])


OPTIONS = {
    "svd": dict(mean_center=False, normalize_variance=False, n_prin_comps=20),
    "svd_scaled": dict(mean_center=False, random_state=3),
    "centred_only": dict(normalize_variance=False, stdev_doublet_rate=0.05),
    "thinned_log": dict(log_transform=True, synthetic_doublet_umi_subsampling=0.5, n_neighbors=10,
                        sim_doublet_ratio=1.5, get_doublet_neighbor_parents=True, expected_doublet_rate=0.1),
    "manhattan": dict(knn_dist_metric="manhattan", threshold=0.3),
    "wide": dict(n_prin_comps=55),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_match_scanpy(pbmc_small, name):
    theirs, ours, lists = run_both(pbmc_small, global_seed=7, **OPTIONS[name])
    compare(theirs, ours, lists)
    if "get_doublet_neighbor_parents" in OPTIONS[name]:
        expected = theirs.uns["scrublet"]["doublet_neighbor_parents"]
        got = ours.uns["scrublet"]["doublet_neighbor_parents"]
        assert len(got) == len(expected)
        agree = np.flatnonzero(ours.obs["doublet_score"].to_numpy() == theirs.obs["doublet_score"].to_numpy())
        for i in agree:
            np.testing.assert_array_equal(got[i], expected[i])


def test_cosine_scores_of_cells_match_scanpy(pbmc_small):
    # With cosine distances scikit-learn's brute force (pairwise distances, argpartition and an
    # unstable argsort) orders a point and its exact copy either way, so whether scanpy counts
    # each simulated doublet in its own list is a matter of rounding; the observed cells' scores
    # do not depend on it (a cell is not a simulated doublet) and must agree
    theirs, ours, lists = run_both(pbmc_small, knn_dist_metric="cosine")
    np.testing.assert_array_equal(ours.uns["scrublet"]["doublet_parents"], theirs.uns["scrublet"]["doublet_parents"])
    n_obs = pbmc_small.n_obs
    others = [[set(row[row != r]) for r, row in enumerate(found[:n_obs])] for found in (lists["scanpy"][0], lists["gpusc"][0])]
    agree = np.array([a == b for a, b in zip(*others, strict=True)])
    assert agree.mean() > 0.99
    np.testing.assert_allclose(ours.obs["doublet_score"][agree], theirs.obs["doublet_score"][agree], rtol=1e-12)


def test_simulate_doublets_matches_scanpy(pbmc_small):
    adata = pbmc_small[:, :3000].copy()
    adata.layers["counts"] = adata.X.astype(np.int64)
    for kwargs in (dict(layer="counts", sim_doublet_ratio=1.2),
                   dict(synthetic_doublet_umi_subsampling=0.4, random_seed=5)):
        np.random.seed(11)
        theirs = sc.pp.scrublet_simulate_doublets(adata, **kwargs)
        np.random.seed(11)
        ours = gpusc.pp.scrublet_simulate_doublets(adata, **kwargs)
        assert ours.X.dtype == theirs.X.dtype
        assert (abs(ours.X - theirs.X)).max() == 0
        pd.testing.assert_frame_equal(ours.obs, theirs.obs)
        np.testing.assert_array_equal(ours.obsm["doublet_parents"], theirs.obsm["doublet_parents"])
        assert ours.uns["scrublet"] == theirs.uns["scrublet"]


def test_random_state_advances_like_scanpy(pbmc_tiny):
    # one RandomState for both batches: the second batch's doublets depend on what the first drew
    adata = pbmc_tiny.copy()
    adata.obs["half"] = np.where(np.arange(adata.n_obs) < 100, "a", "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = adata.copy(), adata.copy()
        sc.pp.scrublet(theirs, batch_key="half", use_approx_neighbors=False, verbose=False,
                       random_state=np.random.RandomState(4))
        gpusc.pp.scrublet(ours, batch_key="half", verbose=False, random_state=np.random.RandomState(4))
    for name in ("a", "b"):
        np.testing.assert_array_equal(ours.uns["scrublet"]["batches"][name]["doublet_parents"],
                                      theirs.uns["scrublet"]["batches"][name]["doublet_parents"])


def test_precomputed_adata_sim_matches_scanpy(pbmc_tiny):
    # scanpy's advanced use: simulate from the raw counts of the selected genes, process both alike
    adata = pbmc_tiny.copy()
    sc.pp.filter_genes(adata, min_cells=3)
    adata.layers["raw"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    adata.layers["log1p"] = adata.X.copy()
    sc.pp.log1p(adata, layer="log1p")
    sc.pp.highly_variable_genes(adata, layer="log1p")
    adata = adata[:, adata.var["highly_variable"]].copy()
    adata_sim = sc.pp.scrublet_simulate_doublets(adata, layer="raw")
    sc.pp.normalize_total(adata_sim, target_sum=1e6)
    sc.pp.normalize_total(adata, target_sum=1e6)
    with captured_lists() as lists, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = adata.copy(), adata.copy()
        sc.pp.scrublet(theirs, adata_sim, use_approx_neighbors=False, verbose=False)
        gpusc.pp.scrublet(ours, adata_sim, verbose=False)
    compare(theirs, ours, lists)


def test_same_seed_same_result_and_copy(pbmc_tiny):
    adata = pbmc_tiny.copy()
    snap = snapshot(adata)
    first = gpusc.pp.scrublet(adata, verbose=False, random_state=2, copy=True)
    assert_unchanged(adata, snap)
    second = pbmc_tiny.copy()
    gpusc.pp.scrublet(second, verbose=False, random_state=2)
    pd.testing.assert_frame_equal(first.obs, second.obs)
    np.testing.assert_array_equal(first.uns["scrublet"]["doublet_scores_sim"],
                                  second.uns["scrublet"]["doublet_scores_sim"])
    other = gpusc.pp.scrublet(pbmc_tiny, verbose=False, random_state=3, copy=True)
    assert not np.array_equal(other.uns["scrublet"]["doublet_parents"], first.uns["scrublet"]["doublet_parents"])


def test_no_threshold_found(pbmc_tiny, monkeypatch):
    # scanpy: a warning, predicted_doublet False everywhere and no threshold key
    import skimage.filters

    def fail(_):
        raise RuntimeError("Unable to find two maxima in histogram")

    monkeypatch.setattr(skimage.filters, "threshold_minimum", fail)
    adata = pbmc_tiny.copy()
    gpusc.pp.scrublet(adata)
    assert "threshold" not in adata.uns["scrublet"]
    assert adata.obs["predicted_doublet"].dtype == bool and not adata.obs["predicted_doublet"].any()


@pytest.mark.scanpy_112("pp.scrublet: 1.11's error without scikit-image has other words "
                        "('skimage is not installed')")
def test_missing_scikit_image(pbmc_tiny, monkeypatch):
    # scikit-image is gpusc's `scrublet` extra: without it threshold=None fails before any work
    # with an ImportError naming the extra, which is also scanpy's ValueError with its message
    import scanpy.preprocessing._scrublet as sc_scrublet

    monkeypatch.setattr(sc_scrublet, "find_spec", lambda name: None)
    monkeypatch.setattr(_scrublet, "find_spec", lambda name: None)
    with pytest.raises(ValueError) as scanpy_error:
        sc.pp.scrublet(pbmc_tiny.copy())
    adata = pbmc_tiny.copy()
    snap = snapshot(adata)
    with pytest.raises(ImportError, match=r"gpusc\[scrublet\]") as ours:
        gpusc.pp.scrublet(adata)
    assert isinstance(ours.value, ValueError) and str(scanpy_error.value) in str(ours.value)
    assert_unchanged(adata, snap)
    gpusc.pp.scrublet(adata, threshold=0.3, verbose=False)  # a given threshold needs no scikit-image
    assert adata.uns["scrublet"]["threshold"] == 0.3


def _bad_inputs(pbmc_small):
    small = pbmc_small[:60].copy()
    narrow = small[:, :40].copy()
    narrow_sim = gpusc.pp.scrublet_simulate_doublets(narrow)
    one_cell = pbmc_small[:100].copy()
    one_cell.obs["batch"] = ["a"] * 99 + ["b"]
    nan = small.copy()
    nan.X = nan.X.toarray()
    nan.X[0, 0] = np.nan
    negative = small.copy()
    negative.X = negative.X.toarray()
    negative.X[0, 0] = -1
    return [
        (small, dict(batch_key="nope"), "`batch_key` must be a column of .obs"),
        (one_cell, dict(batch_key="batch"), "batch 'b' of batch_key='batch' has 1 cell"),
        (narrow, dict(adata_sim=narrow_sim, n_prin_comps=40), "must be strictly less than min"),
        (small, dict(n_prin_comps=0), "n_prin_comps=0 must be a positive integer"),
        (nan, {}, "NaN or inf"),
        (negative, {}, "negative values"),
        (small, dict(knn_dist_metric="chebyshev"), "knn_dist_metric='chebyshev' is not supported"),
        (small, dict(synthetic_doublet_umi_subsampling=0), "synthetic_doublet_umi_subsampling=0"),
        (small, dict(adata_sim=small[:, :10].copy()), "adata_sim has 10 genes"),
    ]


def test_bad_input_leaves_adata_unchanged(pbmc_small):
    for adata, kwargs, message in _bad_inputs(pbmc_small):
        snap = snapshot(adata)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
            gpusc.pp.scrublet(adata, verbose=False, **kwargs)
        assert_unchanged(adata, snap)


@GPU
def test_device_matches_host(pbmc_small):
    host, device = pbmc_small.copy(), pbmc_small.copy()
    device.X = to_device(sparse.csr_matrix(device.X))
    gpusc.pp.scrublet(host, verbose=False)
    gpusc.pp.scrublet(device, verbose=False)
    np.testing.assert_array_equal(device.uns["scrublet"]["doublet_parents"], host.uns["scrublet"]["doublet_parents"])
    # the embedding comes from cuBLAS/cuSOLVER instead of BLAS/LAPACK: last-bit differences can
    # reorder near-ties, so most scores agree exactly and the rest by one neighbour
    same = device.obs["doublet_score"].to_numpy() == host.obs["doublet_score"].to_numpy()
    assert same.mean() > 0.99
    sim = device.uns["scrublet"]["doublet_parents"]
    assert sim.dtype == np.int64
    thinned = gpusc.pp.scrublet_simulate_doublets(device, synthetic_doublet_umi_subsampling=0.5)
    np.random.seed(0)
    expected = sc.pp.scrublet_simulate_doublets(pbmc_small, synthetic_doublet_umi_subsampling=0.5)
    np.random.seed(0)
    thinned = gpusc.pp.scrublet_simulate_doublets(device, synthetic_doublet_umi_subsampling=0.5)
    assert abs(thinned.X.get() - expected.X).max() == 0
