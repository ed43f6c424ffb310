"""A dask X through gpusc.get (chunk by chunk, lazily) and gpusc.memory.local_cuda_cluster
(issue 11, item 2).

On the CPU a stand-in for cupy (numpy/scipy subclasses that play the device types) shows the
transfer is lazy and chunk-wise with the right meta, and a stand-in dask_cuda module records
the cluster's arguments; GPU-marked tests run the real ones.
"""

from __future__ import annotations

import sys
import types

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from gpusc import memory
from gpusc.get import X_to_CPU, X_to_GPU, _transfer, anndata_to_CPU, anndata_to_GPU
from _dask import as_dask, count_computes, da
from conftest import synthetic_counts


class StandInDeviceArray(np.ndarray):
    """Plays cupy.ndarray: what the stand-in cupy.asarray returns."""


class StandInDeviceCSR(sparse.csr_matrix):
    """Plays cupyx.scipy.sparse.csr_matrix."""


class StandInDeviceCSC(sparse.csc_matrix):
    """Plays cupyx.scipy.sparse.csc_matrix."""


@pytest.fixture
def stand_in_cupy(monkeypatch):
    """gpusc.get's cupy import returns a stand-in that counts the chunks it moves."""
    moved = []

    def asarray(a):
        moved.append(np.shape(a))
        return np.array(a).view(StandInDeviceArray)

    cupy = types.SimpleNamespace(asarray=asarray)
    cpsparse = types.SimpleNamespace(csr_matrix=StandInDeviceCSR, csc_matrix=StandInDeviceCSC)
    monkeypatch.setattr(_transfer, "_import_cupy", lambda: (cupy, cpsparse))
    return moved


def counts():
    return synthetic_counts(40, 45, density=0.3)


@pytest.mark.parametrize(("host", "device_type"), [(np.asarray, StandInDeviceArray),
                                                   (sparse.csr_matrix, StandInDeviceCSR),
                                                   (sparse.csr_array, StandInDeviceCSR)])
@pytest.mark.parametrize("kind", ["uneven", "empty"])
def test_X_to_GPU_moves_dask_chunks_lazily(stand_in_cupy, host, device_type, kind):
    x = as_dask(host(counts()), kind)
    with count_computes() as c:
        moved = X_to_GPU(x)
    assert c.computes == 0
    assert isinstance(moved, da.Array) and moved.chunks == x.chunks
    assert type(moved._meta) is device_type and moved.dtype == x.dtype
    n_meta_moves = len(stand_in_cupy)
    result = [b.compute() for b in moved.to_delayed().ravel()]
    assert all(type(b) is device_type for b in result)
    assert len(stand_in_cupy) > n_meta_moves  # the chunks went through the stand-in, one by one
    np.testing.assert_array_equal(np.vstack([np.asarray(sparse.csr_matrix(b).toarray()) for b in result]),
                                  counts())


def test_X_to_CPU_of_host_chunks_is_the_same_array():
    x = as_dask(sparse.csr_matrix(counts()))
    assert X_to_CPU(x) is x


def test_X_to_GPU_of_integer_sparse_chunks_has_float32_meta(stand_in_cupy):
    moved = X_to_GPU(as_dask(sparse.csr_matrix(counts().astype(np.int64))))
    assert moved.dtype == moved._meta.dtype == np.float32  # cupyx sparse has no integers


def test_anndata_to_GPU_dask_X_lazily(stand_in_cupy):
    x = as_dask(sparse.csr_matrix(counts()))
    adata = ad.AnnData(x, layers={"counts": sparse.csr_matrix(counts())})
    with count_computes() as c:
        copied = anndata_to_GPU(adata, copy=True)
        anndata_to_GPU(adata)
    assert c.computes == 0
    for a in (adata, copied):
        assert isinstance(a.X, da.Array) and type(a.X._meta) is StandInDeviceCSR
        assert type(a.layers["counts"]) is sparse.csr_matrix  # only X was asked for
    assert anndata_to_CPU(adata) is None


def test_dask_of_unsupported_chunks_rejected_before_anything_moves(stand_in_cupy):
    blocks = {("coo", 0, 0): sparse.coo_array(counts())}
    x = da.Array(blocks, "coo", chunks=((40,), (45,)), meta=sparse.coo_array((0, 0)))
    adata = ad.AnnData(as_dask(counts()), layers={"bad": x})
    before = adata.X
    with pytest.raises(TypeError, match=r"chunks of adata.layers\['bad'\] \(a dask array\).*coo_array"):
        anndata_to_GPU(adata, convert_all=True)
    assert adata.X is before and stand_in_cupy == []


