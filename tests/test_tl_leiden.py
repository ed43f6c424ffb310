"""tl.leiden / tl.louvain against scanpy 1.12 on pbmc3k (1,500 cells, scanpy's own graph).

On the CPU gpusc runs scanpy's leidenalg/louvain code, and its own copy of scanpy's
igraph flavor (no scanpy import), so those results must equal scanpy's. The device path's own pieces (relabelling, restrict_to merging, modularity,
several resolutions) are tested here by standing a CPU Leiden in for pylibcugraph; the
real device path runs in the GPU-marked tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from sklearn.metrics import adjusted_rand_score

import gpusc
from _compare import assert_unchanged, snapshot
from gpusc.tl import _leiden

# scanpy 1.11's leiden records no uns[key]["modularity"] (gpusc records 1.12's on both)
MODULARITY_112 = pytest.mark.scanpy_112("scanpy 1.11's leiden writes no uns['leiden']['modularity']")


@pytest.fixture
def pbmc(pbmc_graph):
    """A writable copy for each test (the session's graph is read-only)."""
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
def test_cpu_passes_everything_to_scanpy(pbmc, flavor):
    """Plumbing: every argument reaches the CPU path (scanpy's code for leidenalg, ours for
    igraph: tested in depth below), restrict_to too, and the keys come back where scanpy
    writes them."""
    kw = dict(resolution=0.7, random_state=3, key_added="clusters", use_weights=False)
    kw |= {"flavor": flavor, "n_iterations": 2} if flavor else {}
    ref, ours = pbmc.copy(), pbmc.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sc.tl.leiden(ref, **kw)
        gpusc.tl.leiden(ours, device="cpu", **kw)
        restrict = dict(kw, restrict_to=("clusters", ["0", "1"]), key_added="clusters_R")
        sc.tl.leiden(ref, **restrict)
        gpusc.tl.leiden(ours, device="cpu", **restrict)
    for key in ("clusters", "clusters_R"):
        pd.testing.assert_series_equal(ours.obs[key], ref.obs[key])
        # what scanpy writes (1.12: params and modularity; 1.11: params), and 1.12's keys
        assert {k: ours.uns[key][k] for k in ref.uns[key]} == ref.uns[key]
        assert set(ours.uns[key]) == {"params", "modularity"}
    assert "leiden" not in ours.obs and "leiden" not in ours.uns


@MODULARITY_112
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


@MODULARITY_112
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


@pytest.mark.scanpy_112("scanpy 1.11 has no scanpy.metrics.modularity, the oracle of louvain's modularity")
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
    # the modularity is a gpusc extra: unweighted (use_weights=False), against scanpy's metric
    # (igraph) on the graph's edges with weight 1
    labels = ours.obs["louvain"].cat.codes.to_numpy()
    edges = pbmc.obsp["connectivities"].copy()
    edges.data[:] = 1.0
    assert ours.uns["louvain"]["modularity"] == pytest.approx(
        sc.metrics.modularity(edges, labels, is_directed=False), rel=1e-10)


def test_copy_leaves_input(pbmc):
    before = snapshot(pbmc)
    out = gpusc.tl.leiden(pbmc, flavor="igraph", n_iterations=2, device="cpu", copy=True)
    assert "leiden" in out.obs and "leiden" in out.uns
    assert_unchanged(pbmc, before)


# ---------------------------------------------------------------- CPU igraph flavor = scanpy's
# gpusc runs scanpy's flavor="igraph" itself (python-igraph, no scanpy import): the labels,
# categories and uns must be exactly scanpy's.

def assert_as_scanpy(ours, ref, key):
    pd.testing.assert_series_equal(ours.obs[key], ref.obs[key])
    # what scanpy writes (1.12: params and modularity, exactly; 1.11: params), and 1.12's keys
    assert {k: ours.uns[key][k] for k in ref.uns[key]} == ref.uns[key]
    assert set(ours.uns[key]) == {"params", "modularity"}
    assert set(ours.obs) == set(ref.obs) and set(ours.uns) == set(ref.uns)


def igraph_both(adata, **kw):
    """(scanpy's, ours) leiden(flavor="igraph") on copies of adata, global NumPy seed reset
    before each (random_state=None draws from it)."""
    kw = {"flavor": "igraph", "n_iterations": 2} | kw
    ref, ours = adata.copy(), adata.copy()
    np.random.seed(11)
    sc.tl.leiden(ref, **kw)
    np.random.seed(11)
    gpusc.tl.leiden(ours, device="cpu", **kw)
    return ours, ref


@pytest.mark.parametrize(("resolution", "random_state", "use_weights", "n_iterations"), [
    (1, 0, True, 2),        # gpusc run's call
    (0.3, 0, True, 2),
    (2.5, 7, True, -1),
    (1.0, 123, False, 2),
    (0.6, None, False, 3),
])
def test_igraph_flavor_as_scanpy(pbmc, resolution, random_state, use_weights, n_iterations):
    ours, ref = igraph_both(pbmc, resolution=resolution, random_state=random_state,
                            use_weights=use_weights, n_iterations=n_iterations, directed=False)
    assert_as_scanpy(ours, ref, "leiden")
    assert ours.obs["leiden"].nunique() > 3


def test_igraph_flavor_random_state_forms(pbmc):
    """A RandomState is drawn from (and advanced) as scanpy does; None uses NumPy's global one."""
    ref, ours = pbmc.copy(), pbmc.copy()
    ref_rng, our_rng = np.random.RandomState(5), np.random.RandomState(5)
    for r in (0.5, 1.5):
        sc.tl.leiden(ref, resolution=r, random_state=ref_rng, flavor="igraph", n_iterations=2,
                     key_added=f"l{r}")
        gpusc.tl.leiden(ours, resolution=r, random_state=our_rng, flavor="igraph", n_iterations=2,
                        key_added=f"l{r}", device="cpu")
        pd.testing.assert_series_equal(ours.obs[f"l{r}"], ref.obs[f"l{r}"])
    assert our_rng.randint(1 << 30) == ref_rng.randint(1 << 30)
    np.random.seed(2)
    gpusc.tl.leiden(ours, random_state=None, flavor="igraph", n_iterations=2, device="cpu")
    after_ours = np.random.randint(1 << 30)
    np.random.seed(2)
    sc.tl.leiden(ref, random_state=None, flavor="igraph", n_iterations=2)
    assert np.random.randint(1 << 30) == after_ours
    assert_as_scanpy(ours, ref, "leiden")


@pytest.mark.parametrize("restrict", [["0", "1"], ["3"], ["2", "0", "5"]])
def test_igraph_flavor_restrict_to(pbmc, restrict):
    base, _ = igraph_both(pbmc, resolution=1.0)
    for key_added in ("leiden", "sub"):
        ours, ref = igraph_both(base, resolution=0.8, random_state=4,
                                restrict_to=("leiden", restrict), key_added=key_added)
        assert_as_scanpy(ours, ref, "leiden_R" if key_added == "leiden" else "sub")


@pytest.mark.parametrize("kw", [
    {"objective_function": "CPM", "resolution": 0.05},
    {"beta": 0.05, "resolution": 1.2, "random_state": 9},
    {"resolution": None},  # igraph's default resolution (1)
])
def test_igraph_flavor_clustering_args(pbmc, kw):
    ours, ref = igraph_both(pbmc, **kw)
    assert_as_scanpy(ours, ref, "leiden")


def test_igraph_flavor_odd_adjacency(pbmc):
    """A user adjacency with duplicate entries, explicit zeros and unsorted indices: scanpy's
    graph has one edge per non-zero entry, each duplicate weighted by the entries' sum."""
    from scipy import sparse

    graph = pbmc.obsp["connectivities"].tocoo()
    rng = np.random.default_rng(3)
    order = rng.permutation(graph.nnz)
    dup = rng.choice(graph.nnz, 500, replace=False)
    rows = np.concatenate([graph.row[order], graph.row[dup], graph.row[dup[:50]]])
    cols = np.concatenate([graph.col[order], graph.col[dup], graph.col[dup[:50]]])
    vals = np.concatenate([graph.data[order], graph.data[dup] * 0.5, np.zeros(50, np.float32)])
    adjacency = sparse.csr_matrix((vals, (rows, cols)), shape=graph.shape)  # coo -> csr: sums
    adjacency = sparse.csr_matrix((np.concatenate([adjacency.data, [0, 0.25]]),
                                   np.concatenate([adjacency.indices, [5, 9]]),
                                   np.concatenate([adjacency.indptr[:-1], [adjacency.nnz + 2]])),
                                  shape=graph.shape)  # two more entries in the last row
    assert not adjacency.has_canonical_format
    ours, ref = igraph_both(pbmc, adjacency=adjacency, resolution=0.9)
    assert_as_scanpy(ours, ref, "leiden")


def test_igraph_flavor_errors_as_scanpy(pbmc):
    before = snapshot(pbmc)
    cases = [({"directed": True}, ValueError), ({"partition_type": object}, ValueError),
             ({"random_state": "seed"}, ValueError)]
    for kw, error in cases:
        with pytest.raises(error) as ref_error:
            sc.tl.leiden(pbmc.copy(), flavor="igraph", **kw)
        with pytest.raises(error, match=re.escape(str(ref_error.value))):
            gpusc.tl.leiden(pbmc, flavor="igraph", device="cpu", **kw)
        assert_unchanged(pbmc, before)
    # the GPU path ignores `directed`, yet rejects it with this flavor as scanpy does (checked
    # before the device is chosen, so on any machine)
    with pytest.raises(ValueError, match="Cannot use igraph’s leiden implementation with a directed graph"):
        gpusc.tl.leiden(pbmc, flavor="igraph", device="gpu", directed=True)
    assert_unchanged(pbmc, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scanpy's igraph flavor warns nothing; neither do we
        gpusc.tl.leiden(pbmc, flavor="igraph", n_iterations=2, device="cpu")


def test_igraph_flavor_imports_no_scanpy():
    """gpusc run's leiden on the CPU imports neither scanpy nor scikit-learn (~1 s of a run)."""
    code = textwrap.dedent("""
        import sys
        import anndata as ad
        import numpy as np
        from scipy import sparse
        import gpusc
        rng = np.random.default_rng(0)
        graph = sparse.random(300, 300, density=0.05, format="csr", random_state=rng)
        adata = ad.AnnData(obs={"i": np.arange(300)})
        adata.obsp["connectivities"] = (graph + graph.T).tocsr()
        adata.uns["neighbors"] = {"connectivities_key": "connectivities"}
        gpusc.tl.leiden(adata, resolution=1.0, flavor="igraph", n_iterations=2, directed=False,
                        device="cpu")
        assert adata.obs["leiden"].nunique() > 1
        loaded = sorted(m for m in ("scanpy", "sklearn") if m in sys.modules)
        assert not loaded, loaded
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- device path's own pieces

@MODULARITY_112
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


@MODULARITY_112
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


# ---------------------------------------------------------------- host graph passes at scale
# modularity against igraph's Graph.modularity, the undirected graph for pylibcugraph
# against scipy's (A + Aᵀ)/2, setdiag(0), eliminate_zeros, sort_indices.

def _igraph_modularity(adjacency, labels, *, resolution=1.0, weighted=True, directed=False):
    """igraph's modularity of the graph: undirected with each pair once (A symmetric), or
    directed with every stored entry an edge."""
    import igraph as ig
    from scipy import sparse

    coo = sparse.coo_matrix(adjacency)
    keep = coo.data != 0
    if not directed:
        keep &= coo.row <= coo.col
    g = ig.Graph(n=adjacency.shape[0], edges=list(zip(coo.row[keep], coo.col[keep], strict=True)),
                 directed=directed)
    return g.modularity(list(labels), weights=coo.data[keep] if weighted else None,
                        resolution=resolution, directed=directed)


def _random_graph(n, density, seed, *, symmetric, self_loops=False):
    from scipy import sparse

    rng = np.random.default_rng(seed)  # (sparse.random is slow at 40,000 x 40,000)
    n_edges = int(density * n * n)
    g = sparse.csr_matrix((rng.random(n_edges), (rng.integers(0, n, n_edges), rng.integers(0, n, n_edges))),
                          shape=(n, n))
    if symmetric:
        g = (g + g.T).tocsr()
    if not self_loops:
        g.setdiag(0)
        g.eliminate_zeros()
    return g


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("resolution", [1.0, 0.6])
def test_modularity_against_igraph(pbmc, weighted, resolution):
    import igraph as ig

    graph = pbmc.obsp["connectivities"]
    coo = graph.tocoo()
    upper = coo.row < coo.col
    g = ig.Graph(n=graph.shape[0], edges=list(zip(coo.row[upper], coo.col[upper], strict=True)))
    good = np.asarray(g.community_multilevel(weights=coo.data[upper]).membership)
    noisy = np.random.default_rng(0).integers(0, 9, graph.shape[0])
    for labels in (good, noisy, good.astype(str)):
        expected = _igraph_modularity(graph, labels if labels.dtype.kind == "i" else good,
                                      resolution=resolution, weighted=weighted)
        assert _leiden.modularity(graph, labels, resolution=resolution, weighted=weighted) \
            == pytest.approx(expected, rel=1e-10, abs=1e-12)
    rand = _random_graph(3000, 0.004, 1, symmetric=True)
    labels = np.random.default_rng(1).integers(0, 25, 3000)
    assert _leiden.modularity(rand, labels, resolution=resolution, weighted=weighted) == pytest.approx(
        _igraph_modularity(rand, labels, resolution=resolution, weighted=weighted), rel=1e-10)
    # a directed graph with self-loops: igraph's directed modularity (column sums ≠ row sums)
    directed = _random_graph(3000, 0.004, 2, symmetric=False, self_loops=True)
    directed.setdiag(0.5)
    assert _leiden.modularity(directed, labels, resolution=resolution, weighted=weighted) \
        == pytest.approx(_igraph_modularity(directed, labels, resolution=resolution,
                                            weighted=weighted, directed=True), rel=1e-10)


def test_modularity_same_for_any_thread_count(monkeypatch):
    """Fixed chunks of rows (several here), partial sums added in chunk order: one number
    for 1 or 2 threads; and the serial column sums (many clusters) give it too."""
    import numba

    rand = _random_graph(40000, 0.0004, 3, symmetric=False, self_loops=True)
    labels = np.random.default_rng(3).integers(0, 300, 40000)
    assert rand.shape[0] > 2 * _leiden.ROWS_PER_CHUNK
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _leiden.modularity(rand, labels)
        numba.set_num_threads(before)
        many = _leiden.modularity(rand, labels)
    finally:
        numba.set_num_threads(before)
    assert one == many
    monkeypatch.setattr(_leiden, "IN_PARTIAL_LIMIT", 0)
    assert _leiden.modularity(rand, labels) == pytest.approx(one, rel=1e-12)
    assert _leiden.modularity(rand, labels) == pytest.approx(
        _igraph_modularity(rand, labels, directed=True), rel=1e-10)


def test_modularity_bad_labels(pbmc):
    graph = pbmc.obsp["connectivities"]
    with pytest.raises(ValueError, match="one label per row"):
        _leiden.modularity(graph, np.zeros(10, int))
    labels = np.zeros(graph.shape[0], object)
    labels[3] = None
    with pytest.raises(ValueError, match="missing values"):
        _leiden.modularity(graph, labels)


def _scipy_undirected(graph):
    """pylibcugraph's input as the scipy steps made it before (the oracle)."""
    from scipy import sparse

    a = sparse.csr_matrix(graph, dtype=np.float64 if graph.dtype == np.float64 else np.float32)
    if (a != a.T).nnz:
        a = ((a + a.T) * 0.5).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    a.sort_indices()
    return a


def _odd_adjacencies():
    """Symmetric and not, float32/float64/int weights, self-loops, stored zeros, weights that
    cancel when symmetrised, a NaN self-loop, duplicates, int64 indices."""
    from scipy import sparse

    rng = np.random.default_rng(4)
    out = []
    for seed in range(6):
        g = _random_graph(80, 0.08, seed, symmetric=seed % 2 == 0, self_loops=seed >= 3)
        if seed == 1:
            g = g.astype(np.float32)
            g.data[:5] = 0.0
        if seed == 2:
            g = (g * 4).astype(np.int64)
        if seed == 3:
            g.data = np.round(g.data * 4) / 4 - 0.25  # zeros and negatives: cancellations
            g = (g - g.T.multiply(rng.random(g.shape) < 0.5)).tocsr()
        if seed == 4:
            g = g.tolil()
            g[7, 7] = np.nan
            g = g.tocsr()
        if seed == 5:
            g.indptr, g.indices = g.indptr.astype(np.int64), g.indices.astype(np.int64)
        out.append(g)
    dup = out[0].tocoo()
    out.append(sparse.csr_matrix((np.r_[dup.data, 1.0, 1.0], (np.r_[dup.row, 2, 9], np.r_[dup.col, 9, 2])),
                                 shape=dup.shape))  # sums duplicates (no canonical flag)
    return out


def test_undirected_graph_as_scipy(pbmc):
    graph = pbmc.obsp["connectivities"]
    out, symmetric = _leiden.undirected_graph(graph)
    assert symmetric and out is graph  # symmetric, no self-loops or zeros: no copy
    for g in _odd_adjacencies():
        out, symmetric = _leiden.undirected_graph(g)
        assert symmetric == ((_as_float_csr(g) != _as_float_csr(g).T).nnz == 0)
        ref = _scipy_undirected(g)
        assert out.has_canonical_format and out.dtype == ref.dtype
        np.testing.assert_array_equal(out.indptr, ref.indptr)
        np.testing.assert_array_equal(out.indices, ref.indices)
        np.testing.assert_array_equal(out.data, ref.data)
        again, _ = _leiden.undirected_graph(g, symmetric=symmetric)  # as the device path calls it
        np.testing.assert_array_equal(again.data, ref.data)


def _as_float_csr(g):
    from scipy import sparse

    return sparse.csr_matrix(g, dtype=np.float64 if g.dtype == np.float64 else np.float32)


def test_device_symmetry_as_scipy(pbmc):
    """The device's exact symmetry test (NumPy standing in for CuPy) against scipy's."""
    for g in [pbmc.obsp["connectivities"], *_odd_adjacencies()]:
        a = _leiden._canonical_csr(g)
        symmetric, dropped = _leiden.device_symmetry(np, a.indptr, a.indices, a.data, a.shape[0])
        assert symmetric == ((_as_float_csr(g) != _as_float_csr(g).T).nnz == 0)
        coo = a.tocoo()
        assert dropped == int(((coo.data == 0) | (coo.row == coo.col)).sum())


@pytest.mark.parametrize("use_weights", [True, False])
@pytest.mark.parametrize("func", ["leiden", "louvain"])
def test_gpu_partition_host_steps(pbmc, monkeypatch, func, use_weights):
    """_gpu_partition with NumPy standing in for CuPy and a pylibcugraph that records the
    graph it is given: the symmetric pbmc graph goes as it is, an asymmetric one with
    self-loops as scipy's oracle makes it; the labels come back by vertex."""
    import _on_threads as on_threads

    fake = on_threads.numpy_as_cupy(monkeypatch)
    for name in ("searchsorted", "minimum", "ones"):
        make = getattr(np, name)
        setattr(fake, name, lambda *a, make=make, **k: np.asarray(make(*a, **k)).view(on_threads.DeviceArray))
    fake.asnumpy = np.asarray
    seen = {}

    def cluster(*, graph, resolution, **kw):
        seen.update(graph, resolution=resolution, **kw)
        n = graph["src_or_offset_array"].size - 1
        vertices = np.random.default_rng(0).permutation(n)
        return vertices, vertices % 3, 0.0

    plc = types.ModuleType("pylibcugraph")
    plc.ResourceHandle = lambda: "handle"
    plc.GraphProperties = lambda **kw: kw
    plc.SGGraph = lambda **kw: kw
    plc.leiden = plc.louvain = cluster
    monkeypatch.setitem(sys.modules, "pylibcugraph", plc)
    asymmetric = _random_graph(120, 0.05, 7, symmetric=False, self_loops=True).astype(np.float32)
    for graph in (pbmc.obsp["connectivities"], asymmetric):
        seen.clear()
        labels = _leiden._gpu_partition(func, graph, 0.5, 3, use_weights, -1)
        ref = _scipy_undirected(graph)
        np.testing.assert_array_equal(seen["src_or_offset_array"], ref.indptr)
        np.testing.assert_array_equal(seen["dst_or_index_array"], ref.indices)
        np.testing.assert_array_equal(seen["weight_array"],
                                      ref.data if use_weights else np.ones_like(ref.data))
        assert seen["graph_properties"] == {"is_symmetric": True, "is_multigraph": False}
        assert seen["resolution"] == 0.5
        np.testing.assert_array_equal(labels, np.arange(graph.shape[0]) % 3)


def test_by_size_rule():
    """Largest cluster 0, equal sizes in the order first met; pylibcugraph's vertex-number
    labels, other integers and strings alike (an independent oracle: np.unique + lexsort)."""
    rng = np.random.default_rng(5)

    def oracle(labels):
        _, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True,
                                              return_counts=True)
        rank = np.empty(first.size, np.int64)
        rank[np.lexsort((first, -counts))] = np.arange(first.size)
        return rank[inverse]

    for labels in (rng.integers(0, 2000, 1000), rng.integers(0, 12, 1000), rng.integers(-5, 5, 300),
                   rng.integers(0, 2**40, 50), np.array(["b", "a", "a", "c", "b"]), np.zeros(0, int)):
        got = _leiden._by_size(labels)
        np.testing.assert_array_equal(got, oracle(labels))
        assert got.dtype == np.int64


def test_store_from_codes_as_strings():
    """The labels' categorical made from codes is the one scanpy's way (strings per cell,
    natsorted categories) makes."""
    import anndata as ad
    from natsort import natsorted

    labels = _leiden._by_size(np.random.default_rng(6).integers(0, 15, 700))
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(700)]))
    _leiden._store(adata, "leiden", labels, None, None)
    groups = labels.astype("U")
    expected = pd.Categorical(values=groups, categories=natsorted(np.unique(groups)))
    pd.testing.assert_series_equal(adata.obs["leiden"],
                                   pd.Series(expected, index=adata.obs_names, name="leiden"))
