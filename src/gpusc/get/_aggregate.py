"""aggregate: per-group sums, means, variances, non-zero counts and medians, as scanpy's
get.aggregate, from one segmented pass over the matrix (plus one for medians)."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from fast_array_utils import types

from .._core.adata import device_oom_hint, nonfinite_error
from .._core.arrays import is_sparse, placement, xp_of
from .._core.dask import check_row_chunks, chunk_kind, is_dask
from .._kernels.aggregate import group_medians
from .._kernels.moments import COUNT_NONE, COUNT_NONZERO, add_moments, gene_moments, moments_partials

# scanpy 1.12's AggType, in its order (its error message lists them so)
FUNCS = ("count_nonzero", "sum", "median", "mean", "var")
AggType = Literal["count_nonzero", "sum", "median", "mean", "var"]


@device_oom_hint
def aggregate(
    adata: AnnData,
    by: str | Collection[str],
    func: AggType | Iterable[AggType],
    *,
    axis: Literal["obs", 0, "var", 1] | None = None,
    mask: np.ndarray | str | None = None,
    dof: int = 1,
    layer: str | None = None,
    obsm: str | None = None,
    varm: str | None = None,
) -> AnnData:
    """Aggregate the matrix by categorical groups, as :func:`scanpy.get.aggregate`.

    Each func becomes a layer of the returned AnnData: one row per combination of the ``by``
    categories that occurs (in the order of the categories, the first key varying slowest;
    NaN categories left out), obs holding the ``by`` columns and ``n_obs_aggregated``.

    How: ``sum``, ``mean``, ``var`` and ``count_nonzero`` come from ONE pass of the moments
    family over the rows (:func:`gpusc._kernels.moments.gene_moments`: per group and gene the
    sum, the sum of squares when ``var`` is asked for, the non-zero count when
    ``count_nonzero`` is; float64 accumulation, a fixed order, deterministic). The variance is
    ``(sum_sq - sum * mean) / (n - dof)`` (scanpy uses Welford's update; the two agree to
    rounding, near-constant groups to ``eps * mean**2``). ``median`` is a second pass
    (:func:`gpusc._kernels.aggregate.group_medians`): sparse input is read by column through
    one CSC copy (CSR input), each (gene, group)'s stored values are sorted and the implicit
    zeros counted in, never densified; dense input takes ``numpy.median`` / ``cupy.median`` of
    one group's rows at a time. Integer matrices are read as float64 (a copy; exact below
    2**53). ``axis="var"`` on X or a layer reads the transposed matrix (for dense X a C-ordered
    copy; for CSR X a CSC view the moments read by column).

    Where: a device matrix (cupy / cupyx) is aggregated on the device and the layers are cupy
    arrays (small: groups × genes; the user's data stays where it lives); a host matrix gives
    numpy layers, as scanpy. Device memory besides the matrix: the moments' workspace
    (``gpusc._kernels.moments.device_workspace_bytes``: at most 256 MiB of partial sums plus
    the result), a CSR copy of CSC input with groups, and for ``median`` of sparse input a CSC
    copy (CSR input) plus about 40 bytes per stored value.

    Parameters
    ----------
    adata
        The AnnData to aggregate; it is not changed.
    by
        Key (or keys) of the categorical column(s) of ``adata.obs`` (``axis="obs"``) or
        ``adata.var`` (``axis="var"``) to group by.
    func
        One or several of ``"count_nonzero"``, ``"sum"``, ``"median"``, ``"mean"``, ``"var"``.
    axis
        ``"obs"``/0 (default; ``"var"`` when ``varm`` is given) or ``"var"``/1.
    mask
        Boolean array along the axis (or the name of such a column): only the True
        observations are aggregated.
    dof
        Degrees of freedom of the variance (default 1).
    layer, obsm, varm
        Aggregate this layer, obsm entry (``axis="obs"``) or varm entry (``axis="var"``)
        instead of X; at most one of them.

    Returns
    -------
    An :class:`~anndata.AnnData` with one row per group (columns per group for
    ``axis="var"``) and the var (obs) of ``adata``, or a range index for obsm/varm (the
    DataFrame's columns for a DataFrame entry). Its layers, in scanpy's order and dtypes:

    ``sum``
        float64; int64 for sparse integer input.
    ``mean``
        float64 (NaN for a group whose cells are all masked out, ``0`` there when ``var`` is
        asked for too, as scanpy).
    ``count_nonzero``
        int64 for sparse input, float64 for dense input.
    ``var``
        float64; NaN with a RuntimeWarning for groups with at most ``dof`` cells.
    ``median``
        float64 for sparse input; for dense input ``numpy.median``'s dtype (float32 for float32
        input); NaN for an empty group.

    obs: the ``by`` columns (categorical) and ``n_obs_aggregated`` (int64, cells per group
    after the mask).

    Raises
    ------
    KeyError
        An unknown ``by`` key, layer, obsm or varm key.
    ValueError
        An unknown func, a mask of the wrong length or dtype, a bad axis, ``obsm`` with
        ``axis="var"`` or ``varm`` with ``axis="obs"``, a negative ``dof``, NaN or inf in the
        matrix.
    TypeError
        Several of layer / obsm / varm.
    NotImplementedError
        ``median`` of a dask array (scanpy's message), a dask array with ``axis="var"``
        (its chunks split cells, not genes).

    A dask X (or layer) split by rows, as scanpy: the layers are lazy dask arrays (one chunk
    each, groups × genes); computing any of them runs the one pass of the moments over the
    chunks (a chunk at a time, each by the kernels of its kind), and all layers of one call
    share it. NaN or inf in the matrix is then an error at compute time.
    """
    fn = "aggregate"
    if not isinstance(adata, AnnData):
        raise NotImplementedError(
            f"{fn}: sc.get.aggregate is currently only implemented for AnnData input, was "
            f"passed {type(adata)}.")
    if axis is None:
        axis = 1 if varm else 0
    axis, axis_name = _resolve_axis(axis)
    mask = _mask(adata, mask, axis_name)
    x = _matrix(adata, axis, layer, obsm, varm)
    funcs = _funcs(func)
    if "var" in funcs and dof < 0:
        raise ValueError(f"{fn}: dof must be >= 0, got {dof}")
    codes, labels = _groups(getattr(adata, axis_name), by)
    if mask is not None:
        codes = np.where(mask, codes, -1)
    n_groups = len(labels)
    labels["n_obs_aggregated"] = np.bincount(codes[codes >= 0], minlength=n_groups)

    if is_dask(x):
        layers = _aggregate_dask(x, codes, n_groups, funcs, dof, labels.index)
    else:
        layers = _aggregate(x, codes, n_groups, funcs, dof, labels.index)

    if obsm or varm:
        data = adata.obsm[obsm] if obsm else adata.varm[varm]
        if isinstance(data, pd.DataFrame):
            var = pd.DataFrame(index=data.columns)
        else:
            var = pd.DataFrame(index=pd.RangeIndex(x.shape[1]).astype(str))
    else:
        var = getattr(adata, "var" if axis == 0 else "obs")
    result = AnnData(layers=layers, obs=labels, var=var)
    return result.T if axis == 1 else result


def _resolve_axis(axis) -> tuple[int, str]:
    if axis in (0, "obs"):
        return 0, "obs"
    if axis in (1, "var"):
        return 1, "var"
    raise ValueError(f"aggregate: `axis` must be either 0, 1, 'obs', or 'var', was {axis!r}")


def _mask(adata: AnnData, mask, axis_name: str) -> np.ndarray | None:
    """The boolean mask along the axis, checked as scanpy checks it."""
    if mask is None:
        return None
    if isinstance(mask, str):
        frame = getattr(adata, axis_name)
        if mask not in frame.columns:
            raise ValueError(
                f"aggregate: Did not find `adata.{axis_name}[{mask!r}]`. Either add the mask "
                f"first to `adata.{axis_name}`or consider using the mask argument with an array.")
        mask = frame[mask].to_numpy()
    else:
        if len(mask) != adata.shape[0 if axis_name == "obs" else 1]:
            raise ValueError(
                f"aggregate: The shape of the mask do not match the data. (mask of length "
                f"{len(mask)}, adata.n_{axis_name} = {adata.shape[0 if axis_name == 'obs' else 1]})")
        if isinstance(mask, types.CupyArray):
            mask = mask.get()  # synchronize!
    mask = np.asarray(mask)
    if not pd.api.types.is_bool_dtype(mask.dtype):
        raise ValueError(f"aggregate: Mask array must be boolean. (got dtype {mask.dtype})")
    return mask.astype(bool, copy=False)


def _matrix(adata: AnnData, axis: int, layer, obsm, varm):
    """The matrix to aggregate, rows along the axis, as scanpy chooses it."""
    fn = "aggregate"
    if sum(p is not None for p in (varm, obsm, layer)) > 1:
        raise TypeError(f"{fn}: Please only provide one (or none) of varm, obsm, or layer")
    if varm is not None:
        if axis != 1:
            raise ValueError(f"{fn}: varm can only be used when axis is 1")
        if varm not in adata.varm:
            raise KeyError(f"{fn}: varm={varm!r} not found; adata.varm has {list(adata.varm)}")
        x = adata.varm[varm]
    elif obsm is not None:
        if axis != 0:
            raise ValueError(f"{fn}: obsm can only be used when axis is 0")
        if obsm not in adata.obsm:
            raise KeyError(f"{fn}: obsm={obsm!r} not found; adata.obsm has {list(adata.obsm)}")
        x = adata.obsm[obsm]
    elif layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"{fn}: layer={layer!r} not found; adata.layers has {list(adata.layers)}")
        x = adata.layers[layer]
    else:
        if adata.X is None:
            raise ValueError(f"{fn}: adata.X is None; pass layer= to choose a layer")
        x = adata.X
    if isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    if is_dask(x):
        check_row_chunks(x, fn)
        if axis == 1:
            raise NotImplementedError(f"{fn}: axis='var' on a dask array: its chunks split the cells, "
                                      "so a gene's values are spread over every chunk; compute it first")
        return x
    placement(x)  # a TypeError naming the supported types otherwise
    if axis == 1 and varm is None:
        x = x.T
    return x


def _funcs(func) -> set[str]:
    funcs = {func} if isinstance(func, str) else set(func)
    if unknown := funcs - set(FUNCS):
        raise ValueError(f"aggregate: func {unknown} is not one of {dict.fromkeys(FUNCS).keys()}")
    return funcs


def _groups(frame: pd.DataFrame, by) -> tuple[np.ndarray, pd.DataFrame]:
    """Each row's group (int64, -1 where a key is NaN) and the groups' labels: one row per
    combination of the keys' categories that occurs, in product order of the categories (the
    first key slowest), named by its categories joined with "_"."""
    keys = [by] if isinstance(by, str) else list(by)
    for key in keys:
        if key not in frame.columns:
            raise KeyError(f"aggregate: by={key!r} is not a column; the columns are "
                           f"{list(frame.columns)}")
    categoricals = [pd.Categorical(frame[key]).remove_unused_categories() for key in keys]
    sizes = tuple(len(c.categories) for c in categoricals)
    key_codes = np.stack([np.asarray(c.codes, np.int64) for c in categoricals])
    unassigned = (key_codes < 0).any(axis=0)
    combination = np.ravel_multi_index(np.where(unassigned, 0, key_codes), sizes)
    combination[unassigned] = -1
    present = np.unique(combination[~unassigned])
    codes = np.where(unassigned, -1, np.searchsorted(present, combination))
    per_key = np.unravel_index(present, sizes)
    names = ["_".join(str(c.categories[k]) for c, k in zip(categoricals, combo, strict=True))
             for combo in zip(*per_key, strict=True)]
    labels = pd.DataFrame(
        {key: pd.Categorical.from_codes(per_key[i], categoricals[i].categories)
         for i, key in enumerate(keys)},
        index=pd.Index(names))
    return codes, labels


def _float_matrix(x):
    """Integer and boolean matrices as float64 for the kernels (exact below 2**53)."""
    return x if x.dtype.kind == "f" else x.astype(np.float64)


def _aggregate(x, codes: np.ndarray, n_groups: int, funcs: set[str], dof: int,
               group_names: pd.Index) -> dict[str, object]:
    """The layers, in the order (and dtypes) scanpy writes them."""
    device = placement(x) == "device"
    moments = None
    if funcs - {"median"}:
        moments = gene_moments(_float_matrix(x), codes.astype(np.int32), n_groups,
                               squares="var" in funcs,
                               count=COUNT_NONZERO if "count_nonzero" in funcs else COUNT_NONE)
    elif not _all_finite(x):
        raise nonfinite_error("aggregate", "the matrix")
    layers = _layers(moments, codes, n_groups, funcs, dof, group_names, is_sparse(x),
                     np.issubdtype(x.dtype, np.integer))
    if device:
        import cupy as cp

        layers = {k: cp.asarray(v) for k, v in layers.items()}
    if "median" in funcs:
        layers["median"] = group_medians(x, codes.astype(np.int32), n_groups)
    return layers


def _aggregate_dask(x, codes: np.ndarray, n_groups: int, funcs: set[str], dof: int,
                    group_names: pd.Index) -> dict[str, object]:
    """The layers of a dask matrix as lazy dask arrays that share one moments pass."""
    import dask
    import dask.array as da

    if "median" in funcs:  # scanpy's message
        raise NotImplementedError("aggregate: Dask median calculation not supported.  If you want a "
                                  "median-of-medians calculation, please open an issue.")
    kind = check_row_chunks(x, "aggregate")
    sparse, integer = kind.endswith("csr"), np.issubdtype(x.dtype, np.integer)
    partials = moments_partials(_float_matrix(x), codes.astype(np.int32), n_groups,
                                squares="var" in funcs,
                                count=COUNT_NONZERO if "count_nonzero" in funcs else COUNT_NONE)
    layers = dask.delayed(lambda parts: _layers(add_moments(parts), codes, n_groups, funcs, dof,
                                                group_names, sparse, integer))(partials)
    dtypes = {"sum": np.int64 if sparse and integer else np.float64, "mean": np.float64,
              "var": np.float64, "count_nonzero": np.int64 if sparse else np.float64}
    order = _layers_order(funcs)
    return {name: da.from_delayed(layers[name], (n_groups, x.shape[1]), dtype=dtypes[name])
            for name in order}


def _layers_order(funcs: set[str]) -> list[str]:
    """The layer names, in scanpy's order for in-memory input (the order _layers returns)."""
    order = [f for f in ("sum", "mean", "count_nonzero") if f in funcs and not (f == "mean" and "var" in funcs)]
    if "var" in funcs:
        order += ["var", "mean"] if "mean" in funcs else ["var"]
    return order


def _layers(moments, codes, n_groups: int, funcs: set[str], dof: int, group_names: pd.Index,
            sparse: bool, integer: bool) -> dict[str, np.ndarray]:
    """The host layers from the moments (median aside), in scanpy's dtypes and in
    :func:`_layers_order`."""
    if moments is None:
        return {}
    if moments.nonfinite:
        raise nonfinite_error("aggregate", "the matrix")
    n = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)[:, None]
    layers: dict[str, np.ndarray] = {}
    if "sum" in funcs:
        layers["sum"] = moments.sum.astype(np.int64) if sparse and integer else moments.sum
    if "mean" in funcs and "var" not in funcs:
        layers["mean"] = moments.sum / n  # 0/0 = NaN (numpy's warning) for an empty group
    if "count_nonzero" in funcs:
        layers["count_nonzero"] = moments.count if sparse else moments.count.astype(np.float64)
    if "var" in funcs:
        layers["mean"], layers["var"] = _mean_var(moments, n, dof, group_names)
    return {name: layers[name] for name in _layers_order(funcs)}


def _mean_var(moments, n: np.ndarray, dof: int, group_names: pd.Index):
    """scanpy's mean_var: means (0 for an empty group) and variances with ``dof``; NaN and
    scanpy's RuntimeWarning where a group has no more than ``dof`` cells."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, moments.sum / n, 0.0)
        squared_deviations = np.maximum(moments.sum_sq - moments.sum * mean, 0.0)
        population = np.where(n > 0, squared_deviations / n, 0.0)
    if dof == 0:
        return mean, population
    denominator = np.where(n > dof, n - dof, np.nan)
    too_small = np.isnan(denominator[:, 0])
    if too_small.any():
        warnings.warn(f"Group counts matches dof, resulting var for groups "
                      f"{group_names[too_small].to_list()} will be nan", RuntimeWarning,
                      stacklevel=4)
    return mean, population * (n / denominator)


def _all_finite(x) -> bool:
    values = x.data if is_sparse(x) else x
    if values.dtype.kind != "f":
        return True
    return bool(xp_of(x).isfinite(values).all())  # synchronize!
