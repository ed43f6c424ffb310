"""gpusc.tl.score_genes and score_genes_cell_cycle against scanpy 1.12 on identical copies:
the same control genes (recorded from both, bin by bin) and the same scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scanpy.tools._score_genes as scanpy_score_genes
from scipy import sparse

import gpusc as rsc
import gpusc.tl._score_genes as our_score_genes
from _compare import (
    assert_same_signature,
    assert_unchanged,
    dense,
    is_device,
    scanpy_float64_input,
    snapshot,
)
from conftest import HOST_TYPES, read_real, synthetic_counts, to_device

# Well-known S and G2M phase genes (Tirosh et al. 2016), those in pbmc3k's var_names or not.
S_GENES = ["MCM5", "PCNA", "TYMS", "FEN1", "MCM2", "MCM4", "RRM1", "UNG", "GINS2", "MCM6",
           "CDCA7", "DTL", "PRIM1", "UHRF1", "HELLS", "RFC2", "RPA2", "NASP", "RAD51AP1", "GMNN",
           "WDR76", "SLBP", "CCNE2", "UBR7", "POLD3", "MSH2", "ATAD2", "RAD51", "RRM2", "CDC45",
           "CDC6", "EXO1", "TIPIN", "DSCC1", "BLM", "CASP8AP2", "USP1", "CLSPN", "POLA1", "CHAF1B",
           "BRIP1", "E2F8"]
G2M_GENES = ["HMGB2", "CDK1", "NUSAP1", "UBE2C", "BIRC5", "TPX2", "TOP2A", "NDC80", "CKS2", "NUF2",
             "CKS1B", "MKI67", "TMPO", "CENPF", "TACC3", "FAM64A", "SMC4", "CCNB2", "CKAP2L",
             "CKAP2", "AURKB", "BUB1", "KIF11", "ANP32E", "TUBB4B", "GTSE1", "KIF20B", "HJURP",
             "CDCA3", "HN1", "CDC20", "TTK", "CDC25C", "KIF2C", "RANGAP1", "NCAPD2", "DLGAP5",
             "CDCA2", "CDCA8", "ECT2", "KIF23", "HMMR", "AURKA", "PSRC1", "ANLN", "LBR", "CKAP5",
             "CENPE", "CTCF", "NEK2", "G2E3", "GAS2L3", "CBX5", "CENPA"]
ISG_GENES = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "OAS1", "IFI44L", "RSAD2", "LY6E", "ISG20"]


@pytest.fixture
def recorded(monkeypatch):
    """The control genes each library draws, bin by bin: {"scanpy": [...], "gpusc": [...]}."""
    drawn = {"scanpy": [], "gpusc": []}

    def recorder(draw, into):
        def record(*args, **kwargs):
            for genes in draw(*args, **kwargs):
                into.append(sorted(genes))
                yield genes
        return record

    for lib, module, name in (("scanpy", scanpy_score_genes, "_score_genes_bins"),
                              ("gpusc", our_score_genes, "_control_draws")):
        monkeypatch.setattr(module, name, recorder(getattr(module, name), drawn[lib]))
    return drawn


@pytest.fixture(scope="module")
def pbmc_log():
    """pbmc3k's counts through scanpy's normalize_total and log1p (CSR float32)."""
    adata = read_real("pbmc3k_counts_labeled.h5ad")
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    return adata


def pair(adata, make, dtype=None):
    """Two identical AnnData: scanpy's with the host matrix, ours with ``make`` of it."""
    x = adata.X.astype(dtype) if dtype is not None else adata.X
    # scanpy 1.11 sums float32 means in float32: it gets float64 copies (1.12: x itself)
    ref = sc.AnnData(scanpy_float64_input(x.copy()), obs=adata.obs.copy(), var=adata.var.copy())
    test = sc.AnnData(make(x.copy()), obs=adata.obs.copy(), var=adata.var.copy())
    for name, layer in adata.layers.items():
        if name is None:  # anndata 0.13 lists X as layer None: X is set above
            continue
        ref.layers[name] = scanpy_float64_input(layer.copy())
        test.layers[name] = make(layer.copy())
    if adata.raw is not None:
        test.raw = raw = adata.raw.to_adata()
        ref.raw = sc.AnnData(scanpy_float64_input(raw.X), obs=raw.obs, var=raw.var)
    return ref, test


