"""pp.bbknn against the bbknn package in exact mode (the oracle: scanpy's
``sc.external.pp.bbknn(approx=False)``, scipy's cKDTree or scikit-learn's KDTree), and its
reference search against distances summed directly (scipy's cdist)."""

from __future__ import annotations

import re
import warnings

import _on_threads as on_threads
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from _compare import assert_unchanged, snapshot
from conftest import read_real
from scipy import sparse
from scipy.spatial.distance import cdist
from test_topk_device_flow import _Kernel, _manhattan_tile, _topk_tile

import gpusc
from gpusc.pp import _bbknn

pytest.importorskip("bbknn", reason="the oracle: pip install bbknn (the test extra has it)")

DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def kang():
    adata = read_real("kang2018_pbmc_ctrl_stim_2000.h5ad")
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=50)
    return adata


@pytest.fixture(scope="module")
def pbmc(pbmc_pca):
    """pbmc3k's scanpy PCA with three batches of unequal size."""
    adata = sc.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(pbmc_pca))]))
    adata.obsm["X_pca"] = np.array(pbmc_pca)
    adata.obs["batch"] = pd.Categorical(np.random.default_rng(0).choice(["a", "b", "c"], len(pbmc_pca),
                                                                         p=[0.5, 0.3, 0.2]))
    return adata


def run_both(adata, **kwargs):
    theirs, ours = adata.copy(), adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.external.pp.bbknn(theirs, approx=False, **kwargs)
    gpusc.pp.bbknn(ours, **kwargs)
    return theirs, ours


def assert_same_graph(theirs, ours, key="neighbors"):
    params_theirs, params_ours = theirs.uns[key]["params"], ours.uns[key]["params"]
    assert params_ours["bbknn"].pop("computation") == "brute"
    params_theirs["bbknn"].pop("computation")
    assert params_ours == params_theirs
    assert type(params_ours["n_pcs"]) is type(params_theirs["n_pcs"])
    for name in ("distances", "connectivities"):
        obsp_key = theirs.uns[key][f"{name}_key"]
        assert ours.uns[key][f"{name}_key"] == obsp_key
        got, expected = ours.obsp[obsp_key], theirs.obsp[obsp_key]
        assert isinstance(got, sparse.csr_matrix) and got.dtype == expected.dtype
        assert (abs(got.sign()) != abs(expected.sign())).nnz == 0, f"{name}: another set of edges"
        # distances: float64 sums in another order (measured 3.6e-15). connectivities: umap-learn
        # on gpusc's lists gives bbknn's exactly; gpusc's membership kernel (_kernels.connectivity,
        # shared with pp.neighbors) runs umap's σ bisection in float32 where umap-learn's loop
        # variables are float64: measured 4.2e-6 on kang2018 (k = 6), 1.2e-7 elsewhere
        atol = 1e-12 if name == "distances" else 1e-5
        assert abs(got - expected).max() <= atol, name


def test_matches_bbknn_on_kang2018(kang):
    theirs, ours = run_both(kang, batch_key="stim")
    assert_same_graph(theirs, ours)
    assert ours.uns["neighbors"]["params"]["n_neighbors"] == 6


@pytest.mark.parametrize("kwargs", [
    dict(neighbors_within_batch=5, n_pcs=20, trim=30),
    dict(metric="manhattan", key_added="bb"),
    dict(set_op_mix_ratio=0.5, local_connectivity=2, trim=0),
    dict(metric="cosine"),  # bbknn's exact mode does not take it: euclidean, with its warning
], ids=["trim", "manhattan", "mix", "unknown_metric"])
def test_options_match_bbknn(pbmc, kwargs):
    theirs, ours = run_both(pbmc, batch_key="batch", **kwargs)
    assert_same_graph(theirs, ours, kwargs.get("key_added", "neighbors"))


def test_old_positional_arguments_warn(pbmc):
    adata = pbmc.copy()
    with pytest.warns(FutureWarning):
        gpusc.pp.bbknn(adata, "batch")
    assert "connectivities" in adata.obsp


def blobs(n, dim, seed, offset=0.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=6, size=(5, dim))
    return offset + centers[rng.integers(5, size=n)] + rng.normal(size=(n, dim))


def direct_query(x, refs, k, metric):
    """The oracle: every distance summed directly (scipy's cdist), then sorted."""
    d = cdist(x, x[refs], "cityblock" if metric == "manhattan" else metric)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return refs[order], np.take_along_axis(d, order, axis=1)


def assert_same_neighbours(idx, dist, expected_idx, expected_dist, rtol=1e-9):
    np.testing.assert_allclose(dist, expected_dist, rtol=rtol, atol=1e-9)
    assert (np.sort(idx, axis=1) == np.sort(expected_idx, axis=1)).all()


@pytest.mark.parametrize("metric", ["euclidean", "manhattan"])
def test_query_knn_is_exact(metric):
    x = blobs(900, 30, seed=1)
    refs = np.flatnonzero(np.random.default_rng(2).random(900) < 0.3)
    idx, dist = _bbknn.query_knn(x, refs, 7, metric)
    assert_same_neighbours(idx, dist, *direct_query(x, refs, 7, metric))
    inside = np.isin(np.arange(900), refs)
    np.testing.assert_array_equal(idx[inside, 0], np.flatnonzero(inside))  # a reference is its own first


