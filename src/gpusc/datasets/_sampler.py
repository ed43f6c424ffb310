"""Sparse negative-binomial sampler shared by :func:`synthetic` and :func:`resample`.

The model: cell ``i`` belongs to group ``g[i]`` and has library size ``L[i]``; gene ``j``
of that cell has ``x_ij ~ NB(mean = L[i] * f[g, j], dispersion = phi[g, j])``
(variance ``mu + phi * mu**2``), all genes independent. Drawing every (cell, gene)
pair would cost n_obs * n_vars draws, so the sampler only visits the pairs that can be
non-zero:

* ``P(x > 0) = 1 - (1 + phi*mu)**(-1/phi)`` is at most ``min(1, log1p(phi*mu)/phi)``,
  which grows with ``mu`` and falls with ``phi``. A group's genes are binned into classes
  where ``f`` and ``phi`` each span a factor of two; the class's largest ``f`` and
  smallest ``phi`` give a bound ``q`` for all its genes. Candidates are drawn by geometric
  skipping with ``q`` and kept with probability ``P(x > 0) / q``, so the work per cell is
  proportional to its number of non-zeros plus the number of classes.
* A kept gene gets a count from the zero-truncated NB: inversion of the pmf (with what is
  left of the acceptance uniform) for small means, a gamma-Poisson draw with zeros
  rejected for large ones.

Random numbers come from a counter-based generator (SplitMix64) seeded per cell, so the
result does not depend on the number of threads. Two streams per cell: one decides
which genes are non-zero, the other draws gamma-Poisson counts. Rows are written once
into slots sized well above their expected length; a row that overflows its slot (not
expected to happen) is walked again with its exact size, giving the same values.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from scipy import sparse

from .._kernels import prange_only

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53
_INVERSION_MAX_MEAN = 10.0


@numba.njit(inline="always", cache=True)
def _mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(inline="always", cache=True)
def _uniform(state):
    """A uniform in (0, 1]; ``state`` is a one-element uint64 array advanced in place."""
    state[0] += _GOLDEN
    return (float(_mix(state[0]) >> _S11) + 1.0) * _INV53


@numba.njit(cache=True)
def _normal(state):
    # Box-Muller, one value per call (the partner is dropped: simpler than caching).
    u1 = _uniform(state)
    u2 = _uniform(state)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@numba.njit(cache=True)
def _gamma(shape, state):
    """Gamma(shape, scale 1), Marsaglia & Tsang (2000); shape < 1 by the u**(1/a) boost."""
    boost = 1.0
    if shape < 1.0:
        boost = _uniform(state) ** (1.0 / shape)
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = _normal(state)
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        u = _uniform(state)
        if u < 1.0 - 0.0331 * x * x * x * x or math.log(u) < 0.5 * x * x + d * (1.0 - v + math.log(v)):
            return d * v * boost


@numba.njit(cache=True)
def _poisson(lam, state):
    """Poisson(lam): multiplication method below 10, Hormann's PTRS (1993) above."""
    if lam <= 0.0:
        return 0
    if lam < 10.0:
        limit = math.exp(-lam)
        k = 0
        p = _uniform(state)
        while p > limit:
            k += 1
            p *= _uniform(state)
        return k
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u = _uniform(state) - 0.5
        v = _uniform(state)
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return int(k)
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b) <= -lam + k * loglam - math.lgamma(k + 1.0):
            return int(k)


@numba.njit(inline="always", cache=True)
def _p_nonzero(mu, phi):
    return -math.expm1(-math.log1p(phi * mu) / phi)


@numba.njit(cache=True)
def _count_above_zero(mu, phi, p_nonzero, rest, state):
    """A draw of NB(mu, phi) conditioned on being > 0.

    ``rest`` is uniform on [0, p_nonzero) (what is left of the acceptance uniform): for
    small means it inverts the pmf from 1 upwards, using no further random numbers; large
    means draw gamma-Poisson from ``state`` and reject zeros.
    """
    if mu < _INVERSION_MAX_MEAN:
        r = 1.0 / phi
        ratio = phi * mu / (1.0 + phi * mu)
        pk = (1.0 - p_nonzero) * r * ratio  # P(x = 1)
        k = 1
        while rest >= pk and pk > 0.0:
            rest -= pk
            pk *= (k + r) / (k + 1.0) * ratio
            k += 1
        return k
    while True:
        k = _poisson(mu * _gamma(1.0 / phi, state) * phi, state)
        if k > 0:
            return k