def compare(ref, test, recorded, *, key="score", **kwargs):
    """score_genes on both: identical control genes, scores allclose; the score column is
    removed again (callers check with one snapshot that nothing else changed)."""
    recorded["scanpy"].clear()
    recorded["gpusc"].clear()
    sc.tl.score_genes(ref, score_name=key, **kwargs)
    rsc.tl.score_genes(test, score_name=key, **kwargs)
    assert recorded["gpusc"] == recorded["scanpy"]
    assert len(recorded["scanpy"]) > 0
    got, want = test.obs.pop(key), ref.obs.pop(key)
    assert got.dtype == want.dtype == np.float64
    # both sum in float64 (scanpy's nanmean, our per-cell pass), in other orders
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-10, atol=1e-12)
    return got


def test_signatures():
    assert_same_signature(rsc.tl.score_genes, sc.tl.score_genes)
    assert_same_signature(rsc.tl.score_genes_cell_cycle, sc.tl.score_genes_cell_cycle)


FORMATS = [pytest.param(f, d, id=f"{f}-{np.dtype(d).name}",
                        marks=[pytest.mark.gpu] if f.startswith("cupy") else [])
           for f in ("csr_matrix", "csc_matrix", "dense", "cupy-csr_matrix", "cupy-csc_matrix",
                     "cupy-dense") for d in (np.float32, np.float64)]


def maker(fmt):
    """Matrix maker of one format (``cupy-*``: its device twin) from a scipy or numpy matrix."""
    host_type = HOST_TYPES[fmt.removeprefix("cupy-")]

    def host(x):
        return host_type(x.toarray() if host_type is np.asarray and sparse.issparse(x) else x)
    return (lambda x: to_device(host(x))) if fmt.startswith("cupy-") else host


@pytest.fixture(scope="module")
def genes(pbmc_log):
    return list(np.random.default_rng(0).choice(pbmc_log.var_names, 40, replace=False))


@pytest.mark.parametrize(("fmt", "dtype"), FORMATS)
def test_pbmc3k_matches_scanpy(pbmc_log, genes, recorded, fmt, dtype):
    ref, test = pair(pbmc_log, maker(fmt), dtype)
    before = snapshot(test)
    compare(ref, test, recorded, gene_list=genes)
    compare(ref, test, recorded, gene_list=genes[:10], ctrl_size=10, random_state=42)
    assert_unchanged(test, before)


def test_options_match_scanpy(pbmc_log, genes, recorded):
    ref, test = pair(pbmc_log, maker("csr_matrix"))
    pool = list(np.random.default_rng(1).choice(pbmc_log.var_names, 4000, replace=False))
    compare(ref, test, recorded, gene_list=genes, random_state=1)
    compare(ref, test, recorded, gene_list=genes, n_bins=10, random_state=2)
    compare(ref, test, recorded, gene_list=genes, ctrl_size=200, random_state=3)
    # scanpy needs the list's genes in the pool (else a KeyError of its own)
    compare(ref, test, recorded, gene_list=genes, gene_pool=pool + genes, random_state=4)
    compare(ref, test, recorded, gene_list=genes, ctrl_as_ref=False, random_state=5)
    np.random.seed(6)  # random_state=None: both draw from numpy's global state as it is
    state = np.random.get_state()
    recorded["scanpy"].clear()
    recorded["gpusc"].clear()
    sc.tl.score_genes(ref, genes, random_state=None)
    np.random.set_state(state)
    rsc.tl.score_genes(test, genes, random_state=None)
    assert recorded["gpusc"] == recorded["scanpy"]
    np.testing.assert_allclose(test.obs["score"], ref.obs["score"], rtol=1e-10, atol=1e-12)


