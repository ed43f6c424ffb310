"""pp.regress_out against scanpy.pp.regress_out (the oracle)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import gpusc
from _compare import dense, to_host
from conftest import read_real, synthetic_counts, tolerance


def _real():
    a = read_real("pbmc3k_counts_labeled.h5ad")[:500, :]
    a = a[:, np.asarray((a.X > 0).sum(0)).ravel() >= 25][:, :60].copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    obs = pd.DataFrame({"louvain": a.obs["louvain"].to_numpy()}, index=a.obs_names)
    return a.X.toarray(), obs


def _synthetic():
    x = synthetic_counts(240, 60)
    obs = pd.DataFrame({"louvain": pd.Categorical(np.random.default_rng(1).choice(list("abcd"), 240))},
                       index=[f"c{i}" for i in range(240)])
    return x, obs


_DATA = {"real": _real, "synthetic": _synthetic}
_ORACLE: dict = {}


def _adata(name: str, dtype, array_type=np.asarray):
    x, obs = _DATA[name]()
    obs = obs.copy()
    rng = np.random.default_rng(0)
    obs["total"] = x.sum(1).astype(np.float32)
    obs["noise"] = rng.normal(size=len(obs))
    obs["zeros"] = 0.0  # a singular design: scanpy's GLM path
    return ad.AnnData(array_type(x.astype(dtype)), obs=obs)


def _oracle(name: str, dtype, keys):
    """scanpy's result, once per data set, dtype and keys (it does not depend on the format)."""
    key = (name, np.dtype(dtype).name, str(keys))
    if key not in _ORACLE:
        adata = _adata(name, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.regress_out(adata, keys)
        _ORACLE[key] = adata.X
    return _ORACLE[key]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("keys", [["total", "noise"], "louvain", ["zeros"]], ids=["numeric", "categorical", "singular"])
@pytest.mark.parametrize("name", ["real", "synthetic"])
def test_regress_out_matches_scanpy(array_type, dtype, keys, name):
    expected = _oracle(name, dtype, keys)
    adata = _adata(name, dtype, array_type)
    assert gpusc.pp.regress_out(adata, keys) is None
    got = to_host(adata.X)
    assert isinstance(got, np.ndarray)
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, **tolerance(dtype))


def test_regress_out_integer_layer_and_copy():
    counts = synthetic_counts(120, 50).astype(np.int32)
    adata = ad.AnnData(np.zeros(counts.shape, np.float32), layers={"counts": counts})
    adata.obs["n"] = counts.sum(1).astype(np.float64)
    theirs = adata.copy()
    sc.pp.regress_out(theirs, "n", layer="counts")
    new = gpusc.pp.regress_out(adata, "n", layer="counts", copy=True)
    assert new.layers["counts"].dtype == theirs.layers["counts"].dtype == np.float32
    np.testing.assert_allclose(new.layers["counts"], theirs.layers["counts"], **tolerance(np.float32))
    np.testing.assert_array_equal(adata.layers["counts"], counts)  # copy=True left it alone


@pytest.mark.parametrize("kwargs", [dict(keys=["total", "nope"]), dict(keys="total", layer="missing")])
def test_regress_out_missing_keys(host_type, kwargs):
    adata = _adata("synthetic", np.float32, host_type)
    before = dense(adata.X).copy()
    with pytest.raises(KeyError, match="nope|missing"):
        gpusc.pp.regress_out(adata, **kwargs)
    np.testing.assert_array_equal(dense(adata.X), before)


def test_regress_out_bad_input_leaves_adata_unchanged(host_type):
    adata = _adata("synthetic", np.float32, host_type)
    before = dense(adata.X).copy()
    with pytest.raises(ValueError, match="only a single one"):
        gpusc.pp.regress_out(adata, ["louvain", "total"])
    adata.obs["label"] = [{"a": 1}] * adata.n_obs
    with pytest.raises(ValueError, match="label"):
        gpusc.pp.regress_out(adata, ["total", "label"])
    np.testing.assert_array_equal(dense(adata.X), before)
    x = before.copy()
    x[4, 7] = np.nan
    bad = ad.AnnData(host_type(x.copy()), obs=adata.obs)
    with pytest.raises(ValueError, match="NaN"):
        gpusc.pp.regress_out(bad, "total")
    with pytest.raises(ValueError, match="NaN"):
        gpusc.pp.regress_out(bad, "louvain")
    np.testing.assert_array_equal(dense(bad.X), x)
