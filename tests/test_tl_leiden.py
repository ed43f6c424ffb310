"""tl.leiden / tl.louvain against scanpy 1.12 on pbmc3k (1,500 cells, scanpy's own graph).

On the CPU gpusc runs scanpy's igraph/leidenalg path, so those results must equal
scanpy's. The device path's own pieces (relabelling, restrict_to merging, modularity,
several resolutions) are tested here by standing a CPU Leiden in for pylibcugraph; the
real device path runs in the GPU-marked tests.
"""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from sklearn.metrics import adjusted_rand_score

import gpusc
from gpusc.tl import _leiden



@pytest.fixture(scope="module")
def pbmc(pbmc_graph):
    return pbmc_graph.copy()


def tutorial_ari(adata, key):
    ok = adata.obs["louvain"].notna().to_numpy()
    return adjusted_rand_score(adata.obs["louvain"][ok].astype(str), adata.obs[key][ok])


def scanpy_leiden(adata, **kw):
    ref = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sc.tl.leiden(ref, **kw)
    return ref


@pytest.fixture
def fake_device(monkeypatch):
    """Run the device path with a CPU Leiden (igraph) standing in for pylibcugraph."""
    import random

    import igraph as ig

    def partition(func, graph, resolution, random_state, use_weights, n_iterations):
        coo = graph.tocoo()
        upper = coo.row < coo.col
        g = ig.Graph(n=graph.shape[0], edges=list(zip(coo.row[upper], coo.col[upper], strict=True)))
        weights = coo.data[upper] if use_weights else None
        ig.set_random_number_generator(random.Random(0 if random_state is None else random_state))
        part = g.community_leiden(objective_function="modularity", weights=weights,
                                  resolution=1.0 if resolution is None else resolution,
                                  n_iterations=n_iterations if n_iterations is not None else -1)
        ig.set_random_number_generator(random)  # igraph's default again
        labels = np.asarray(part.membership)
        return labels.max() - labels  # scramble the numbering: the caller renumbers by size

    monkeypatch.setitem(sys.modules, "pylibcugraph", types.ModuleType("pylibcugraph"))
    monkeypatch.setattr(_leiden, "resolve_device", lambda device=None: "gpu")
    monkeypatch.setattr(_leiden, "_gpu_partition", partition)


# ---------------------------------------------------------------- CPU path = scanpy

@pytest.mark.parametrize("flavor", ["igraph", None])
def test_cpu_equals_scanpy(pbmc, flavor):
    kw = {"flavor": flavor, "n_iterations": 2} if flavor else {}
    ref = scanpy_leiden(pbmc, **kw)
    ours = pbmc.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gpusc.tl.leiden(ours, device="cpu", **kw)
    pd.testing.assert_series_equal(ours.obs["leiden"], ref.obs["leiden"])
    assert ours.uns["leiden"]["params"] == ref.uns["leiden"]["params"]
    assert ours.uns["leiden"]["modularity"] == pytest.approx(ref.uns["leiden"]["modularity"])
    assert tutorial_ari(ours, "leiden") >= tutorial_ari(ref, "leiden") - 0.05
    assert tutorial_ari(ours, "leiden") > 0.5


@pytest.mark.parametrize("flavor", ["igraph", None])
def test_modularity_formula_matches_scanpy(pbmc, flavor):
    """Our host formula gives the number scanpy reports for each flavor."""
    kw = {"flavor": flavor, "n_iterations": 2, "resolution": 0.7} if flavor else {}
    ref = scanpy_leiden(pbmc, **kw)
    labels = ref.obs["leiden"].cat.codes.to_numpy()
    graph = pbmc.obsp["connectivities"]
    if flavor == "igraph":
        q = _leiden.modularity(graph, labels, resolution=0.7, weighted=True)
    else:
        q = _leiden.modularity(graph, labels, weighted=False)
    assert q == pytest.approx(ref.uns["leiden"]["modularity"], rel=1e-10)
    assert _leiden.modularity(graph, labels) == pytest.approx(
        sc.metrics.modularity(graph, labels, is_directed=False), rel=1e-10)