@numba.njit(cache=True)
def _visit_cell(cell, lib, first_class, last_class, cls_f, cls_phi, cls_genes, cls_ptr, cls_fmax, cls_phimin,
                key, out, start, cap):
    """Walk one cell's candidate genes; write up to ``cap`` packed ``gene << 32 | count``
    into ``out[start:]`` and return the number of non-zeros (which may exceed ``cap``).
    """
    pick = np.empty(1, np.uint64)
    pick[0] = _mix(key ^ (np.uint64(cell) * _GOLDEN))
    draw = np.empty(1, np.uint64)
    draw[0] = _mix(pick[0] ^ _M2)
    n = 0
    for c in range(first_class, last_class):
        lo = cls_ptr[c]
        hi = cls_ptr[c + 1]
        # P(x > 0) = 1 - (1 + phi mu)^(-1/phi) <= log1p(phi mu) / phi, which grows with mu
        # and falls with phi: the class's largest f and smallest phi bound all its genes.
        q = math.log1p(cls_phimin[c] * lib * cls_fmax[c]) / cls_phimin[c]
        if q >= 1.0:
            # every gene of the class is a candidate
            q = 1.0
            pos = lo
            step_log = 0.0
        else:
            step_log = math.log1p(-q)
            pos = lo + int(math.floor(math.log(_uniform(pick)) / step_log))
        while pos < hi:
            mu = lib * cls_f[pos]
            v = _uniform(pick) * q  # uniform on (0, q]
            if v <= mu:  # P(x > 0) <= mu: many rejections need no logarithm
                phi = cls_phi[pos]
                p_nonzero = -math.expm1(-math.log1p(phi * mu) / phi)
                if v <= p_nonzero:
                    if n < cap:
                        count = _count_above_zero(mu, phi, p_nonzero, p_nonzero - v, draw)
                        out[start + n] = (np.int64(cls_genes[pos]) << 32) | np.int64(count)
                    n += 1
            if q == 1.0:
                pos += 1
            else:
                pos += 1 + int(math.floor(math.log(_uniform(pick)) / step_log))
    return n


@numba.njit(parallel=prange_only(), cache=True)
def _walk_rows(cells, groups, libs, grp_cls, cls_f, cls_phi, cls_genes, cls_ptr, cls_fmax, cls_phimin, key,
               out, offsets, caps):
    """Cell ``cells[i]`` into its slot ``out[offsets[i]:offsets[i] + caps[i]]``, sorted; returns nnz per cell."""
    nnz = np.empty(cells.shape[0], np.int64)
    for i in numba.prange(cells.shape[0]):
        g = groups[i]
        n = _visit_cell(cells[i], libs[i], grp_cls[g], grp_cls[g + 1], cls_f, cls_phi, cls_genes, cls_ptr,
                        cls_fmax, cls_phimin, key, out, offsets[i], caps[i])
        nnz[i] = n
        if n <= caps[i]:
            out[offsets[i]:offsets[i] + n].sort()
    return nnz


@numba.njit(parallel=prange_only(), cache=True)
def _unpack(out, offsets, rows, indptr, indices, data):
    """Row ``rows[r]`` of the CSR from ``out[offsets[r]:]``."""
    for r in numba.prange(rows.shape[0]):
        i = rows[r]
        src = offsets[r]
        for k in range(indptr[i + 1] - indptr[i]):
            packed = out[src + k]
            indices[indptr[i] + k] = np.int32(packed >> 32)
            data[indptr[i] + k] = np.float32(packed & 0xFFFFFFFF)