def test_use_raw_and_layer(pbmc_log, genes, recorded):
    adata = pbmc_log.copy()
    adata.raw = adata  # raw: the log data; X: something else, so the choice shows
    adata.layers["log"] = adata.X.copy()
    adata.X = adata.X.multiply(3.0).tocsr()
    ref, test = pair(adata, lambda x: x)
    before = snapshot(test)
    compare(ref, test, recorded, gene_list=genes)  # use_raw=None: raw, as it is set
    compare(ref, test, recorded, gene_list=genes, use_raw=False)
    compare(ref, test, recorded, gene_list=genes, layer="log", random_state=8)
    compare(ref, test, recorded, gene_list=genes, layer="log", use_raw=False, random_state=9)
    assert_unchanged(test, before)


def test_kang2018_interferon_genes(recorded):
    adata = read_real("kang2018_pbmc_ctrl_stim_2000.h5ad")
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    ref, test = pair(adata, lambda x: x)
    got = compare(ref, test, recorded, gene_list=ISG_GENES, ctrl_size=30)
    # the stimulated half scores higher (a sanity check of the data, not of the code)
    score = got.groupby(test.obs["stim"], observed=True).mean()
    assert score["stim"] > score["ctrl"]


@pytest.mark.parametrize("make", [np.asarray, sparse.csr_matrix, sparse.csc_matrix])
def test_nan_values_are_left_out_as_scanpy(recorded, make):
    # scanpy's nanmean: NaN leaves the means, a gene with only NaN leaves the pool
    x = np.log1p(synthetic_counts(200, 300, dtype=np.float64, density=0.3, seed=3))
    rng = np.random.default_rng(4)
    x[rng.random(x.shape) < 0.01] = np.nan
    x[:, 7] = np.nan
    base = sc.AnnData(x, var=pd.DataFrame(index=[f"g{j}" for j in range(300)]))
    ref, test = pair(base, make)
    compare(ref, test, recorded, gene_list=[f"g{j}" for j in range(0, 300, 11)], ctrl_size=20)


def test_integer_counts(recorded):
    x = synthetic_counts(150, 400, density=0.2, seed=5).astype(np.int64)
    base = sc.AnnData(x, var=pd.DataFrame(index=[f"g{j}" for j in range(400)]))
    for make in (np.asarray, lambda a: sparse.csr_matrix(a.astype(np.int32))):
        ref, test = pair(base, make)
        compare(ref, test, recorded, gene_list=[f"g{j}" for j in range(0, 400, 9)], ctrl_size=15)


