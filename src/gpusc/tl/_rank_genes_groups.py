"""rank_genes_groups and filter_rank_genes_groups, as scanpy 1.12's tools/_rank_genes_groups.py.

Where the matrix lives, the work runs (CUDA kernels for CuPy arrays, numba for host arrays):
one pass of ``_kernels.moments.gene_moments`` gives every group's per-gene sums, sums of
squares and non-zero counts (means, variances, ``pts``); the Wilcoxon test ranks each gene
once for all groups (``_kernels.rank_genes``). What follows works on one number per (group,
gene) on the host: scipy's Welch t-test from those statistics, the normal approximation of the
rank-sum test, the p-value corrections, the fold changes and the ranking, as scanpy does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import pandas as pd
from anndata import AnnData
from fast_array_utils import types

from .._core import logg
from .._core.adata import check_not_empty, nonfinite_error
from .._core.arrays import placement, to_host
from .._core.compat import backed_error, check_mask, is_backed_type, old_positionals
from .._core.dask import block_partials, check_row_chunks, compute, is_dask
from .._kernels.moments import COUNT_NONE, COUNT_NONZERO, add_moments, gene_moments
from .._kernels.rank_genes import rank_sums

_FUNC = "rank_genes_groups"
METHODS = ("logreg", "t-test", "wilcoxon", "t-test_overestim_var")  # scanpy's _Method, in its order
CORR_METHODS = ("benjamini-hochberg", "bonferroni")
# uns record dtypes, as scanpy stores them
_DTYPES = {"names": "O", "scores": "float32", "pvals": "float64", "pvals_adj": "float64",
           "logfoldchanges": "float32"}
# A group's sum of squared deviations below this share of its sum of squares is rounding
# (one-pass moments: m2 = sum_sq - sum * mean), i.e. the values are constant; scanpy's Welford
# pass gives 0 there, and a t-test between two constant groups scores 0 instead of noise.
_M2_ROUNDING = 1e-12


@old_positionals("mask", "use_raw", "groups", "reference", "n_genes", "rankby_abs", "pts",
                 "key_added", "copy", "method", "corr_method", "tie_correct", "layer")
def rank_genes_groups(
    adata: AnnData,
    groupby: str,
    *,
    mask_var: np.ndarray | str | None = None,
    use_raw: bool | None = None,
    groups: Literal["all"] | Iterable[str] = "all",
    reference: str = "rest",
    n_genes: int | None = None,
    rankby_abs: bool = False,
    pts: bool = False,
    key_added: str | None = None,
    copy: bool = False,
    method: Literal["logreg", "t-test", "wilcoxon", "t-test_overestim_var"] | None = None,
    corr_method: Literal["benjamini-hochberg", "bonferroni"] = "benjamini-hochberg",
    tie_correct: bool = False,
    layer: str | None = None,
    **kwds,
) -> AnnData | None:
    """Rank genes for characterizing groups, as :func:`scanpy.tl.rank_genes_groups`.

    Same arguments, defaults, methods and result structure as scanpy 1.12, so that
    :func:`scanpy.get.rank_genes_groups_df` and the ``sc.pl.rank_genes_groups*`` plots read
    the result unchanged. Expects logarithmized data.

    The per-group means, variances and non-zero fractions come from one pass over the matrix
    where it lives (:mod:`gpusc._kernels.moments`: float64 sums, deterministic). ``wilcoxon``
    ranks each gene once for all groups, against the rest or a reference: each gene's non-zero
    values are sorted and its zeros counted as one tie block (exact ranks, ties averaged, tie
    correction as scipy's ``tiecorrect``), from CSR, CSC or dense input, never densifying the
    matrix (:mod:`gpusc._kernels.rank_genes`). CSR input is ranked through one CSC copy (host:
    scipy; device: cuSPARSE); dense input a few hundred genes at a time. ``logreg`` fits
    scikit-learn's ``LogisticRegression`` on host matrices and cuML's on device matrices
    (``**kwds`` go to it). Dask arrays are not supported yet (TypeError).

    Differences from scanpy: nothing in ``adata`` changes before the input is checked (scanpy
    writes ``uns[key_added]`` first, and removes the explicit zeros of a sparse X in place);
    an unknown group raises a ValueError naming it (scanpy: an IndexError); variances come from
    float64 sums of squares (scanpy: Welford), so t-test scores agree to about 1e-12.

    Parameters
    ----------
    adata
        Annotated data matrix (X, a layer or raw.X on the host or the device).
    groupby
        Column of ``adata.obs`` with the groups (categorical, or strings made categorical).
    mask_var
        Boolean mask over the genes, or the name of a boolean ``adata.var`` column: test only
        these genes.
    use_raw
        Use ``adata.raw`` (default: when it is set).
    groups
        The groups to rank, or ``"all"``. Against the rest, the rest is every other cell.
    reference
        ``"rest"``, or a group each group is compared with.
    n_genes
        Genes in the result tables (default: all).
    rankby_abs
        Rank by the absolute score (the scores stored keep their sign).
    pts
        Also store the fraction of cells expressing each gene.
    key_added
        Key in ``adata.uns`` (default ``"rank_genes_groups"``).
    copy
        Return a modified copy instead of writing into ``adata``.
    method
        ``"t-test"`` (default), ``"t-test_overestim_var"``, ``"wilcoxon"`` or ``"logreg"``.
    corr_method
        ``"benjamini-hochberg"`` or ``"bonferroni"`` (t-tests and wilcoxon).
    tie_correct
        Tie correction of the wilcoxon scores.
    layer
        Use ``adata.layers[layer]`` (not with ``use_raw``).
    kwds
        Passed to the logistic regression (``"logreg"``).

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes ``adata.uns[key_added]`` (and,
    as scanpy's sanitize_anndata, turns string columns of obs/var into categoricals):

    ``params`` : dict
        groupby, reference, method, use_raw, layer, corr_method.
    ``names`` : numpy.recarray, one field (dtype object) per group
        Gene names, ranked by score.
    ``scores`` : numpy.recarray (float32)
        t statistics, rank-sum z-scores, or logistic-regression coefficients.
    ``pvals``, ``pvals_adj`` : numpy.recarray (float64)
        Not for logreg.
    ``logfoldchanges`` : numpy.recarray (float32)
        log2 of the ratio of expm1 of the mean log values; not for logreg.
    ``pts`` : pandas.DataFrame (float64), genes × groups
        With ``pts`` (not for logreg): fraction of each group's cells with a non-zero value.
    ``pts_rest`` : pandas.DataFrame (float64)
        With ``pts`` against the rest: the same fraction over the other cells.

    Raises
    ------
    KeyError
        An unknown ``groupby`` or ``layer``.
    ValueError
        An unknown method, correction, group or reference; ``groups`` a single string; a
        selected group with fewer than two cells; ``layer`` with ``use_raw``; ``use_raw``
        without ``adata.raw``; NaN or inf in the matrix; logreg on a single group.
    TypeError
        An unsupported matrix type, a dask array with wilcoxon or logreg (they need every cell
        of a gene at once), or a dask array whose chunks are CSC or split along genes; a
        ``groupby`` column that is neither categorical nor strings (scanpy: an AttributeError).
    ImportError
        logreg on a device matrix without cuML.
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"{_FUNC}: expected an AnnData, got {type(adata).__name__}")
    mask_var = check_mask(adata, mask_var, "var", adata.n_vars, _FUNC, "mask_var")
    if use_raw is None:
        use_raw = adata.raw is not None
    elif use_raw is True and adata.raw is None:
        raise ValueError(f"{_FUNC}: Received `use_raw=True`, but `adata.raw` is empty.")
    if method is None:
        method = "t-test"
    if "only_positive" in kwds:
        rankby_abs = not kwds.pop("only_positive")  # scanpy's backwards compatibility
    if method not in METHODS:
        raise ValueError(f"{_FUNC}: method={method!r}: Method must be one of "
                         f"{dict.fromkeys(METHODS).keys()}.")
    if corr_method not in CORR_METHODS:
        raise ValueError(f"{_FUNC}: corr_method={corr_method!r}: Correction method must be one "
                         f"of {set(CORR_METHODS)}.")
    labels = group_labels(adata, groupby, _FUNC)
    groups_order = _groups_order(groups, reference, labels)
    codes = np.full(len(labels.cat.categories) + 1, -1, np.int32)  # category code -> group
    codes[labels.cat.categories.get_indexer(groups_order)] = np.arange(len(groups_order))
    codes = codes[labels.cat.codes.to_numpy()]  # NaN (category code -1) -> -1
    group_size = np.bincount(codes[codes >= 0], minlength=len(groups_order))
    if invalid := [str(g) for g, n in zip(groups_order, group_size, strict=True) if n < 2]:
        raise ValueError(f"{_FUNC}: Could not calculate statistics for groups "
                         f"{', '.join(invalid)} since they only contain one sample.")
    ireference = None if reference == "rest" else groups_order.index(reference)

    x, var_names, where = _matrix(adata, layer=layer, use_raw=use_raw, mask_var=mask_var, method=method)
    n_obs, n_vars = x.shape
    n_genes_user = n_vars if n_genes is None or n_genes > n_vars else n_genes

    stats = None
    if method == "logreg":
        _check_finite(x, where)
        results = _logreg(x, labels, groups_order, codes >= 0, kwds)
    else:
        if ireference is None:  # every cell in a group; the cells of no selected group together
            stat_codes, n_stat_groups = np.where(codes >= 0, codes, len(groups_order)), len(groups_order) + 1
        else:
            stat_codes, n_stat_groups = codes, len(groups_order)
        moments, counts = _moments(x, stat_codes, n_stat_groups, squares=method != "wilcoxon",
                                   count=COUNT_NONZERO if pts else COUNT_NONE)
        if moments.nonfinite:
            raise nonfinite_error(_FUNC, where)
        if counts:
            logg.warning("It seems you use rank_genes_groups on the raw count data. "
                         "Please logarithmize your data before calling rank_genes_groups.")
        stat_size = np.bincount(stat_codes[stat_codes >= 0], minlength=n_stat_groups)
        stats = _group_stats(moments, stat_size, len(groups_order), ireference, n_obs)
        if method == "wilcoxon":
            results = _wilcoxon(x, stat_codes, n_stat_groups, stats, ireference, tie_correct)
        else:
            results = _t_test(stats, method, ireference, n_obs)

    base = adata.uns.get("log1p", {}).get("base")
    table = _table(results, stats, ireference, groups_order, var_names, n_genes_user,
                   rankby_abs=rankby_abs, corr_method=corr_method, n_vars=n_vars, base=base)

    adata = adata.copy() if copy else adata
    adata.strings_to_categoricals()  # scanpy's sanitize_anndata
    out = {"params": {"groupby": groupby, "reference": reference, "method": method,
                      "use_raw": use_raw, "layer": layer, "corr_method": corr_method}}
    if stats is not None and pts:
        names = [str(g) for g in groups_order]
        out["pts"] = pd.DataFrame(stats.pts.T, index=var_names, columns=names)
        if ireference is None:
            out["pts_rest"] = pd.DataFrame(stats.pts_rest.T, index=var_names, columns=names)
    for column, per_group in table.items():
        out[column] = pd.DataFrame(per_group).to_records(index=False, column_dtypes=_DTYPES[column])
    adata.uns["rank_genes_groups" if key_added is None else key_added] = out
    return adata if copy else None


# ---------------------------------------------------------------- input

def group_labels(adata: AnnData, groupby: str, func: str) -> pd.Series:
    """``adata.obs[groupby]`` as a categorical, strings made categorical as anndata's
    strings_to_categoricals (natsorted categories) would, without writing it back."""
    if groupby not in adata.obs.columns:
        raise KeyError(f"{func}: groupby={groupby!r} is not a column of adata.obs; "
                       f"adata.obs has {list(adata.obs.columns)}")
    column = adata.obs[[groupby]].copy()
    adata.strings_to_categoricals(column)
    labels = column[groupby]
    if not isinstance(labels.dtype, pd.CategoricalDtype):
        raise TypeError(f"{func}: adata.obs[{groupby!r}] must be categorical or hold strings "
                         f"that repeat, got dtype {labels.dtype} (scanpy: Can only use .cat "
                         "accessor with a 'category' dtype)")
    return labels


def _groups_order(groups, reference: str, labels: pd.Series) -> list:
    """The selected categories, as scanpy's select_groups: every category in its order, or
    ``groups`` (plus the reference) in the order given."""
    categories = labels.cat.categories
    if isinstance(groups, str) and groups == "all":
        selected = list(categories)
    elif isinstance(groups, str | int):
        raise ValueError(f"{_FUNC}: groups={groups!r}: Specify a sequence of groups")
    else:
        selected = list(groups)
        if not selected:
            raise ValueError(f"{_FUNC}: groups is empty; give the groups to rank, or 'all'")
        if isinstance(selected[0], int):
            selected = [str(g) for g in selected]
        if reference != "rest" and reference not in set(selected):
            selected.append(reference)
    if reference != "rest" and reference not in categories:
        raise ValueError(f"{_FUNC}: reference = {reference} needs to be one of groupby = "
                         f"{categories.tolist()}.")
    if unknown := [g for g in selected if g not in categories]:
        raise ValueError(f"{_FUNC}: groups {unknown} are not categories of adata.obs"
                         f"[{labels.name!r}]: {categories.tolist()}")
    if isinstance(groups, str):
        return selected
    return [categories[i] for i in categories.get_indexer(selected)]  # scanpy: given order


def _matrix(adata: AnnData, *, layer, use_raw: bool, mask_var, method: str):
    """(matrix, gene names, what to call it in errors), masked to ``mask_var``; integer
    matrices as float32 but for logreg (it hands scikit-learn the matrix as scanpy)."""
    to_float = method != "logreg"
    if layer is not None:
        if use_raw:
            raise ValueError(f"{_FUNC}: Cannot specify `layer` and have `use_raw=True`.")
        if layer not in adata.layers:
            raise KeyError(f"{_FUNC}: layer={layer!r} not found; adata.layers has {list(adata.layers)}")
        x, var_names, where = adata.layers[layer], adata.var_names, f"adata.layers[{layer!r}]"
    elif use_raw:
        x, var_names, where = adata.raw.X, adata.raw.var_names, "adata.raw.X"
    else:
        x, var_names, where = adata.X, adata.var_names, "adata.X"
    if x is None:
        raise ValueError(f"{_FUNC}: {where} is None; pass layer= to choose a layer")
    if is_dask(x):
        check_row_chunks(x, _FUNC)
        if not to_float or method == "wilcoxon":
            raise TypeError(f"{_FUNC}: {where} is a dask array; method={method!r} needs every cell "
                            "of a gene at once: use method='t-test' (one pass over the chunks), or "
                            "compute the matrix first (x.compute())")
    elif is_backed_type(x):
        raise backed_error(x, _FUNC)
    else:
        placement(x)  # a TypeError naming the supported types
    if mask_var is not None:
        if mask_var.size != x.shape[1]:
            raise ValueError(f"{_FUNC}: mask_var has {mask_var.size} entries but {where} has "
                             f"{x.shape[1]} genes")
        genes = np.flatnonzero(mask_var)
        if not is_dask(x) and placement(x) == "device":
            import cupy as cp

            genes = cp.asarray(genes)
        x, var_names = x[:, genes], var_names[mask_var]
    check_not_empty(x, _FUNC)
    if to_float and x.dtype.kind != "f":
        x = x.astype(np.float32)  # the kernels take float32/float64; counts exact below 2^24
    return x, var_names, where


def _moments(x, codes, n_groups: int, **kwargs):
    """gene_moments of ``x`` and whether ``x`` holds only non-negative integers (raw counts:
    scanpy's warning); on a dask array both from one pass over its chunks."""
    if not is_dask(x):
        moments = gene_moments(x, codes, n_groups, **kwargs)
        return moments, _nonnegative_integers(x, moments)

    def per_chunk(block, block_codes):
        moments = gene_moments(block, block_codes, n_groups, **kwargs)
        return moments, _nonnegative_integers(block, moments)

    parts = compute(*block_partials(x, _FUNC, per_chunk, codes))
    return add_moments(m for m, _ in parts), all(counts for _, counts in parts)


def _stored_values(x):
    return x if isinstance(x, np.ndarray | types.CupyArray) else x.data


def _check_finite(x, where: str) -> None:
    values = _stored_values(x)
    if placement(x) == "device":
        import cupy as cp

        finite = bool(cp.isfinite(values).all())  # synchronize!
    else:
        finite = bool(np.isfinite(values).all())
    if not finite:
        raise nonfinite_error(_FUNC, where)


def _nonnegative_integers(x, moments) -> bool:
    """scanpy's check_nonnegative_integers: no sign bit set, no fractional part. The moments
    pass saw the signs (and, on the device, the fractions); the host looks for a fraction and
    stops at the first one (log data: at once)."""
    if moments.negative:
        return False
    if placement(x) == "device":
        return not moments.noninteger
    return _all_integers(np.ravel(_stored_values(x)))


@numba.njit(cache=True)
def _all_integers(values):
    for v in values:
        if v != np.floor(v):
            return False
    return True


# ---------------------------------------------------------------- statistics

@dataclass
class _Stats:
    """Per-group statistics (float64, groups × genes) of the selected groups, and of the rest
    of each (against the rest) or None (against a reference)."""

    size: np.ndarray  # cells of each selected group (int64)
    mean: np.ndarray
    var: np.ndarray | None
    pts: np.ndarray | None
    mean_rest: np.ndarray | None = None
    var_rest: np.ndarray | None = None
    pts_rest: np.ndarray | None = None


def _variance(sum_, sum_sq, n):
    """Sample variance (dof 1) from sums: NaN for fewer than two cells, 0 where only rounding
    is left of the squared deviations (see _M2_ROUNDING)."""
    n = np.asarray(n, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        m2 = sum_sq - sum_ * (sum_ / n)
        m2 = np.where(m2 <= _M2_ROUNDING * sum_sq, 0.0, m2)
        return np.where(n > 1, m2 / (n - 1), np.nan)


def _others(a: np.ndarray) -> np.ndarray:
    """Row g: the sum of every row but g (prefix plus suffix sums; nothing subtracted)."""
    before = np.zeros_like(a)
    after = np.zeros_like(a)
    np.cumsum(a[:-1], axis=0, out=before[1:])
    np.cumsum(a[:0:-1], axis=0, out=after[-2::-1])
    return before + after


def _group_stats(moments, size: np.ndarray, k: int, ireference: int | None, n_obs: int) -> _Stats:
    """Means, variances and non-zero fractions of the ``k`` selected groups from the moments
    pass (against the rest it has one more group: the cells of no selected group; ``size``
    counts the cells of each of its groups), and of the rest of each selected group."""
    n = size[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, moments.sum / np.maximum(n, 1), 0.0)
        pts = None if moments.count is None else moments.count / n
    var = None if moments.sum_sq is None else _variance(moments.sum, moments.sum_sq, size)
    stats = _Stats(size[:k], mean[:k], None if var is None else var[:k],
                   None if pts is None else pts[:k])
    if ireference is None:
        size_rest = n_obs - size[:k]
        sum_rest = _others(moments.sum)[:k]
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.mean_rest = sum_rest / size_rest[:, None]
            if moments.sum_sq is not None:
                stats.var_rest = _variance(sum_rest, _others(moments.sum_sq)[:k], size_rest)
            if moments.count is not None:
                stats.pts_rest = _others(moments.count.astype(np.float64))[:k] / size_rest[:, None]
    return stats


# ---------------------------------------------------------------- tests

def _t_test(stats: _Stats, method: str, ireference: int | None, n_obs: int) -> list:
    """Welch's t-test of each group against the rest or the reference, from the moments (a
    group per thread); NaN scores 0, NaN p-values 1 (scanpy)."""
    tested = [g for g in range(stats.size.size) if g != ireference]
    n_group = stats.size[tested][:, None]
    if ireference is None:
        mean_rest, var_rest = stats.mean_rest[tested], stats.var_rest[tested]
        n_other = n_obs - n_group
    else:
        mean_rest, var_rest = stats.mean[[ireference]], stats.var[[ireference]]
        n_other = np.full_like(n_group, stats.size[ireference])
    # t-test_overestim_var: scanpy's "hack" counts the rest as large as the group
    n_rest = n_other if method == "t-test" else n_group
    mean, std, std_rest = stats.mean[tested], np.sqrt(stats.var[tested]), np.sqrt(var_rest)

    def welch(i):  # group i of tested (the rest/reference row broadcasts)
        r = min(i, mean_rest.shape[0] - 1)
        return welch_t_test(mean[i], std[i], n_group[i, 0], mean_rest[r], std_rest[r], n_rest[i, 0])

    # one group per task: the t distribution's sf dominates and releases the GIL
    results = []
    for g, (scores, pvals) in zip(tested, _threads(welch, range(len(tested))), strict=True):
        scores[np.isnan(scores)] = 0
        pvals[np.isnan(pvals)] = 1
        results.append((g, scores, pvals))
    return results


def welch_t_test(mean1, std1, n1, mean2, std2, n2) -> tuple[np.ndarray, np.ndarray]:
    """Welch's unequal-variance t statistic and two-sided p-value, element-wise: what scanpy's
    scipy.stats.ttest_ind_from_stats(..., equal_var=False) returns, bit for bit (the
    Welch-Satterthwaite degrees of freedom, 1 where they are undefined, and Student's t tail
    from scipy.special.stdtr) without importing scipy.stats (~0.35 s of a 12 s gpusc run)."""
    from scipy import special

    var1, var2 = std1**2 / n1, std2**2 / n2
    with np.errstate(divide="ignore", invalid="ignore"):
        dof = (var1 + var2) ** 2 / (var1**2 / (n1 - 1) + var2**2 / (n2 - 1))
        dof = np.where(np.isnan(dof), 1, dof)  # both variances 0: any dof, as long as not NaN
        t = (mean1 - mean2) / np.sqrt(var1 + var2)
    return t, 2 * special.stdtr(dof, -np.abs(t))


def _threads(func, items) -> list:
    """``[func(i) for i in items]`` on numba's number of threads (NumPy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, numba.get_num_threads())) as pool:
        return list(pool.map(func, items))


def _wilcoxon(x, codes, n_groups: int, stats: _Stats, ireference: int | None,
              tie_correct: bool) -> list:
    """The rank-sum test's normal approximation from the rank sums of every group (each gene
    ranked once), with scanpy's arithmetic (so its z-scores to the last bit without ties)."""
    from scipy import stats as st

    sums = rank_sums(x, codes, n_groups, -1 if ireference is None else ireference)
    results = []
    if ireference is None:
        n_cells = int(x.shape[0])
        size = np.float64(n_cells)
        tie_coef = 1.0 - sums.tie_sum[0] / (size**3 - size) if n_cells >= 2 else np.ones(x.shape[1])
        for g in range(stats.size.size):
            n_active = int(stats.size[g])
            coef = tie_coef if tie_correct else 1
            std_dev = np.sqrt(coef * n_active * (n_cells - n_active) * (n_cells + 1) / 12.0)
            scores = (sums.rank_sum[g] - (n_active * (n_cells + 1) / 2.0)) / std_dev
            scores[np.isnan(scores)] = 0
            results.append((g, scores, 2 * st.distributions.norm.sf(np.abs(scores))))
        return results
    m_active = int(stats.size[ireference])
    for g in range(stats.size.size):
        if g == ireference:
            continue
        n_active = int(stats.size[g])
        if n_active <= 25 or m_active <= 25:
            logg.hint("Few observations in a group for normal approximation (<=25). "
                      "Lower test accuracy.")
        size = np.float64(n_active + m_active)
        coef = 1.0 - sums.tie_sum[g] / (size**3 - size) if tie_correct else 1
        std_dev = np.sqrt(coef * n_active * m_active * (n_active + m_active + 1) / 12.0)
        scores = (sums.rank_sum[g] - (n_active * ((n_active + m_active + 1) / 2.0))) / std_dev
        scores[np.isnan(scores)] = 0
        results.append((g, scores, 2 * st.distributions.norm.sf(np.abs(scores))))
    return results


def _logreg(x, labels: pd.Series, groups_order: list, selected: np.ndarray, kwds) -> list:
    """Coefficients of a logistic regression of the selected cells' groups on the genes, as
    scanpy (one binary fit for two groups: the first group's scores only)."""
    if len(groups_order) == 1:
        raise ValueError(f"{_FUNC}: Cannot perform logistic regression on a single cluster.")
    grouping = labels[selected]
    y = grouping.cat.codes.to_numpy()
    rows = np.flatnonzero(selected)
    coef = _fit_logreg(x, rows, y, kwds)
    existing = np.unique(y)  # not every category need have cells
    results = []
    for index, category in enumerate(groups_order):
        if len(groups_order) <= 2:
            results.append((index, coef[0], None))
            break
        code = np.argmax(grouping.cat.categories == category)
        results.append((index, coef[np.argmax(existing == code)], None))
    return results


def _fit_logreg(x, rows: np.ndarray, y: np.ndarray, kwds) -> np.ndarray:
    if placement(x) == "host":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(**kwds).fit(x[rows], y).coef_
    import cupy as cp

    try:
        from cuml.linear_model import LogisticRegression
    except ImportError as err:
        raise ImportError(
            f"{_FUNC}: method='logreg' on a device matrix needs cuML, which is not installed; "
            "install gpusc[rapids-cu13] (or gpusc[rapids-cu12]), or move the matrix to the "
            "host first (gpusc.get.anndata_to_CPU) to use scikit-learn") from err
    x = x[cp.asarray(rows)]
    if isinstance(x, types.CupyCSCMatrix):
        x = x.tocsr()
    coef = LogisticRegression(**kwds).fit(x, cp.asarray(y, dtype=x.dtype)).coef_
    return np.atleast_2d(to_host(cp.asarray(coef)))


# ---------------------------------------------------------------- tables

def _top(scores: np.ndarray, n_top: int) -> np.ndarray:
    """Indices of the ``n_top`` highest scores, highest first (scanpy's selection: a partition,
    then a sort of the partition, so equal scores come out in scanpy's order)."""
    partition = np.argpartition(scores, -n_top)[-n_top:]
    return partition[np.argsort(scores[partition])[::-1]]


def _benjamini_hochberg(pvals: np.ndarray) -> np.ndarray:
    """statsmodels' ``multipletests(method="fdr_bh")`` corrected p-values."""
    n = pvals.size
    order = np.argsort(pvals)
    adjusted = pvals[order] / (np.arange(1, n + 1) / float(n))
    adjusted = np.minimum.accumulate(adjusted[::-1])[::-1]
    adjusted[adjusted > 1] = 1
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def _table(results: list, stats: _Stats | None, ireference: int | None, groups_order: list,
           var_names: pd.Index, n_top: int, *, rankby_abs: bool, corr_method: str, n_vars: int,
           base) -> dict[str, dict[str, np.ndarray]]:
    """column -> group name -> values in rank order, the columns in scanpy's order."""
    expm1 = np.expm1 if base is None else (lambda v: np.expm1(v * np.log(base)))
    table: dict[str, dict[str, np.ndarray]] = {"names": {}, "scores": {}}
    for g, scores, pvals in results:
        name = str(groups_order[g])
        order = _top(np.abs(scores) if rankby_abs else scores, n_top)
        table["names"][name] = np.asarray(var_names[order], dtype=object)
        table["scores"][name] = scores[order]
        if pvals is not None:
            table.setdefault("pvals", {})[name] = pvals[order]
            pvals = np.where(np.isnan(pvals), 1.0, pvals)
            if corr_method == "benjamini-hochberg":
                adjusted = _benjamini_hochberg(pvals)
            else:
                adjusted = np.minimum(pvals * n_vars, 1.0)
            table.setdefault("pvals_adj", {})[name] = adjusted[order]
        if stats is not None:
            mean_rest = stats.mean_rest[g] if ireference is None else stats.mean[ireference]
            fold = (expm1(stats.mean[g]) + 1e-9) / (expm1(mean_rest) + 1e-9)  # scanpy's 1e-9
            table.setdefault("logfoldchanges", {})[name] = np.log2(fold[order])
    return table


# ---------------------------------------------------------------- filter_rank_genes_groups

@old_positionals("key", "groupby", "use_raw", "key_added", "min_in_group_fraction",
                 "min_fold_change", "max_out_group_fraction", "compare_abs")
def filter_rank_genes_groups(
    adata: AnnData,
    *,
    key: str | None = None,
    groupby: str | None = None,
    use_raw: bool | None = None,
    key_added: str = "rank_genes_groups_filtered",
    min_in_group_fraction: float = 0.25,
    min_fold_change: float = 1,
    max_out_group_fraction: float = 0.5,
    compare_abs: bool = False,
) -> None:
    """Filter the ranked genes by fold change and expressing fractions, as
    :func:`scanpy.tl.filter_rank_genes_groups`.

    A gene stays in its group's ranking when the fraction of the group's cells expressing it
    is above ``min_in_group_fraction``, the fraction of the other cells below
    ``max_out_group_fraction`` and its log2 fold change above ``min_fold_change``; the others'
    names become NaN. The fold changes and fractions of ``adata.uns[key]`` are used when it has
    them for the same groupby, ``use_raw`` and ``reference='rest'`` (as scanpy); otherwise one
    moments pass over the matrix (where it lives) gives every group's means and non-zero
    counts at once.

    Parameters
    ----------
    adata
        The AnnData ``rank_genes_groups`` wrote into.
    key
        Key of the ranking in ``adata.uns`` (default ``"rank_genes_groups"``).
    groupby
        Column of ``adata.obs`` (default: the ranking's).
    use_raw
        Use ``adata.raw`` (default: as the ranking did).
    key_added
        Where the filtered ranking goes.
    min_in_group_fraction, min_fold_change, max_out_group_fraction
        The thresholds.
    compare_abs
        Compare the absolute log fold change with ``min_fold_change``.

    Returns
    -------
    ``None``. Writes ``adata.uns[key_added]``: a copy of ``adata.uns[key]`` whose ``names``
    (numpy.recarray, dtype object) hold NaN for the genes filtered out.
    """
    key = "rank_genes_groups" if key is None else key
    if key not in adata.uns:
        raise KeyError(f"filter_rank_genes_groups: key={key!r} not in adata.uns; run "
                       "rank_genes_groups first")
    ranked = adata.uns[key]
    params = ranked["params"]
    groupby = params["groupby"] if groupby is None else groupby
    use_raw = params["use_raw"] if use_raw is None else use_raw
    same_params = (params["groupby"] == groupby and params["reference"] == "rest"
                   and params["use_raw"] == use_raw)
    use_logfolds = same_params and "logfoldchanges" in ranked
    use_fraction = same_params and "pts_rest" in ranked
    gene_names = pd.DataFrame(ranked["names"])
    logg.info(f"Filtering genes using: min_in_group_fraction: {min_in_group_fraction} "
              f"min_fold_change: {min_fold_change}, max_out_group_fraction: {max_out_group_fraction}")

    fraction_in = pd.DataFrame(np.zeros(gene_names.shape), columns=gene_names.columns,
                               index=gene_names.index)
    fraction_out = fraction_in.copy()
    fold_change = pd.DataFrame(ranked["logfoldchanges"]) if use_logfolds else fraction_in.copy()
    if not (use_logfolds and use_fraction):
        cluster_stats = _cluster_stats(adata, groupby, use_raw, list(gene_names.columns))
    for c, cluster in enumerate(gene_names.columns):
        var_names = gene_names[cluster].to_numpy()
        if use_fraction:
            fraction_in[cluster] = ranked["pts"][cluster].loc[var_names].to_numpy()
            fraction_out[cluster] = ranked["pts_rest"][cluster].loc[var_names].to_numpy()
        else:
            at = cluster_stats["genes"].get_indexer(var_names)
            fraction_in[cluster] = cluster_stats["frac_in"][c, at]
            fraction_out[cluster] = cluster_stats["frac_out"][c, at]
        if not use_logfolds:
            at = cluster_stats["genes"].get_indexer(var_names)
            fold_change[cluster] = cluster_stats["log_fold"][c, at]
    if compare_abs:
        fold_change = fold_change.abs()
    gene_names = gene_names[(fraction_in > min_in_group_fraction)
                            & (fraction_out < max_out_group_fraction)
                            & (fold_change > min_fold_change)]
    adata.uns[key_added] = adata.uns[key].copy()
    adata.uns[key_added]["names"] = gene_names.to_records(index=False)


def _cluster_stats(adata: AnnData, groupby: str, use_raw: bool, clusters: list) -> dict:
    """Per cluster (cells where ``obs[groupby] == cluster``, as scanpy) and gene: the fractions
    of non-zero values in and out of the cluster and the log2 fold change of the means, from
    one moments pass."""
    func = "filter_rank_genes_groups"
    x = adata.raw.X if use_raw else adata.X
    genes = adata.raw.var_names if use_raw else adata.var_names
    placement(x)
    labels = adata.obs[groupby]
    codes = np.full(adata.n_obs, len(clusters), np.int32)  # the cells of no cluster
    for c, cluster in enumerate(clusters):
        codes[(labels == cluster).to_numpy()] = c
    moments = gene_moments(x if x.dtype.kind == "f" else x.astype(np.float32), codes,
                           len(clusters) + 1, squares=False, count=COUNT_NONZERO)
    if moments.nonfinite:
        raise nonfinite_error(func, "adata.raw.X" if use_raw else "adata.X")
    size = np.bincount(codes, minlength=len(clusters) + 1)[:-1, None].astype(np.float64)
    size_out = adata.n_obs - size
    with np.errstate(invalid="ignore", divide="ignore"):
        frac_in = moments.count[:-1] / size
        frac_out = _others(moments.count.astype(np.float64))[:-1] / size_out
        mean_in = moments.sum[:-1] / size
        mean_out = _others(moments.sum)[:-1] / size_out
    base = adata.uns.get("log1p", {}).get("base")
    expm1 = np.expm1 if base is None else (lambda v: np.expm1(v * np.log(base)))
    log_fold = np.log2((expm1(mean_in) + 1e-9) / (expm1(mean_out) + 1e-9))
    return {"genes": genes, "frac_in": frac_in, "frac_out": frac_out, "log_fold": log_fold}