def gene_classes(f: np.ndarray, phi: np.ndarray):
    """Bin each group's genes with ``f > 0`` into classes where ``f`` and ``phi`` each span a factor of two.

    Returns ``grp_cls`` (class boundaries of each group), then, class by class and group
    by group, ``cls_f``, ``cls_phi`` (the genes' parameters, stored in walk order so the
    walk reads memory forwards), ``cls_genes`` (gene ids), and per class ``cls_ptr``
    (boundaries into the gene arrays), ``cls_fmax`` (largest ``f`` of the class) and
    ``cls_phimin`` (smallest ``phi``).
    """
    genes, ptr, fmax, phimin, grp = [], [0], [], [], [0]
    for row, row_phi in zip(f, phi, strict=True):
        expressed = np.flatnonzero(row > 0)
        f_exp = np.floor(np.log2(row[expressed])).astype(np.int64)
        phi_exp = np.floor(np.log2(row_phi[expressed])).astype(np.int64)
        order = np.lexsort((expressed, phi_exp, -f_exp))
        expressed, f_exp, phi_exp = expressed[order], f_exp[order], phi_exp[order]
        cuts = np.flatnonzero((np.diff(f_exp) != 0) | (np.diff(phi_exp) != 0)) + 1
        for chunk in np.split(expressed, cuts):
            genes.append(chunk)
            ptr.append(ptr[-1] + chunk.size)
            fmax.append(row[chunk].max())
            phimin.append(row_phi[chunk].min())
        grp.append(len(fmax))
    group_of = np.repeat(np.arange(f.shape[0]), np.diff(np.asarray(ptr)[np.asarray(grp)]))
    cls_genes = np.concatenate(genes).astype(np.int32) if genes else np.empty(0, np.int32)
    return (
        np.asarray(grp, np.int64),
        np.ascontiguousarray(f[group_of, cls_genes], dtype=np.float64),
        np.ascontiguousarray(phi[group_of, cls_genes], dtype=np.float64),
        cls_genes,
        np.asarray(ptr, np.int64),
        np.asarray(fmax, np.float64),
        np.asarray(phimin, np.float64),
    )


def _expected_nnz(groups, libs, f, phi) -> np.ndarray:
    """Expected non-zeros of each cell, interpolated on a log grid of library sizes per group."""
    expected = np.empty(libs.size)
    for g in np.unique(groups):
        mask = groups == g
        grid = np.geomspace(libs[mask].min(), libs[mask].max() * (1 + 1e-9), 64)
        on = f[g] > 0
        mu = grid[:, None] * f[g, on][None, :]
        curve = -np.expm1(-np.log1p(phi[g, on] * mu) / phi[g, on]).sum(axis=1)
        expected[mask] = np.interp(np.log(libs[mask]), np.log(grid), curve)
    return expected


def sample_nb_csr(groups, libs, f, phi, n_vars: int, seed_key: int) -> sparse.csr_matrix:
    """CSR float32 counts, one row per cell: ``x_ij ~ NB(libs[i] * f[groups[i], j], phi[groups[i], j])``.

    ``f`` and ``phi`` are (n_groups, n_vars); ``phi`` must be > 0 where ``f`` > 0 and
    ``libs`` > 0. Deterministic for ``seed_key`` (a 64-bit integer), independent of the
    thread count. Memory: a packed int64 buffer of about 1.3 x the non-zeros, then the CSR.
    """
    groups = np.ascontiguousarray(groups, dtype=np.int64)
    libs = np.ascontiguousarray(libs, dtype=np.float64)
    f = np.ascontiguousarray(f, dtype=np.float64)
    phi = np.ascontiguousarray(phi, dtype=np.float64)
    classes = gene_classes(f, phi)
    key = np.uint64(seed_key & 0xFFFFFFFFFFFFFFFF)
    cells = np.arange(groups.size, dtype=np.int64)

    # One walk into slots sized far above the expected count (the non-zeros of a cell are a
    # sum of independent Bernoullis, variance <= mean); a cell that still overflows is
    # walked again with its exact size (same random stream, same result).
    expected = _expected_nnz(groups, libs, f, phi)
    caps = np.ceil(1.02 * expected + 10.0 * np.sqrt(expected) + 64.0).astype(np.int64)
    caps = np.minimum(caps, n_vars)
    offsets = np.zeros(groups.size, np.int64)
    np.cumsum(caps[:-1], out=offsets[1:])
    out = np.empty(int(caps.sum()), np.int64)
    nnz = _walk_rows(cells, groups, libs, *classes, key, out, offsets, caps)

    indptr = np.zeros(groups.size + 1, np.int64)
    np.cumsum(nnz, out=indptr[1:])
    indices = np.empty(indptr[-1], np.int32)
    data = np.empty(indptr[-1], np.float32)
    fits = nnz <= caps
    _unpack(out, offsets[fits], cells[fits], indptr, indices, data)
    del out
    if not fits.all():
        redo = cells[~fits]
        redo_caps = nnz[redo]
        redo_offsets = np.zeros(redo.size, np.int64)
        np.cumsum(redo_caps[:-1], out=redo_offsets[1:])
        redo_out = np.empty(int(redo_caps.sum()), np.int64)
        _walk_rows(redo, groups[redo], libs[redo], *classes, key, redo_out, redo_offsets, redo_caps)
        _unpack(redo_out, redo_offsets, redo, indptr, indices, data)
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    return sparse.csr_matrix((data, indices, indptr), shape=(groups.size, n_vars))