def hard_for_float32(seed=3):
    """Clusters 50 apart with neighbours 1e-3 apart: float32 products cannot rank these rows."""
    rng = np.random.default_rng(seed)
    x = 1000 + rng.normal(scale=1e-3, size=(400, 8))
    x[:, 0] += 50 * rng.integers(3, size=400)
    return x, np.arange(0, 400, 2)


def test_uncertified_rows_are_redone_in_float64(monkeypatch):
    passes = []
    real_pass = _bbknn._pass

    def recording(*args):
        passes.append((args[6], int(args[2].shape[0])))  # precision, query rows
        return real_pass(*args)

    monkeypatch.setattr(_bbknn, "_pass", recording)
    x, refs = hard_for_float32()
    idx, dist = _bbknn.query_knn(x, refs, 5, "euclidean")
    assert [p for p, _ in passes] == ["float32", "float64"] and 0 < passes[1][1] <= 400
    assert_same_neighbours(idx, dist, *direct_query(x, refs, 5, "euclidean"), rtol=1e-7)


def test_duplicates_put_the_cell_itself_first():
    x = np.repeat(blobs(30, 5, seed=4), 4, axis=0)  # every point four times
    codes = np.arange(120) % 2
    idx, dist = _bbknn.batch_balanced_knn(x, codes, 2, 3, "euclidean")
    np.testing.assert_array_equal(idx[:, 0], np.arange(120))
    assert (dist[:, :4] == 0).all()


@pytest.fixture
def device_flow(monkeypatch):
    """query_knn's device flow with NumPy as CuPy and topk.cu's kernels emulated."""
    fake = on_threads.numpy_as_cupy(monkeypatch)
    for name in ("ones", "abs", "argsort", "take_along_axis", "empty"):
        make = getattr(np, name)
        monkeypatch.setattr(fake, name, lambda *a, make=make, **k: np.asarray(make(*a, **k)).view(on_threads.DeviceArray),
                            raising=False)
    kernels = {f"{kind}<{t}>": _Kernel(body) for kind, body in (("topk_tile", _topk_tile),
                                                               ("manhattan_tile", _manhattan_tile))
               for t in ("float", "double")}
    monkeypatch.setattr(_bbknn._topk, "_kernel", lambda name: kernels[name])
    return kernels


@pytest.mark.parametrize("metric", ["euclidean", "manhattan"])
def test_device_flow_is_exact(device_flow, metric):
    x = blobs(700, 20, seed=5)
    refs = np.flatnonzero(np.arange(700) % 3 == 0)
    idx, dist = _bbknn.query_knn(x, refs, 6, metric, on_device=True, query_block=256, ref_block=100)
    assert_same_neighbours(idx, dist, *direct_query(x, refs, 6, metric))
    tiles = device_flow["topk_tile<float>" if metric == "euclidean" else "topk_tile<double>"].launches
    assert len(tiles) == 3 * 3  # query blocks × reference blocks


def test_device_flow_redoes_uncertified_rows(device_flow):
    x, refs = hard_for_float32()
    idx, dist = _bbknn.query_knn(x, refs, 5, "euclidean", on_device=True)
    assert device_flow["topk_tile<double>"].launches, "no float64 redo ran"
    assert_same_neighbours(idx, dist, *direct_query(x, refs, 5, "euclidean"), rtol=1e-7)


def test_bad_input_leaves_adata_unchanged(pbmc):
    tiny = pbmc[:200].copy()
    tiny.obs["one_cell"] = ["a"] * 199 + ["b"]
    tiny.obs["missing"] = pd.Categorical(["a"] * 199 + [np.nan])
    cases = [
        (dict(batch_key="nope"), "Batch key 'nope' not present"),
        (dict(batch_key="batch", use_rep="X_umap"), "Did not find X_umap in `.obsm.keys()`"),
        (dict(batch_key="one_cell"), "Not all batches have at least `neighbors_within_batch` cells"),
        (dict(batch_key="missing"), "1 missing labels"),
        (dict(batch_key="batch", n_pcs=0), "n_pcs=0 must be a positive integer"),
        (dict(batch_key="batch", trim=-1), "trim=-1"),
        (dict(batch_key="batch", metric="chebyshev"), "metric='chebyshev' is not supported"),
        (dict(batch_key="batch", set_op_mix_ratio=2), "set_op_mix_ratio=2"),
    ]
    for kwargs, message in cases:
        snap = snapshot(tiny)
        with pytest.raises(ValueError, match=re.escape(message)):
            gpusc.pp.bbknn(tiny, **kwargs)
        assert_unchanged(tiny, snap)


@pytest.mark.parametrize("device", DEVICES)
def test_same_result_run_to_run(pbmc, device):
    first, second = pbmc.copy(), pbmc.copy()
    gpusc.pp.bbknn(first, batch_key="batch", device=device)
    gpusc.pp.bbknn(second, batch_key="batch", device=device)
    for key in ("distances", "connectivities"):
        assert (first.obsp[key] != second.obsp[key]).nnz == 0


@pytest.mark.gpu
def test_device_matches_bbknn(kang):
    theirs = kang.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.external.pp.bbknn(theirs, batch_key="stim", approx=False)
    ours = kang.copy()
    gpusc.pp.bbknn(ours, batch_key="stim", device="gpu")
    assert_same_graph(theirs, ours)
