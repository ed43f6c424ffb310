"""Device memory set-up: RMM with exactly one of a pool or managed memory.

``gpusc.memory.configure("pool")`` before the first large allocation makes every
CuPy allocation (ours, cupyx's, and cuVS/cuML's through RMM) come from one RMM
memory pool; ``configure("managed")`` uses CUDA managed (unified) memory instead, so a
matrix somewhat larger than the card can still be processed. ``status()`` reports
what is configured and how much is in use. ``local_cuda_cluster("pool")`` (or
``"managed"``) starts a dask-cuda cluster, one worker per GPU, whose workers are set up
by the same rule.

Importing this module needs neither CuPy, RMM nor dask-cuda; they are imported when a
function is called.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from numbers import Integral
from typing import Literal

__all__ = ["configure", "local_cuda_cluster", "status"]

Mode = Literal["pool", "managed"]
_MODES = ("pool", "managed")

# Share of free device memory a pool starts with when no initial size is given:
# leaves room for the CUDA context, cuBLAS/cuSPARSE workspaces and other processes.
POOL_FRACTION = 0.8
# RMM's pool requires sizes that are multiples of its 256-byte allocation alignment.
_ALIGNMENT = 256

_INSTALL_HINT = "pip install 'gpusc[cu13]' (CUDA 13) or pip install 'gpusc[cu12]' (CUDA 12)"


def _check_size(name: str, value) -> int | None:
    if value is None:
        return None
    # bool is an int subclass; True as a size is a mistake, not one byte.
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        msg = f"{name} must be a positive int (bytes) or None, got {value!r}"
        raise ValueError(msg)
    return int(value)


def _align_up(nbytes: int) -> int:
    return -(-nbytes // _ALIGNMENT) * _ALIGNMENT


def _align_down(nbytes: int) -> int:
    return nbytes // _ALIGNMENT * _ALIGNMENT


def _is_device_id(d) -> bool:
    return isinstance(d, Integral) and not isinstance(d, bool) and d >= 0


def _check_devices(devices) -> list[int]:
    if _is_device_id(devices):
        ids = [int(devices)]
    elif isinstance(devices, Sequence) and not isinstance(devices, str | bytes) and len(devices) > 0:
        ids = list(devices)
    else:
        ids = None
    if ids is None or not all(_is_device_id(d) for d in ids) or len(set(ids)) != len(ids):
        msg = f"devices must be a device id (int >= 0) or a non-empty list of distinct ids, got {devices!r}"
        raise ValueError(msg)
    return [int(d) for d in ids]


def _import_gpu_stack(need_rmm: bool = True):
    """cupy (and rmm), with an error that names what is missing and how to install it."""
    missing = []
    try:
        import cupy
    except ImportError:
        cupy = None
        missing.append("cupy")
    rmm = None
    if need_rmm:
        try:
            import rmm
            import rmm.allocators.cupy  # noqa: F401 (the allocator bridge we install)
            import rmm.statistics  # noqa: F401
        except ImportError:
            missing.append("rmm")
    if missing:
        msg = f"gpusc.memory needs {' and '.join(missing)}, which could not be imported; install with {_INSTALL_HINT}"
        raise ImportError(msg)
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, no device
        msg = f"no CUDA device is usable ({e}); gpusc.memory needs an NVIDIA GPU with a working driver"
        raise RuntimeError(msg) from e
    if n_devices == 0:
        msg = "no CUDA device is visible (check CUDA_VISIBLE_DEVICES); gpusc.memory needs an NVIDIA GPU"
        raise RuntimeError(msg)
    return cupy, rmm, n_devices


def _free_bytes(cupy, device: int) -> int:
    with cupy.cuda.Device(device):
        free, _total = cupy.cuda.runtime.memGetInfo()
    return int(free)


def _base_resource(mr):
    """The resource under any adaptors (statistics, logging, ...) RMM stacked on top."""
    import rmm

    while isinstance(mr, rmm.mr.UpstreamResourceAdaptor) and not isinstance(mr, rmm.mr.PoolMemoryResource):
        mr = mr.get_upstream()
    return mr


def _check_mode(mode, initial_pool_size, maximum_pool_size) -> tuple[int | None, int | None]:
    """The one rule of :func:`configure` and :func:`local_cuda_cluster`: exactly one of pool
    or managed memory, sizes for a pool only. Returns the sizes as ints (or None)."""
    if mode not in _MODES:
        msg = (
            f"mode must be exactly one of 'pool' or 'managed', got {mode!r}. gpusc does not mix "
            "them: a pool carves a fixed arena out of device memory while managed pages migrate "
            "and oversubscribe, so stacking one on the other fragments the device memory and "
            "defeats both. Use 'pool' when the data fit on the card, 'managed' when they do not."
        )
        raise ValueError(msg)
    initial_pool_size = _check_size("initial_pool_size", initial_pool_size)
    maximum_pool_size = _check_size("maximum_pool_size", maximum_pool_size)
    if mode == "managed" and (initial_pool_size is not None or maximum_pool_size is not None):
        msg = "initial_pool_size and maximum_pool_size apply to mode='pool' only; managed memory has no pool"
        raise ValueError(msg)
    if initial_pool_size is not None and maximum_pool_size is not None and initial_pool_size > maximum_pool_size:
        msg = f"initial_pool_size ({initial_pool_size}) is larger than maximum_pool_size ({maximum_pool_size})"
        raise ValueError(msg)
    return initial_pool_size, maximum_pool_size


def configure(
    mode: Mode,
    *,
    initial_pool_size: int | None = None,
    maximum_pool_size: int | None = None,
    devices: int | Sequence[int] = 0,
) -> None:
    """Set up RMM with a memory pool or with managed memory, and route CuPy through it.

    Exactly one of the two: a pool over managed memory, or managed allocations next to
    a pool, fragment the device memory (the pool carves a fixed arena, managed pages
    migrate and oversubscribe; stacking them defeats both).

    Parameters
    ----------
    mode
        ``"pool"``: an RMM pool (``PoolMemoryResource`` over ``cudaMalloc``). Allocation
        and release are cheap sub-allocations of one arena, which is what the many
        temporaries of a preprocessing pipeline need.
        ``"managed"``: CUDA managed memory (``cudaMallocManaged``) without a pool. Pages
        migrate between host and device on demand, so a working set somewhat larger
        than the card still runs, slower. Never oversubscribe beyond what the card can
        page: a working set far beyond device memory thrashes (every kernel waits on
        page migration) and host memory must hold the overflow.
    initial_pool_size
        Bytes the pool starts with (``"pool"`` only). Default: 80 % of the free memory
        of the (smallest) configured device, measured after CuPy's cached free blocks
        and any previous RMM pool are released, rounded down to a multiple of 256 bytes.
        A given size is rounded up to a multiple of 256 bytes, as RMM requires.
    maximum_pool_size
        Bytes the pool may grow to (``"pool"`` only). Default: RMM's (all device memory).
        Rounded up to a multiple of 256 bytes.
    devices
        Device id, or list of ids, to configure. Default ``0``.

    Raises
    ------
    ValueError
        ``mode`` is not ``"pool"`` or ``"managed"``, a size is not a positive int,
        ``initial_pool_size > maximum_pool_size``, sizes are given with
        ``mode="managed"``, or ``devices`` is not an id or a list of distinct ids.
        Arguments are checked before CuPy or RMM are imported.
    ImportError
        CuPy or RMM is not installed (the message gives the pip command).
    RuntimeError
        No CUDA device is usable, or a device id does not exist.

    Warns
    -----
    UserWarning
        CuPy's default pool already holds allocations: those arrays stay outside RMM
        (and outside its statistics) until they are freed.

    Notes
    -----
    Calls ``rmm.reinitialize(pool_allocator=..., managed_memory=..., ...)``, pushes an
    ``rmm.mr.StatisticsResourceAdaptor`` on each configured device (so :func:`status`
    can report bytes in use) and installs ``rmm.allocators.cupy.rmm_cupy_allocator`` with
    ``cupy.cuda.set_allocator``. Call it before creating device arrays: memory
    allocated under a previous RMM configuration must not be used afterwards (RMM's
    rule for ``reinitialize``).
    """
    initial_pool_size, maximum_pool_size = _check_mode(mode, initial_pool_size, maximum_pool_size)
    device_ids = _check_devices(devices)

    cupy, rmm, n_devices = _import_gpu_stack()
    if bad := [d for d in device_ids if d >= n_devices]:
        msg = f"devices {bad} do not exist; {n_devices} CUDA device(s) visible (ids 0..{n_devices - 1})"
        raise RuntimeError(msg)

    default_pool = cupy.get_default_memory_pool()
    held = 0
    for d in device_ids:
        with cupy.cuda.Device(d):
            # Cached but unused blocks go back to the device; blocks in use cannot.
            default_pool.free_all_blocks()
            held += default_pool.used_bytes()
    if held > 0:
        warnings.warn(
            f"CuPy's default memory pool holds {held:,} bytes of live arrays created before "
            "gpusc.memory.configure(); they stay outside RMM (and its statistics) until freed. "
            "Call configure() before creating device arrays.",
            UserWarning,
            stacklevel=2,
        )

    if mode == "pool":
        if initial_pool_size is None:
            # Drop a previous RMM pool first so its arena counts as free.
            rmm.reinitialize(devices=device_ids)
            free = min(_free_bytes(cupy, d) for d in device_ids)
            initial_pool_size = _align_down(int(free * POOL_FRACTION))
            if maximum_pool_size is not None:
                initial_pool_size = min(initial_pool_size, _align_down(maximum_pool_size))
        else:
            initial_pool_size = _align_up(initial_pool_size)
        if maximum_pool_size is not None:
            maximum_pool_size = _align_up(maximum_pool_size)

    rmm.reinitialize(
        pool_allocator=mode == "pool",
        managed_memory=mode == "managed",
        initial_pool_size=initial_pool_size,
        maximum_pool_size=maximum_pool_size,
        devices=device_ids,
    )
    for d in device_ids:
        with cupy.cuda.Device(d):
            rmm.statistics.enable_statistics()
    cupy.cuda.set_allocator(rmm.allocators.cupy.rmm_cupy_allocator)


# LocalCUDACluster arguments that choose the workers' memory resource: local_cuda_cluster
# sets them from `mode` (rmm_async is a third kind, a cudaMallocAsync pool).
_CLUSTER_MEMORY_ARGS = ("rmm_pool_size", "rmm_maximum_pool_size", "rmm_managed_memory", "rmm_async")


def local_cuda_cluster(
    mode: Mode,
    *,
    initial_pool_size: int | None = None,
    maximum_pool_size: int | None = None,
    **cluster_kwargs,
):
    """Start a ``dask_cuda.LocalCUDACluster`` whose workers use an RMM pool or managed memory.

    One worker per visible GPU (dask-cuda's default), each with exactly one of the two
    memory set-ups, by the rule and with the errors of :func:`configure`: a pool
    (``rmm_pool_size``, never over managed memory) or managed memory (``rmm_managed_memory``,
    no pool). CuPy on the workers allocates through RMM (``rmm_allocator_external_lib_list=
    ["cupy"]`` unless given). Connect with ``dask.distributed.Client(cluster)``; the
    dashboard address is ``cluster.dashboard_link``. Close it with ``cluster.close()`` (or use
    it as a context manager).

    Parameters
    ----------
    mode
        ``"pool"`` or ``"managed"``, as in :func:`configure`.
    initial_pool_size
        Bytes each worker's pool starts with (``"pool"`` only), rounded up to a multiple of
        256. Default: ``maximum_pool_size`` when given, else 80 % of each GPU's total memory
        (dask-cuda's fraction form; :func:`configure` takes 80 % of the free memory, which
        only a process on the device can measure).
    maximum_pool_size
        Bytes each worker's pool may grow to (``"pool"`` only). Default: RMM's (all
        device memory).
    **cluster_kwargs
        Passed on to ``LocalCUDACluster`` (``CUDA_VISIBLE_DEVICES``, ``n_workers``,
        ``memory_limit``, ``device_memory_limit``, ...), except the arguments that choose
        the memory resource (``rmm_pool_size``, ``rmm_maximum_pool_size``,
        ``rmm_managed_memory``, ``rmm_async``), which ``mode`` sets.

    Returns
    -------
    dask_cuda.LocalCUDACluster
        The started cluster.

    Raises
    ------
    ValueError
        As :func:`configure`: ``mode`` not ``"pool"`` or ``"managed"``, bad sizes, sizes
        with ``"managed"``; and a memory-resource argument in ``cluster_kwargs``. Checked
        before dask-cuda is imported.
    ImportError
        dask-cuda is not installed (the message gives the pip command).
    """
    initial_pool_size, maximum_pool_size = _check_mode(mode, initial_pool_size, maximum_pool_size)
    if taken := [k for k in _CLUSTER_MEMORY_ARGS if k in cluster_kwargs]:
        msg = (f"local_cuda_cluster sets {', '.join(taken)} from mode={mode!r} (exactly one of a pool "
               "or managed memory); pass mode, initial_pool_size and maximum_pool_size instead")
        raise ValueError(msg)
    try:
        import dask_cuda
    except ImportError as e:
        msg = (f"gpusc.memory.local_cuda_cluster needs dask-cuda, which could not be imported ({e}); "
               "install with pip install 'gpusc[rapids-cu13]' (CUDA 13) or 'gpusc[rapids-cu12]' (CUDA 12)")
        raise ImportError(msg) from e
    if mode == "pool":
        initial = initial_pool_size or maximum_pool_size
        memory = {
            "rmm_pool_size": POOL_FRACTION if initial is None else _align_up(initial),
            "rmm_maximum_pool_size": None if maximum_pool_size is None else _align_up(maximum_pool_size),
            "rmm_managed_memory": False,
        }
    else:
        memory = {"rmm_pool_size": None, "rmm_maximum_pool_size": None, "rmm_managed_memory": True}
    cluster_kwargs.setdefault("rmm_allocator_external_lib_list", ["cupy"])
    return dask_cuda.LocalCUDACluster(**cluster_kwargs, **memory, rmm_async=False)


def status(device: int | None = None) -> dict:
    """What is configured on a device and how much memory is in use.

    Parameters
    ----------
    device
        Device id; default the current CuPy device.

    Returns
    -------
    dict
        ``mode``: ``"pool"`` or ``"managed"`` when RMM's resource on the device is a pool
        or managed memory, else ``None`` (plain ``cudaMalloc`` or RMM not installed).
        ``used_bytes``: bytes of live allocations: RMM's count (when its statistics are
        enabled, as :func:`configure` does) plus what CuPy's default pool holds; without
        RMM statistics only CuPy's default pool is counted.
        ``free_bytes``, ``total_bytes``: ``cudaMemGetInfo`` for the device (a pool's
        arena counts as used there). ``device``: the device id.

    Raises
    ------
    ImportError
        CuPy is not installed (RMM is optional here).
    RuntimeError
        No CUDA device is usable.
    """
    cupy, _, n_devices = _import_gpu_stack(need_rmm=False)
    if device is None:
        device = cupy.cuda.runtime.getDevice()
    if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < n_devices:
        msg = f"device must be an id in 0..{n_devices - 1}, got {device!r}"
        raise ValueError(msg)

    with cupy.cuda.Device(device):
        free, total = cupy.cuda.runtime.memGetInfo()
        used = int(cupy.get_default_memory_pool().used_bytes())
        mode = None
        try:
            import rmm
            import rmm.statistics
        except ImportError:
            rmm = None
        if rmm is not None:
            top = rmm.mr.get_current_device_resource()
            stats = rmm.statistics.get_statistics()
            if stats is not None:
                used += int(stats.current_bytes)
            base = _base_resource(top)
            if isinstance(base, rmm.mr.PoolMemoryResource):
                mode = "pool"
            elif isinstance(base, rmm.mr.ManagedMemoryResource):
                mode = "managed"
    return {"mode": mode, "used_bytes": used, "free_bytes": int(free), "total_bytes": int(total), "device": device}