def test_cpu_several_resolutions(pbmc):
    ours = pbmc.copy()
    gpusc.tl.leiden(ours, resolution=[0.5, 1.0], flavor="igraph", n_iterations=2, device="cpu")
    for r in (0.5, 1.0):
        ref = scanpy_leiden(pbmc, resolution=r, flavor="igraph", n_iterations=2)
        np.testing.assert_array_equal(ours.obs[f"leiden_{r}"], ref.obs["leiden"])
        assert ours.uns[f"leiden_{r}"]["params"]["resolution"] == r
        assert ours.uns[f"leiden_{r}"]["modularity"] == pytest.approx(ref.uns["leiden"]["modularity"])
    assert ours.obs["leiden_0.5"].nunique() < ours.obs["leiden_1.0"].nunique()
    assert "leiden" not in ours.obs


def test_cpu_restrict_to(pbmc):
    base = scanpy_leiden(pbmc, flavor="igraph", n_iterations=2)
    ref = base.copy()
    sc.tl.leiden(ref, restrict_to=("leiden", ["0", "1"]), flavor="igraph", n_iterations=2)
    ours = base.copy()
    gpusc.tl.leiden(ours, restrict_to=("leiden", ["0", "1"]), flavor="igraph", n_iterations=2,
                    device="cpu")
    pd.testing.assert_series_equal(ours.obs["leiden_R"], ref.obs["leiden_R"])
    assert ours.uns["leiden_R"]["modularity"] == pytest.approx(ref.uns["leiden_R"]["modularity"])


def test_cpu_louvain_igraph(pbmc):
    import random

    ref = pbmc.copy()
    random.seed(0)  # igraph's multilevel draws from Python's random; scanpy does not seed it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.louvain(ref, flavor="igraph")
    ours = pbmc.copy()
    random.seed(0)
    gpusc.tl.louvain(ours, flavor="igraph", device="cpu")
    pd.testing.assert_series_equal(ours.obs["louvain"], ref.obs["louvain"])
    assert ours.uns["louvain"]["params"] == ref.uns["louvain"]["params"]
    labels = ours.obs["louvain"].cat.codes.to_numpy()
    assert ours.uns["louvain"]["modularity"] == pytest.approx(
        _leiden.modularity(pbmc.obsp["connectivities"], labels, weighted=False))


def test_copy_leaves_input(pbmc):
    before = pbmc.copy()
    out = gpusc.tl.leiden(pbmc, flavor="igraph", n_iterations=2, device="cpu", copy=True)
    assert "leiden" in out.obs and "leiden" not in pbmc.obs
    assert set(pbmc.uns) == set(before.uns)


# ---------------------------------------------------------------- device path's own pieces

def test_device_path_flow(pbmc, fake_device):
    ref = scanpy_leiden(pbmc, flavor="igraph", n_iterations=2)
    ours = pbmc.copy()
    gpusc.tl.leiden(ours, flavor="igraph", n_iterations=2)
    codes = ours.obs["leiden"].astype(int).to_numpy()
    sizes = np.bincount(codes)
    assert (np.diff(sizes) <= 0).all()  # numbered by size, largest "0"
    assert list(ours.obs["leiden"].cat.categories) == [str(i) for i in range(sizes.size)]
    assert ours.uns["leiden"]["params"] == ref.uns["leiden"]["params"]
    q_ref = ref.uns["leiden"]["modularity"]
    assert abs(ours.uns["leiden"]["modularity"] - q_ref) <= 0.02 * abs(q_ref)
    assert tutorial_ari(ours, "leiden") >= tutorial_ari(ref, "leiden") - 0.05
    assert adjusted_rand_score(ours.obs["leiden"], ref.obs["leiden"]) > 0.8  # another RNG


def test_device_path_modularity_default_flavor(pbmc, fake_device):
    """flavor=None: scanpy reports leidenalg's unweighted modularity; so does the device path."""
    ref = scanpy_leiden(pbmc)
    ours = pbmc.copy()
    gpusc.tl.leiden(ours)
    q_ref = ref.uns["leiden"]["modularity"]
    assert abs(ours.uns["leiden"]["modularity"] - q_ref) <= 0.02 * abs(q_ref)
    assert tutorial_ari(ours, "leiden") >= tutorial_ari(ref, "leiden") - 0.05