def test_copy_returns_the_scored_copy(pbmc_log, genes):
    adata = pbmc_log.copy()
    before = snapshot(adata)
    out = rsc.tl.score_genes(adata, genes, copy=True)
    theirs = pbmc_log.copy()
    theirs.X = scanpy_float64_input(theirs.X)
    expected = sc.tl.score_genes(theirs, genes, copy=True)
    assert_unchanged(adata, before)
    np.testing.assert_allclose(out.obs["score"], expected.obs["score"], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- warnings and errors

def test_missing_genes_warn_as_scanpy(pbmc_log, monkeypatch):
    messages = []
    monkeypatch.setattr(sc.logging, "warning", lambda msg, *a, **k: messages.append(msg))
    genes = ["CD3E", "NOT_A_GENE", "ALSO_MISSING"]
    sc.tl.score_genes(pbmc_log.copy(), genes)
    theirs = list(messages)
    messages.clear()
    rsc.tl.score_genes(pbmc_log.copy(), genes)
    assert messages == theirs
    assert any("genes are not in var_names and ignored" in m for m in theirs)


def _small():
    x = np.log1p(synthetic_counts(60, 80, dtype=np.float32, density=0.3, seed=6))
    return sc.AnnData(sparse.csr_matrix(x), var=pd.DataFrame(index=[f"g{j}" for j in range(80)]))


@pytest.mark.parametrize(("kwargs", "error", "scanpy_says"), [
    (dict(gene_list=["nope", "neither"]), ValueError, "No valid genes were passed for scoring."),
    (dict(gene_list=[]), ValueError, "No valid genes were passed for scoring."),
    (dict(gene_list=["g1"], gene_pool=["nope"]), ValueError,
     "No valid genes were passed for reference set."),
    (dict(gene_list=["g1", "g2"], gene_pool=["g1", "g2"], ctrl_as_ref=False), RuntimeError,
     "No control genes found in any cut"),
    (dict(gene_list=["g1"], layer="nope"), KeyError, "nope"),
])
def test_bad_input_raises_like_scanpy(kwargs, error, scanpy_says):
    ref, test = _small(), _small()
    with pytest.raises(error) as theirs:
        sc.tl.score_genes(ref, **kwargs)
    assert scanpy_says in str(theirs.value)
    before = snapshot(test)
    with pytest.raises(error) as ours:
        rsc.tl.score_genes(test, **kwargs)
    assert scanpy_says in str(ours.value)
    assert_unchanged(test, before)


def test_layer_and_use_raw_together():
    test = _small()
    test.raw = test
    test.layers["a"] = test.X.copy()
    before = snapshot(test)
    with pytest.raises(ValueError, match="Only one of `layer`, or `use_raw`"):
        rsc.tl.score_genes(test, ["g1"], layer="a", use_raw=True)
    assert_unchanged(test, before)


# ---------------------------------------------------------------- cell cycle

@pytest.mark.parametrize(("fmt", "dtype"), [FORMATS[0], FORMATS[5], FORMATS[6], FORMATS[11]])
def test_cell_cycle_phase_matches_scanpy(pbmc_log, recorded, fmt, dtype):
    ref, test = pair(pbmc_log, maker(fmt), dtype)
    sc.tl.score_genes_cell_cycle(ref, s_genes=S_GENES, g2m_genes=G2M_GENES)
    rsc.tl.score_genes_cell_cycle(test, s_genes=S_GENES, g2m_genes=G2M_GENES)
    assert recorded["gpusc"] == recorded["scanpy"]
    for key in ("S_score", "G2M_score"):
        np.testing.assert_allclose(test.obs[key], ref.obs[key], rtol=1e-10, atol=1e-12)
    pd.testing.assert_series_equal(test.obs["phase"], ref.obs["phase"])
    assert set(ref.obs["phase"]) == {"S", "G2M", "G1"}
    assert is_device(test.X) == fmt.startswith("cupy")
    assert dense(test.X).shape == ref.shape


@pytest.mark.parametrize("fmt", ["dense", "csr_matrix", "csr_array"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dask_matches_scanpy_and_in_memory(pbmc_log, genes, recorded, fmt, dtype):
    # a dask X split by rows (uneven chunks, int64 indices): two passes, the same control
    # genes and scores as scanpy on the in-memory matrix, equal to gpusc in memory
    from _dask import as_dask, count_computes

    host = {"dense": lambda x: x.toarray(), "csr_matrix": sparse.csr_matrix, "csr_array": sparse.csr_array}[fmt]
    ref, test = pair(pbmc_log[:1500], lambda x: as_dask(host(x), "uneven", np.int64 if fmt != "dense" else None),
                     dtype)
    x = test.X
    with count_computes() as c:
        got = compare(ref, test, recorded, gene_list=genes)
    assert c.computes == 2 and test.X is x
    memory = sc.AnnData(host(pbmc_log[:1500].X.astype(dtype)), var=pbmc_log.var.copy())
    rsc.tl.score_genes(memory, genes, score_name="score")
    np.testing.assert_array_equal(got.to_numpy(), memory.obs["score"].to_numpy())


def test_dask_with_nan_is_refused_clearly():
    from _dask import as_dask

    test = _small()
    x = test.X.toarray()
    x[3, 1] = np.nan
    test.X = as_dask(x)
    with pytest.raises(ValueError, match="dask matrix contains NaN"):
        rsc.tl.score_genes(test, ["g1", "g2"])
    assert "score" not in test.obs
