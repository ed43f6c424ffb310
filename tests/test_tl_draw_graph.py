"""tl.draw_graph against scanpy 1.12's: on the host it is scanpy's own path (here without the
fa2-modified package: scanpy's fallback to igraph's "fr"), so the layouts are identical."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scanpy as sc

import gpusc


@pytest.fixture(scope="module")
def graph(pbmc_graph):
    keep = np.sort(np.random.default_rng(1).choice(pbmc_graph.n_obs, 300, replace=False))
    adata = pbmc_graph[keep].copy()
    sc.pp.neighbors(adata, n_neighbors=10, transformer="sklearn")
    return adata


@pytest.mark.parametrize("kwargs", [{}, {"layout": "fr", "niter": 50, "random_state": 3},
                                    {"layout": "drl", "key_added_ext": "mine"}])
def test_host_as_scanpy(graph, kwargs):
    ref = sc.tl.draw_graph(graph, copy=True, **kwargs)
    ours = gpusc.tl.draw_graph(graph, copy=True, device="cpu", **kwargs)
    keys = [k for k in ref.obsm if k.startswith("X_draw_graph_")]
    assert len(keys) == 1 and set(ours.obsm) == set(ref.obsm)
    if importlib.util.find_spec("fa2_modified") is None and not kwargs:
        assert keys == ["X_draw_graph_fr"]  # scanpy's fallback without fa2-modified
    np.testing.assert_array_equal(ours.obsm[keys[0]], ref.obsm[keys[0]])
    assert ours.uns["draw_graph"] == ref.uns["draw_graph"]
    assert not any(k.startswith("X_draw_graph") for k in graph.obsm)  # copy=True


def test_bad_input_as_scanpy(graph):
    adata = graph.copy()
    for kwargs, error in (({"layout": "nope"}, ValueError),
                          ({"neighbors_key": "missing"}, KeyError)):
        with pytest.raises(error) as theirs:
            sc.tl.draw_graph(adata, **kwargs)
        with pytest.raises(error) as ours:
            gpusc.tl.draw_graph(adata, device="cpu", **kwargs)
        assert str(ours.value) == str(theirs.value)
    assert not any(k.startswith("X_draw_graph") for k in adata.obsm) and "draw_graph" not in adata.uns


@pytest.mark.gpu
def test_device_fa(graph):
    pytest.importorskip("cugraph", reason="ForceAtlas2 on the device needs cuGraph")
    ours = gpusc.tl.draw_graph(graph, copy=True, device="gpu")
    pos = ours.obsm["X_draw_graph_fa"]
    assert pos.shape == (graph.n_obs, 2) and np.isfinite(pos).all()
    assert ours.uns["draw_graph"]["params"] == {"layout": "fa", "random_state": 0}
    from sklearn.manifold import trustworthiness

    ref = sc.tl.draw_graph(graph, copy=True)
    ref_key = next(k for k in ref.obsm if k.startswith("X_draw_graph_"))
    x = graph.obsm["X_pca"]
    assert trustworthiness(x, pos, n_neighbors=10) >= trustworthiness(x, ref.obsm[ref_key], n_neighbors=10) - 0.05