def test_device_path_resolutions_and_restrict(pbmc, fake_device):
    ours = pbmc.copy()
    gpusc.tl.leiden(ours, resolution=[0.5, 1.0], flavor="igraph")
    assert ours.obs["leiden_0.5"].nunique() < ours.obs["leiden_1.0"].nunique()
    assert ours.uns["leiden_0.5"]["params"]["resolution"] == 0.5
    gpusc.tl.leiden(ours, restrict_to=("leiden_1.0", ["0", "1"]), flavor="igraph")
    merged = ours.obs["leiden_R"].astype(str)
    inside = ours.obs["leiden_1.0"].isin(["0", "1"]).to_numpy()
    assert merged[inside].str.startswith("0-1,").all()
    assert merged[inside].nunique() >= 2
    np.testing.assert_array_equal(merged[~inside], ours.obs["leiden_1.0"].astype(str)[~inside])
    gpusc.tl.louvain(ours, use_weights=True)
    assert ours.uns["louvain"]["modularity"] > 0.6


def test_device_path_deterministic(pbmc, fake_device):
    one, two = pbmc.copy(), pbmc.copy()
    gpusc.tl.leiden(one, random_state=3, flavor="igraph")
    gpusc.tl.leiden(two, random_state=3, flavor="igraph")
    pd.testing.assert_series_equal(one.obs["leiden"], two.obs["leiden"])


def test_by_size_relabels():
    labels = _leiden._by_size(np.array([7, 7, 3, 3, 3, 9, 9]))
    np.testing.assert_array_equal(labels, [1, 1, 0, 0, 0, 2, 2])


def test_missing_pylibcugraph_warns_once(pbmc, monkeypatch):
    monkeypatch.setitem(sys.modules, "pylibcugraph", None)  # import raises ImportError
    monkeypatch.setattr(_leiden, "resolve_device", lambda device=None: "gpu")
    ours = pbmc.copy()
    with pytest.warns(UserWarning, match="pylibcugraph is not installed") as record:
        gpusc.tl.leiden(ours, resolution=[0.5, 1.0], flavor="igraph", n_iterations=2)
    assert sum("pylibcugraph" in str(w.message) for w in record) == 1
    ref = scanpy_leiden(pbmc, resolution=0.5, flavor="igraph", n_iterations=2)
    np.testing.assert_array_equal(ours.obs["leiden_0.5"], ref.obs["leiden"])


# ---------------------------------------------------------------- bad input

def test_no_neighbors(pbmc):
    bare = pbmc.copy()
    del bare.uns["neighbors"]
    before = bare.copy()
    with pytest.raises(ValueError, match="run pp.neighbors first"):
        gpusc.tl.leiden(bare, flavor="igraph", device="cpu")
    with pytest.raises(ValueError, match="run pp.neighbors first"):
        gpusc.tl.louvain(bare, flavor="igraph", device="cpu")
    assert list(bare.obs.columns) == list(before.obs.columns) and set(bare.uns) == set(before.uns)


def test_unknown_keys(pbmc):
    with pytest.raises(KeyError, match="neighbors_key='nope'"):
        gpusc.tl.leiden(pbmc, neighbors_key="nope", device="cpu")
    with pytest.raises(KeyError, match="obsp='nope'"):
        gpusc.tl.leiden(pbmc, obsp="nope", device="cpu")
    with pytest.raises(ValueError, match="not a valid category"):
        gpusc.tl.leiden(pbmc, restrict_to=("louvain", ["no such cluster"]), device="cpu")
    assert "leiden" not in pbmc.obs


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_leiden(pbmc):
    pytest.importorskip("pylibcugraph")
    ref = scanpy_leiden(pbmc)
    ours = pbmc.copy()
    gpusc.tl.leiden(ours, device="gpu")
    q_ref = ref.uns["leiden"]["modularity"]
    assert abs(ours.uns["leiden"]["modularity"] - q_ref) <= 0.02 * abs(q_ref)
    assert tutorial_ari(ours, "leiden") >= tutorial_ari(ref, "leiden") - 0.05
    again = pbmc.copy()
    gpusc.tl.leiden(again, device="gpu")
    pd.testing.assert_series_equal(ours.obs["leiden"], again.obs["leiden"])
    gpusc.tl.leiden(ours, resolution=[0.5, 1.0], device="gpu")
    gpusc.tl.leiden(ours, restrict_to=("leiden", ["0"]), device="gpu")
    gpusc.tl.louvain(ours, device="gpu")
    assert ours.obs["leiden_0.5"].nunique() <= ours.obs["leiden_1.0"].nunique()
    assert ours.obs["leiden_R"].astype(str).str.startswith("0,").sum() == (ours.obs["leiden"] == "0").sum()
    assert ours.uns["louvain"]["modularity"] > 0.5
