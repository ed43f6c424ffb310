"""gpusc.memory: argument checks everywhere, RMM set-up on a device."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from gpusc import memory

# ---------------------------------------------------------------------------
# CPU: validation happens before cupy/rmm are imported


@pytest.fixture
def no_gpu_stack(monkeypatch):
    """cupy and rmm fail to import, on any machine."""
    for name in ("cupy", "rmm", "rmm.allocators", "rmm.allocators.cupy", "rmm.statistics"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("mode", ["both", "cuda", "pool+managed", "", None, "POOL"])
def test_configure_rejects_other_modes(mode, no_gpu_stack):
    # ValueError (not ImportError) although cupy/rmm are unavailable: checked first.
    with pytest.raises(ValueError, match="exactly one of 'pool' or 'managed'") as info:
        memory.configure(mode)
    assert "fragment" in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_pool_size": 0},
        {"initial_pool_size": -256},
        {"initial_pool_size": 1.5e9},
        {"initial_pool_size": "10GB"},
        {"maximum_pool_size": True},
        {"initial_pool_size": 2**30, "maximum_pool_size": 2**20},
        {"devices": -1},
        {"devices": []},
        {"devices": [0, 0]},
        {"devices": "0"},
        {"devices": [0, 1.0]},
        {"devices": True},
    ],
)
def test_configure_validates_arguments_first(kwargs, no_gpu_stack):
    with pytest.raises(ValueError, match=r"pool_size|devices"):
        memory.configure("pool", **kwargs)


@pytest.mark.parametrize("size", ["initial_pool_size", "maximum_pool_size"])
def test_managed_takes_no_pool_sizes(size, no_gpu_stack):
    with pytest.raises(ValueError, match="mode='pool' only"):
        memory.configure("managed", **{size: 2**30})


@pytest.mark.parametrize("mode", ["pool", "managed"])
def test_configure_without_cupy_or_rmm_names_the_install(mode, no_gpu_stack):
    with pytest.raises(ImportError) as info:
        memory.configure(mode)
    msg = str(info.value)
    assert "cupy" in msg and "rmm" in msg
    assert "pip install 'gpusc[cu13]'" in msg and "gpusc[cu12]" in msg


def test_status_without_cupy_names_the_install(no_gpu_stack):
    with pytest.raises(ImportError, match=r"gpusc\[cu13\]"):
        memory.status()


@pytest.fixture
def stack_without_device(monkeypatch):
    """cupy and rmm import, but the CUDA runtime finds no device."""

    class CUDARuntimeError(RuntimeError):
        pass

    def get_device_count():
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    rmm = types.ModuleType("rmm")
    rmm.allocators = types.ModuleType("rmm.allocators")
    rmm.allocators.cupy = types.ModuleType("rmm.allocators.cupy")
    rmm.statistics = types.ModuleType("rmm.statistics")
    modules = {
        "cupy": cupy,
        "rmm": rmm,
        "rmm.allocators": rmm.allocators,
        "rmm.allocators.cupy": rmm.allocators.cupy,
        "rmm.statistics": rmm.statistics,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_configure_without_device_is_a_clear_runtime_error(stack_without_device):
    with pytest.raises(RuntimeError, match="no CUDA device") as info:
        memory.configure("pool")
    assert "cudaErrorNoDevice" in str(info.value)


def test_status_without_device_is_a_clear_runtime_error(stack_without_device):
    with pytest.raises(RuntimeError, match="no CUDA device"):
        memory.status()


def test_import_needs_no_rmm():
    # Importing gpusc.memory / gpusc.get must not import rmm (nor fail without it).
    code = "import sys, gpusc.memory, gpusc.get; print('rmm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------
# GPU


@pytest.fixture
def fresh_allocators():
    """Start and end with CuPy's own pool and RMM's default resource."""
    import cupy
    import rmm

    def reset():
        cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)
        cupy.get_default_memory_pool().free_all_blocks()
        rmm.reinitialize()

    reset()
    yield
    reset()


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_allocators")
def test_configure_pool_routes_cupy_through_rmm():
    import cupy
    import rmm
    from rmm.allocators.cupy import rmm_cupy_allocator

    memory.configure("pool", initial_pool_size=2**28 + 1)  # rounded up to 256 bytes
    assert cupy.cuda.get_allocator() is rmm_cupy_allocator
    pool = memory._base_resource(rmm.mr.get_current_device_resource())
    assert isinstance(pool, rmm.mr.PoolMemoryResource)
    assert pool.pool_size() >= 2**28 + 256

    before = memory.status()
    assert before["mode"] == "pool"
    assert before["device"] == cupy.cuda.runtime.getDevice()
    assert 0 < before["free_bytes"] < before["total_bytes"]

    x = cupy.ones(2**24, dtype=cupy.float32)  # 64 MiB from the pool
    after = memory.status()
    assert after["used_bytes"] - before["used_bytes"] >= x.nbytes
    assert cupy.get_default_memory_pool().used_bytes() == 0  # nothing went to CuPy's pool
    del x
    assert memory.status()["used_bytes"] == before["used_bytes"]


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_allocators")
def test_configure_pool_default_size_from_free_memory():
    import cupy
    import rmm

    free, _ = cupy.cuda.runtime.memGetInfo()
    memory.configure("pool")
    pool = memory._base_resource(rmm.mr.get_current_device_resource())
    size = pool.pool_size()
    assert size % 256 == 0
    # ~80 % of what was free (the context and other processes may move it a little)
    assert 0.6 * free <= size <= 0.85 * free


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_allocators")
def test_configure_managed():
    import cupy

    memory.configure("managed")
    before = memory.status()
    assert before["mode"] == "managed"
    x = cupy.arange(2**22, dtype=cupy.float64)
    assert memory.status()["used_bytes"] - before["used_bytes"] >= x.nbytes
    assert float(x[-1]) == 2**22 - 1


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_allocators")
def test_configure_warns_about_arrays_already_in_cupys_pool():
    import cupy

    held = cupy.ones(2**20, dtype=cupy.float32)  # allocated by CuPy's default pool
    with pytest.warns(UserWarning, match="outside RMM"):
        memory.configure("pool", initial_pool_size=2**26)
    assert memory.status()["used_bytes"] >= held.nbytes
    del held


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_allocators")
def test_configure_does_not_warn_when_cupys_pool_is_empty(recwarn):
    memory.configure("pool", initial_pool_size=2**26)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning) and "outside RMM" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_allocators")
def test_status_without_configure():
    status = memory.status()
    assert status["mode"] is None
    assert set(status) == {"mode", "used_bytes", "free_bytes", "total_bytes", "device"}
