"""The main job out of core (``gpusc run INPUT --chunk-size N``): X read lazily in row chunks
with anndata's own reader, and the steps computed on a dask.distributed cluster.

Only X is lazy: obs, var, obsm, varm and uns are small and read as they are; layers and
raw are not read (the pipeline starts from the counts in X).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

# elements read into memory besides the lazy X (anndata's own encoding)
_IN_MEMORY = ("obs", "var", "obsm", "varm", "uns")


def read_lazy(path: Path, chunk_size: int):
    """An AnnData whose X is a dask array of ``chunk_size`` rows per chunk
    (``anndata.experimental.read_elem_lazy``), from an .h5ad file or a .zarr store.

    The store stays where it is: each chunk is read when a task needs it (an .h5ad file is
    opened by each task, so the file handle used here is closed again).
    """
    import anndata as ad
    from anndata.experimental import read_elem_lazy

    if path.suffix == ".h5ad" and path.is_file():
        import h5py

        store = h5py.File(path, "r")
    else:
        import zarr

        store = zarr.open_group(path, mode="r")
    try:
        if "X" not in store:
            raise ValueError(f"{path} has no X")
        encoding = store["X"].attrs.get("encoding-type", "array")
        if encoding == "csc_matrix":
            raise ValueError(f"{path}: X is stored as CSC; out of core needs rows (CSR or dense): "
                             "convert it once with anndata (adata.X = adata.X.tocsr())")
        n_vars = store["X"].attrs["shape"][1] if "shape" in store["X"].attrs else store["X"].shape[1]
        x = read_elem_lazy(store["X"], chunks=(chunk_size, int(n_vars)))
        parts = {key: ad.io.read_elem(store[key]) for key in _IN_MEMORY if key in store}
    finally:
        if hasattr(store, "close"):
            store.close()
    return ad.AnnData(X=x, **parts)


@contextmanager
def cluster(gpus: int | None, memory_limit: str | None):
    """A dask.distributed cluster and its client for the run: a LocalCluster with one
    single-threaded worker per core, or with ``gpus`` a dask-cuda LocalCUDACluster of that
    many GPUs (one worker each, an RMM pool: :func:`gpusc.memory.local_cuda_cluster`).
    ``memory_limit`` (say "6GiB") is the workers' limit in all, shared equally."""
    from dask.utils import parse_bytes
    from distributed import Client, LocalCluster

    if gpus:
        from . import memory

        n_workers = gpus
        kwargs = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}
    else:
        n_workers = os.cpu_count() or 1
        kwargs = {"n_workers": n_workers, "threads_per_worker": 1}
    if memory_limit is not None:
        kwargs["memory_limit"] = parse_bytes(memory_limit) // n_workers
    started = memory.local_cuda_cluster("pool", **kwargs) if gpus else LocalCluster(**kwargs)
    with started, Client(started) as client:
        yield client