@pytest.mark.gpu
def test_dask_round_trip_on_the_device():
    import cupy
    import cupyx.scipy.sparse as cpsparse

    x = as_dask(sparse.csr_matrix(counts()), "empty", index_dtype=np.int64)
    with count_computes() as c:
        on_device = X_to_GPU(x)
        back = X_to_CPU(on_device)
    assert c.computes == 0
    assert isinstance(on_device._meta, cpsparse.csr_matrix)
    chunks = [b.compute() for b in on_device.to_delayed().ravel()]
    assert all(isinstance(b, cpsparse.csr_matrix) and b.indices.dtype == np.int32 for b in chunks)
    assert isinstance(back._meta, sparse.csr_matrix)
    np.testing.assert_array_equal(back.compute().toarray(), counts())
    dense_on_device = X_to_GPU(as_dask(counts()))
    assert isinstance(dense_on_device.compute(), cupy.ndarray)


# ---------------------------------------------------------------- memory.local_cuda_cluster


@pytest.fixture
def stand_in_dask_cuda(monkeypatch):
    """A dask_cuda module whose LocalCUDACluster records its arguments."""
    calls = []

    class LocalCUDACluster:
        def __init__(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=LocalCUDACluster))
    return calls


def test_cluster_pool(stand_in_dask_cuda):
    memory.local_cuda_cluster("pool", n_workers=2)
    memory.local_cuda_cluster("pool", initial_pool_size=2**30 + 1, maximum_pool_size=2**32)
    memory.local_cuda_cluster("pool", maximum_pool_size=2**31, rmm_allocator_external_lib_list=["cupy", "numba"])
    default, sized, maximum_only = stand_in_dask_cuda
    assert default == {"n_workers": 2, "rmm_pool_size": memory.POOL_FRACTION, "rmm_maximum_pool_size": None,
                       "rmm_managed_memory": False, "rmm_async": False, "rmm_allocator_external_lib_list": ["cupy"]}
    assert sized["rmm_pool_size"] == 2**30 + 256 and sized["rmm_maximum_pool_size"] == 2**32  # 256-byte aligned
    assert maximum_only["rmm_pool_size"] == maximum_only["rmm_maximum_pool_size"] == 2**31
    assert maximum_only["rmm_allocator_external_lib_list"] == ["cupy", "numba"]


def test_cluster_managed(stand_in_dask_cuda):
    memory.local_cuda_cluster("managed", CUDA_VISIBLE_DEVICES="0,1")
    (kwargs,) = stand_in_dask_cuda
    assert kwargs["rmm_managed_memory"] is True and kwargs["rmm_pool_size"] is None
    assert kwargs["rmm_async"] is False and kwargs["CUDA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.parametrize(("mode", "kwargs"), [
    ("both", {}),
    (None, {}),
    ("managed", {"initial_pool_size": 2**20}),
    ("pool", {"initial_pool_size": 2**30, "maximum_pool_size": 2**20}),
    ("pool", {"initial_pool_size": -1}),
])
def test_cluster_same_rule_and_error_as_configure(stand_in_dask_cuda, monkeypatch, mode, kwargs):
    for name in ("cupy", "rmm"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError) as configured:
        memory.configure(mode, **kwargs)
    with pytest.raises(ValueError) as clustered:
        memory.local_cuda_cluster(mode, **kwargs)
    assert str(clustered.value) == str(configured.value)
    assert stand_in_dask_cuda == []


@pytest.mark.parametrize("taken", ["rmm_pool_size", "rmm_managed_memory", "rmm_async", "rmm_maximum_pool_size"])
def test_cluster_memory_arguments_come_from_mode(stand_in_dask_cuda, taken):
    with pytest.raises(ValueError, match=f"sets {taken} from mode='pool'"):
        memory.local_cuda_cluster("pool", **{taken: True})
    assert stand_in_dask_cuda == []


def test_cluster_without_dask_cuda_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    with pytest.raises(ImportError, match=r"needs dask-cuda.*pip install 'gpusc\[rapids-cu13\]'"):
        memory.local_cuda_cluster("managed")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["pool", "managed"])
def test_cluster_workers_memory_on_the_device(mode):
    pytest.importorskip("dask_cuda", reason="dask-cuda is an optional extra (rapids-cu13 / rapids-cu12)")
    from dask.distributed import Client

    def worker_resource():
        import rmm

        return type(memory._base_resource(rmm.mr.get_current_device_resource())).__name__

    sizes = {"initial_pool_size": 2**28} if mode == "pool" else {}
    with memory.local_cuda_cluster(mode, n_workers=1, **sizes) as cluster, Client(cluster) as client:
        found = set(client.run(worker_resource).values())
    assert found == {"PoolMemoryResource" if mode == "pool" else "ManagedMemoryResource"}
