"""Seeded synthetic UMI counts with cell types and mitochondrial genes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from ._sampler import sample_nb_csr

# Human mitochondrial protein-coding genes, in genome order.
MT_GENES = (
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3",
    "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB",
)
# Model constants (documented in `synthetic`'s docstring).
BASE_SIGMA = 2.0  # log-normal spread of the shared gene profile
MARKER_SHARE = 0.02  # fraction of the non-mitochondrial genes up-regulated per type
MARKER_LOG_FOLD = (np.log(4.0), 0.5)  # fold change ~ LogNormal(log 4, 0.5)
LIB_SIGMA = 0.5  # log-normal spread of library sizes
DISPERSION = (np.log(0.3), 0.5)  # per-gene NB dispersion ~ LogNormal(log 0.3, 0.5)
TYPE_CONCENTRATION = 5.0  # type proportions ~ Dirichlet(5, ..., 5)


def _expected_nonzero(scale, profiles, phi, weights, nodes, node_weights) -> float:
    """Mean number of non-zero genes per cell for library sizes ``scale * exp(sigma Z - sigma^2/2)``."""
    libs = scale * np.exp(LIB_SIGMA * nodes - LIB_SIGMA**2 / 2)  # (n_nodes,)
    total = 0.0
    for w, prof in zip(weights, profiles, strict=True):
        mu = libs[:, None] * prof[None, :]
        p_nonzero = -np.expm1(-np.log1p(phi * mu) / phi)
        total += w * (node_weights @ p_nonzero.sum(axis=1))
    return total


def _library_scale(target, profiles, phi, weights) -> float:
    """Median library size whose expected non-zeros per cell equal ``target`` (bisection in log)."""
    nodes, node_weights = np.polynomial.hermite_e.hermegauss(24)
    node_weights = node_weights / node_weights.sum()  # E over Z ~ N(0, 1)
    lo, hi = np.log(1e-3), np.log(1e12)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _expected_nonzero(np.exp(mid), profiles, phi, weights, nodes, node_weights) < target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def synthetic(
    n_obs: int = 10_000,
    n_vars: int = 2_000,
    *,
    n_types: int = 8,
    seed: int = 0,
    density: float = 0.05,
    mito_fraction: float = 0.01,
) -> ad.AnnData:
    """Seeded synthetic UMI counts: negative-binomial cells of several types.

    The model, with ``G = n_vars - n_mt`` ordinary genes and ``n_mt = min(13, n_vars // 10)``
    mitochondrial genes (``MT-ND1``, ``MT-ND2``, ... at the end of ``var``):

    1. Shared base profile: ``b_j ~ LogNormal(0, 2)`` for the ordinary genes.
    2. Cell types ``t = 0..n_types-1`` with proportions ``~ Dirichlet(5, ..., 5)``; each cell's
       type is drawn from them. Each type up-regulates ``max(1, round(0.02 G))`` marker genes
       (disjoint between types while genes suffice) by a fold ``~ LogNormal(log 4, 0.5)``:
       ``w_tj = b_j * fold_tj`` (``fold_tj = 1`` off the markers).
    3. Mitochondrial genes get weights ``~ LogNormal(0, 0.5)``, scaled so that they hold
       ``mito_fraction`` of each type's expected counts. The gene fractions of type ``t`` are
       ``f_tj = (1 - mito_fraction) w_tj / sum_k w_tk`` (ordinary) and the scaled weights (mt).
    4. Library sizes ``L_i = s * exp(0.5 Z_i - 0.125)``, ``Z_i ~ N(0, 1)`` (log-normal, mean
       ``s``); ``s`` is solved (Gauss-Hermite quadrature, bisection) so that the expected
       fraction of non-zero entries equals ``density``.
    5. Counts ``x_ij ~ NB(mean L_i f_{t(i) j}, dispersion phi_j)`` (variance ``mu + phi mu^2``),
       independently, with ``phi_j ~ LogNormal(log 0.3, 0.5)`` per gene.

    The counts are the full negative binomial (zeros included), not a hurdle model: the
    sampler visits only the (cell, gene) pairs that can be non-zero (geometric skipping over
    genes binned by expression, accepted with ``P(x > 0)``) and draws a zero-truncated NB for
    each, so time and memory scale with the number of non-zeros, never with
    ``n_obs * n_vars``. Random numbers come from :class:`numpy.random.Generator` seeded with
    ``seed`` (model parameters) and a counter-based per-cell stream (counts), so the result is
    identical for a seed on any machine and any thread count.

    Parameters
    ----------
    n_obs
        Number of cells.
    n_vars
        Number of genes, mitochondrial genes included (at least 2).
    n_types
        Number of cell types.
    seed
        Seed of the generator.
    density
        Expected fraction of non-zero entries, in (0, 1) (0.05 = about 1,000 genes per cell
        at 20,000 genes). Realised densities scatter around it.
    mito_fraction
        Expected fraction of counts on mitochondrial genes, in [0, 1).

    Returns
    -------
    AnnData with

    ``X``
        :class:`scipy.sparse.csr_matrix`, float32, integer counts, sorted indices.
    ``obs["cell_type"]``
        categorical (``type0``, ``type1``, ...): the true type of each cell.
    ``var["mt"]``
        bool: mitochondrial genes (names starting with ``MT-``). Ordinary genes are named
        ``GENE0001``, ``GENE0002``, ...
    ``var["marker_of"]``
        str: the type a gene is a marker of (``""`` for none).
    ``uns["gpusc_synthetic"]``
        dict of the arguments, the library scale ``s`` and the model constants.
    """
    if n_obs < 1 or n_vars < 2 or n_types < 1:
        raise ValueError(f"need n_obs >= 1, n_vars >= 2 and n_types >= 1; got {n_obs}, {n_vars}, {n_types}")
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in (0, 1); got {density}")
    if not 0.0 <= mito_fraction < 1.0:
        raise ValueError(f"mito_fraction must be in [0, 1); got {mito_fraction}")
    rng = np.random.default_rng(seed)

    n_mt = min(len(MT_GENES), n_vars // 10)
    n_genes = n_vars - n_mt
    base = rng.lognormal(0.0, BASE_SIGMA, n_genes)
    n_markers = max(1, round(MARKER_SHARE * n_genes))
    if n_types * n_markers <= n_genes:
        markers = rng.permutation(n_genes)[: n_types * n_markers].reshape(n_types, n_markers)
    else:
        markers = np.stack([rng.choice(n_genes, n_markers, replace=False) for _ in range(n_types)])
    weights = np.tile(base, (n_types, 1))
    folds = rng.lognormal(*MARKER_LOG_FOLD, size=markers.shape)
    for t in range(n_types):
        weights[t, markers[t]] *= folds[t]
    f = np.empty((n_types, n_vars))
    f[:, :n_genes] = (1.0 - mito_fraction) * weights / weights.sum(axis=1, keepdims=True)
    mt_weights = rng.lognormal(0.0, 0.5, n_mt)
    if n_mt:
        f[:, n_genes:] = mito_fraction * mt_weights / mt_weights.sum()
    if n_mt == 0 or mito_fraction == 0.0:
        f[:, :n_genes] /= f[:, :n_genes].sum(axis=1, keepdims=True)
    phi_gene = rng.lognormal(*DISPERSION, size=n_vars)
    proportions = rng.dirichlet(np.full(n_types, TYPE_CONCENTRATION))

    scale = _library_scale(density * n_vars, f, phi_gene, proportions)
    types = rng.choice(n_types, size=n_obs, p=proportions)
    libs = scale * np.exp(LIB_SIGMA * rng.standard_normal(n_obs) - LIB_SIGMA**2 / 2)
    key = int(rng.integers(0, 2**63, dtype=np.int64))
    X = sample_nb_csr(types, libs, f, np.broadcast_to(phi_gene, f.shape), n_vars, key)

    width = max(4, len(str(n_genes)))
    var_names = [f"GENE{j + 1:0{width}d}" for j in range(n_genes)] + list(MT_GENES[:n_mt])
    type_names = [f"type{t}" for t in range(n_types)]
    marker_of = np.full(n_vars, "", dtype=object)
    for t in range(n_types):
        marker_of[markers[t]] = np.where(marker_of[markers[t]] == "", type_names[t], marker_of[markers[t]])
    var = pd.DataFrame(
        {"mt": np.arange(n_vars) >= n_genes, "marker_of": marker_of.astype(str)},
        index=pd.Index(var_names),
    )
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(types, categories=type_names)},
        index=pd.Index([f"cell{i}" for i in range(n_obs)]),
    )
    uns = {
        "gpusc_synthetic": {
            "n_obs": n_obs, "n_vars": n_vars, "n_types": n_types, "seed": seed,
            "density": density, "mito_fraction": mito_fraction, "library_scale": scale,
            "base_sigma": BASE_SIGMA, "library_sigma": LIB_SIGMA,
            "marker_share": MARKER_SHARE, "marker_log_fold": list(MARKER_LOG_FOLD),
            "dispersion_lognormal": list(DISPERSION),
        }
    }
    return ad.AnnData(X=X, obs=obs, var=var, uns=uns)
