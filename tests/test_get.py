"""gpusc.get: moving matrices and AnnData objects between host and device.

CPU tests check the errors (raised before anything moves) and the host-side paths;
GPU-marked tests check bit-exact round trips, index dtypes and AnnData placement.
"""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from gpusc.get import X_to_CPU, X_to_GPU, anndata_to_CPU, anndata_to_GPU
from gpusc._core import arrays
from gpusc.get._transfer import _assemble_host_sparse, _index_arrays

from conftest import HOST_TYPES, synthetic_counts

SPARSE_TYPES = {k: v for k, v in HOST_TYPES.items() if k != "dense"}


def _unsupported():
    cases = {
        "coo_matrix": lambda x: sparse.coo_matrix(x),
        "coo_array": lambda x: sparse.coo_array(x),
        "list": lambda x: x.tolist(),
        "DataFrame": lambda x: pd.DataFrame(x),
        "object_dtype": lambda x: x.astype(object),
    }
    return cases  # dask arrays move chunk by chunk: tests/test_dask_get_memory.py


UNSUPPORTED = _unsupported()


def _make_adata(n_obs=50, n_vars=45, *, fmt="csr_matrix", seed=0) -> ad.AnnData:
    x = synthetic_counts(n_obs, n_vars, seed=seed, density=0.3)
    adata = ad.AnnData(
        HOST_TYPES[fmt](x),
        obs=pd.DataFrame({"group": np.arange(n_obs) % 3}, index=[f"c{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]),
    )
    adata.layers["counts"] = sparse.csr_matrix(x)
    adata.layers["dense"] = x.astype(np.float64)
    adata.obsm["X_pca"] = np.random.default_rng(seed).random((n_obs, 5))
    adata.obsp["distances"] = sparse.random(n_obs, n_obs, density=0.1, format="csr", random_state=seed)
    adata.uns["params"] = {"n": 3}
    return adata


def _with_index_dtype(m, index_dtype):
    """`m` with indices/indptr cast to index_dtype.

    Assigned after construction: SciPy's (data, indices, indptr) constructor would
    downcast int64 to int32 again when the values fit.
    """
    m = m.copy()
    m.indices = m.indices.astype(index_dtype)
    m.indptr = m.indptr.astype(index_dtype)
    assert m.indices.dtype == index_dtype and m.indptr.dtype == index_dtype
    return m


def _assert_same_sparse(a, b):
    assert a.shape == b.shape
    for name in ("data", "indices", "indptr"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert x.tobytes() == y.tobytes(), name  # bit for bit


def _snapshot(adata: ad.AnnData) -> dict:
    """Identity of every array in adata, to show nothing was replaced."""
    return {
        "X": id(adata.X),
        **{f"layer:{k}": id(v) for k, v in adata.layers.items() if k is not None},
        **{f"obsm:{k}": id(v) for k, v in adata.obsm.items()},
    }


# ---------------------------------------------------------------------------
# CPU: errors and host paths


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_X_to_GPU_rejects_unsupported_types(kind):
    x = UNSUPPORTED[kind](synthetic_counts(50, 45))
    with pytest.raises(TypeError) as info:
        X_to_GPU(x)
    msg = str(info.value)
    # names the supported types; and the offending type (or dtype)
    assert "numpy.ndarray" in msg or "dtype object" in msg
    if kind != "object_dtype":
        assert type(x).__name__ in msg
        assert "scipy.sparse.csr_matrix" in msg and "cupyx.scipy.sparse.csc_matrix" in msg


@pytest.mark.parametrize("kind", ["coo_matrix", "list", "DataFrame"])
def test_X_to_CPU_rejects_unsupported_types(kind):
    x = UNSUPPORTED[kind](synthetic_counts(50, 45))
    with pytest.raises(TypeError, match=type(x).__name__):
        X_to_CPU(x)


@pytest.mark.parametrize("kind", list(HOST_TYPES))
def test_X_to_CPU_returns_host_input_as_is(kind):
    x = HOST_TYPES[kind](synthetic_counts(50, 45))
    assert X_to_CPU(x) is x


@pytest.mark.parametrize("convert_all", [True, False])
def test_anndata_to_GPU_checks_all_types_before_moving(convert_all):
    adata = _make_adata()
    adata.layers["labels"] = np.full(adata.shape, "a", dtype=object)
    before = _snapshot(adata)
    # A TypeError (not a cupy ImportError, nor a half-moved X) shows every array is
    # checked before the first one moves.
    with pytest.raises(TypeError, match=r"adata.layers\['labels'\].*dtype object"):
        if convert_all:
            anndata_to_GPU(adata, convert_all=True)
        else:
            anndata_to_GPU(adata, layer="labels")
    assert _snapshot(adata) == before
    assert isinstance(adata.X, sparse.csr_matrix)


@pytest.mark.parametrize("func", [anndata_to_GPU, anndata_to_CPU])
def test_missing_layer_raises_keyerror_and_leaves_adata(func):
    adata = _make_adata()
    before = _snapshot(adata)
    with pytest.raises(KeyError) as info:
        func(adata, layer="spliced")
    msg = str(info.value)
    assert "layer='spliced'" in msg
    assert "'counts'" in msg and "'dense'" in msg
    assert "None" not in msg  # anndata 0.13 keeps X under layers[None]; not a layer
    assert _snapshot(adata) == before


@pytest.mark.parametrize("func", [anndata_to_GPU, anndata_to_CPU])
def test_layer_and_convert_all_conflict(func):
    adata = _make_adata()
    with pytest.raises(ValueError, match="convert_all"):
        func(adata, layer="counts", convert_all=True)


def test_missing_X_raises():
    adata = _make_adata()
    adata.X = None
    with pytest.raises(ValueError, match="adata.X is None"):
        anndata_to_GPU(adata)


def test_anndata_to_CPU_on_host_data_changes_nothing():
    adata = _make_adata()
    before = _snapshot(adata)
    assert anndata_to_CPU(adata, convert_all=True) is None
    assert _snapshot(adata) == before


def test_anndata_to_CPU_on_host_view_keeps_view():
    # Nothing to move, so nothing is written, so anndata does not actualize the view.
    view = _make_adata()[:10]
    anndata_to_CPU(view, convert_all=True)
    assert view.is_view


@pytest.mark.parametrize("from_view", [False, True])
def test_anndata_copy_shares_nothing(from_view):
    adata = _make_adata()
    src = adata[:25] if from_view else adata
    before = _snapshot(adata)
    out = anndata_to_CPU(src, convert_all=True, copy=True)
    assert isinstance(out, ad.AnnData) and not out.is_view
    assert out.shape == src.shape
    assert isinstance(out.X, sparse.csr_matrix)
    assert not np.shares_memory(out.X.data, adata.X.data)
    assert not np.shares_memory(out.layers["dense"], adata.layers["dense"])
    assert not np.shares_memory(out.obsm["X_pca"], adata.obsm["X_pca"])
    np.testing.assert_array_equal(out.X.toarray(), src.X.toarray())
    np.testing.assert_array_equal(out.layers["dense"], src.layers["dense"])
    pd.testing.assert_frame_equal(out.obs, src.obs.copy())
    assert out.uns["params"] == {"n": 3}
    out.uns["params"]["n"] = 4
    assert adata.uns["params"]["n"] == 3
    assert _snapshot(adata) == before


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_assemble_host_sparse_keeps_index_dtype(fmt, index_dtype):
    # The host half of X_to_CPU: int64 must stay int64 even where the values fit int32.
    ref = _with_index_dtype(sparse.random(30, 20, density=0.2, format=fmt, random_state=1), index_dtype)
    out = _assemble_host_sparse(fmt, ref.data.copy(), ref.indices.copy(), ref.indptr.copy(), ref.shape)
    assert type(out) is (sparse.csr_matrix if fmt == "csr" else sparse.csc_matrix)
    _assert_same_sparse(out, ref)
    np.testing.assert_array_equal(out.toarray(), ref.toarray())


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_indices_go_to_the_device_as_int32_where_they_fit(index_dtype):
    """The index policy: int32 on the device wherever the matrix fits it, int64 past 2**31."""
    host = _with_index_dtype(sparse.random(30, 20, density=0.2, format="csr", random_state=1), index_dtype)
    indices, indptr = _index_arrays(host)
    assert indices.dtype == indptr.dtype == np.int32
    np.testing.assert_array_equal(indices, host.indices)
    np.testing.assert_array_equal(indptr, host.indptr)
    assert arrays.index_dtype_for(2**31 - 1, (10, 10)) == np.int32
    assert arrays.index_dtype_for(2**31, (10, 10)) == np.int64  # stored values past int32
    assert arrays.index_dtype_for(5, (2**31, 10)) == np.int64  # a dimension past int32


def test_int64_device_indices_refused_before_cupy_14_1(monkeypatch):
    """CuPy 13 reads int64 index buffers as int32: refused with the fix in the message."""
    monkeypatch.setattr(arrays, "_cupy_version", lambda: (13, 6))
    with pytest.raises(RuntimeError, match=r"CuPy >= 14\.1"):
        arrays._check_cupy_int64_sparse()
    monkeypatch.setattr(arrays, "_cupy_version", lambda: (14, 1))
    arrays._check_cupy_int64_sparse()


# ---------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_dense_round_trip_bit_exact(dtype):
    import cupy

    x = synthetic_counts(50, 45, dtype=dtype)
    if x.dtype.kind == "f":
        x[0, 0] = np.nextafter(x.dtype.type(1), x.dtype.type(2))  # a value with all mantissa bits in play
    d = X_to_GPU(x)
    assert isinstance(d, cupy.ndarray)
    assert d.dtype == x.dtype  # integer stays integer for dense
    back = X_to_CPU(d)
    assert isinstance(back, np.ndarray)
    assert back.dtype == x.dtype and back.tobytes() == x.tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("kind", "dtype", "index_dtype"),
    list(itertools.product(SPARSE_TYPES, [np.float32, np.float64], [np.int32, np.int64])),
)
def test_sparse_round_trip_bit_exact(kind, dtype, index_dtype):
    from cupyx.scipy import sparse as cpsparse

    x = synthetic_counts(60, 45, dtype=dtype)
    x[1, 1] = np.nextafter(x.dtype.type(3), x.dtype.type(4))
    host = _with_index_dtype(SPARSE_TYPES[kind](x), index_dtype)
    is_csr = kind.startswith("csr")

    d = X_to_GPU(host)
    assert type(d) is (cpsparse.csr_matrix if is_csr else cpsparse.csc_matrix)
    assert d.shape == host.shape
    assert d.data.dtype == dtype
    # int32 on the device wherever it fits (the index policy), whatever the host had
    assert d.indices.dtype == np.int32 and d.indptr.dtype == np.int32
    assert d.data.get().tobytes() == host.data.tobytes()
    for name in ("indices", "indptr"):
        np.testing.assert_array_equal(getattr(d, name).get(), getattr(host, name), err_msg=name)
    # the assembled cupyx matrix works as a matrix, not only as three buffers
    np.testing.assert_array_equal(d.toarray().get(), x)

    back = X_to_CPU(d)
    assert type(back) is (sparse.csr_matrix if is_csr else sparse.csc_matrix)
    _assert_same_sparse(back, _with_index_dtype(host, np.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_sparse_integer_data_become_float32(index_dtype):
    x = synthetic_counts(50, 45, dtype=np.int64)
    host = _with_index_dtype(sparse.csr_matrix(x), index_dtype)
    d = X_to_GPU(host)
    assert d.data.dtype == np.float32
    assert d.indices.dtype == np.int32  # the index policy: int32 wherever it fits
    np.testing.assert_array_equal(d.data.get(), host.data.astype(np.float32))
    np.testing.assert_array_equal(d.indices.get(), host.indices)


@pytest.mark.gpu
def test_sparse_unsorted_and_duplicate_indices_moved_as_they_are():
    data = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    indices = np.array([2, 0, 2, 1], dtype=np.int32)  # row 0 unsorted, row 1 duplicate column
    indptr = np.array([0, 2, 4], dtype=np.int32)
    host = sparse.csr_matrix((2, 3), dtype=np.float32)
    host.data, host.indices, host.indptr = data, indices, indptr
    d = X_to_GPU(host)
    np.testing.assert_array_equal(d.indices.get(), indices)
    np.testing.assert_array_equal(d.data.get(), data)
    back = X_to_CPU(d)
    np.testing.assert_array_equal(back.indices, indices)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "csr_matrix", "csc_matrix"])
def test_device_input_returned_as_is(kind):
    from conftest import to_device

    d = to_device(HOST_TYPES[kind](synthetic_counts(50, 45)))
    assert X_to_GPU(d) is d


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["csr_matrix", "csc_matrix", "dense"])
def test_anndata_round_trip_in_place(fmt):
    import cupy
    from cupyx.scipy import sparse as cpsparse

    adata = _make_adata(fmt=fmt)
    ref = adata.copy()
    pca = adata.obsm["X_pca"]

    assert anndata_to_GPU(adata) is None
    assert isinstance(adata.X, cupy.ndarray | cpsparse.csr_matrix | cpsparse.csc_matrix)
    # layers untouched unless asked; obs/var/obsm/obsp/uns stay on the host
    assert isinstance(adata.layers["counts"], sparse.csr_matrix)
    assert isinstance(adata.layers["dense"], np.ndarray)
    assert adata.obsm["X_pca"] is pca
    assert isinstance(adata.obsp["distances"], sparse.csr_matrix)
    assert isinstance(adata.obs, pd.DataFrame)

    anndata_to_CPU(adata)
    if fmt == "dense":
        assert adata.X.tobytes() == ref.X.tobytes()
    else:
        _assert_same_sparse(adata.X, ref.X)


@pytest.mark.gpu
def test_anndata_layer_and_convert_all():
    import cupy
    from cupyx.scipy import sparse as cpsparse

    adata = _make_adata()
    ref = adata.copy()

    anndata_to_GPU(adata, layer="counts")
    assert isinstance(adata.layers["counts"], cpsparse.csr_matrix)
    assert isinstance(adata.X, sparse.csr_matrix)

    anndata_to_GPU(adata, convert_all=True)
    assert isinstance(adata.X, cpsparse.csr_matrix)
    assert isinstance(adata.layers["dense"], cupy.ndarray)
    assert isinstance(adata.obsm["X_pca"], np.ndarray)

    anndata_to_CPU(adata, convert_all=True)
    _assert_same_sparse(adata.X, ref.X)
    _assert_same_sparse(adata.layers["counts"], ref.layers["counts"])
    assert adata.layers["dense"].tobytes() == ref.layers["dense"].tobytes()


@pytest.mark.gpu
def test_anndata_copy_leaves_input_untouched():
    import cupy
    from cupyx.scipy import sparse as cpsparse

    adata = _make_adata()
    before = _snapshot(adata)
    x_before = adata.X.copy()

    out = anndata_to_GPU(adata, convert_all=True, copy=True)
    assert _snapshot(adata) == before
    assert isinstance(adata.X, sparse.csr_matrix)
    _assert_same_sparse(adata.X, x_before)
    assert isinstance(out.X, cpsparse.csr_matrix)
    assert isinstance(out.layers["dense"], cupy.ndarray)
    assert isinstance(out.obsm["X_pca"], np.ndarray)
    assert not np.shares_memory(out.obsm["X_pca"], adata.obsm["X_pca"])

    # copy=True from device: the device input stays on the device, unchanged
    back = anndata_to_CPU(out, layer="counts", copy=True)
    assert isinstance(out.layers["counts"], cpsparse.csr_matrix)
    assert isinstance(back.layers["counts"], sparse.csr_matrix)
    # X was not moved, so the copy holds its own device copy of it
    assert isinstance(back.X, cpsparse.csr_matrix)
    assert back.X.data.data.ptr != out.X.data.data.ptr
