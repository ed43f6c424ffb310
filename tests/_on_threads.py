"""Kernels of ``kernels/<family>.cu`` run as written on the CPU, for machines without a GPU.

:func:`build` compiles a family's source with g++ against ``tests/cuda_on_threads.h``
(each CUDA thread a std::thread, mma.sync from the PTX fragment layouts) into a shared
library with one launcher per name expression of the family, and returns stand-ins for
CuPy's RawKernel: ``kernel(grid, block, args, shared_mem=0)`` with the same arguments a
launcher in ``gpusc._kernels`` passes to the real one. What this checks is the kernels'
logic (indexing, barriers, warp votes and shuffles, atomics, races, the copy pipeline),
not the hardware or NVRTC: those are test_kernels_compile.py's and the GPU-marked tests'.
"""

from __future__ import annotations

import ctypes
import importlib
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

from gpusc._core import cuda

_LAUNCH = r"""
#include <thread>
#include <type_traits>
#include <utility>

// Blocks one after another on one pool of threads, a barrier between blocks.
template <class Body>
static int run_grid(long long gx, long long gy, unsigned bx, unsigned by, Body body) {
    const unsigned threads = bx * by;
    blockDim = {bx, by, 1};
    gridDim = {(unsigned)gx, (unsigned)gy, 1};
    block_barrier = std::make_unique<std::barrier<>>(threads);
    warps.clear();
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
    std::barrier<> between(threads);
    std::atomic<int> left_copies{0};
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            threadIdx = {t % bx, t / bx, 0};
            for (long long b = 0; b < gx * gy; ++b) {
                blockIdx = {(unsigned)(b % gx), (unsigned)(b / gx), 0};
                if (t == 0) std::memset(dynamic_smem, 0xff, sizeof dynamic_smem);  // garbage to start
                between.arrive_and_wait();
                copy_groups = {{}};
                body();
                left_copies += copy_groups.size() != 1 || !copy_groups.back().empty();
                between.arrive_and_wait();  // every thread is done with the block
            }
        });
    for (auto& th : pool) th.join();
    return left_copies ? 3 : 0;  // 3: a copy was queued and never waited for
}

// The kernel's parameter types, from its own signature, read out of the argument cells.
template <class... P, std::size_t... I>
static void call_with(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}

template <class... P>
static int launch(void (*kernel)(P...), void** args, long long gx, long long gy, unsigned bx, unsigned by,
                  int early) {
    copies_land_early = early;
    return run_grid(gx, gy, bx, by, [&] { call_with(kernel, args, std::index_sequence_for<P...>{}); });
}
"""

_CELLS = {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.uint64: ctypes.c_ulonglong,
          np.uint32: ctypes.c_uint, np.float64: ctypes.c_double, np.float32: ctypes.c_float}


def _cell(value):
    """A ctypes cell holding one kernel argument as the kernel's parameter reads it."""
    if isinstance(value, np.ndarray):
        return ctypes.c_void_p(value.ctypes.data)
    if isinstance(value, np.uintp):  # a null (or raw) pointer
        return ctypes.c_void_p(int(value) or None)
    return _CELLS[type(value)](value.item())


class Kernel:
    """Stand-in for a RawKernel; ``copies="early"`` lands cp.async copies when issued."""

    def __init__(self, function):
        self.function, self.copies = function, "late"
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, shared_mem=0):
        gx, gy = (tuple(grid) + (1,))[:2]
        bx, by = (tuple(block) + (1,))[:2]
        assert shared_mem <= 256 * 1024, "cuda_on_threads.h's dynamic_smem is 256 KiB"
        cells = [_cell(a) for a in args]
        pointers = (ctypes.c_void_p * len(cells))(*(ctypes.addressof(c) for c in cells))
        status = self.function(pointers, ctypes.c_longlong(gx), ctypes.c_longlong(gy), ctypes.c_uint(bx),
                               ctypes.c_uint(by), ctypes.c_int(self.copies == "early"))
        assert status == 0, f"kernel on threads returned {status}"


def build(family: str, where: Path) -> dict[str, Kernel]:
    """Name expression -> stand-in, for every name expression of ``gpusc._kernels.<family>``."""
    compiler = shutil.which("g++")
    assert compiler, "g++ is needed to run the kernels on the CPU"
    source = cuda.kernel_source(family)
    # an extern __shared__ array is the block's dynamic shared memory
    source = re.sub(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];",
                    r"unsigned char* \1 = dynamic_smem;", source)
    names = importlib.import_module(f"gpusc._kernels.{family}").NAME_EXPRESSIONS
    launchers = "".join(
        f'extern "C" int launch_{i}(void** a, long long gx, long long gy, unsigned bx, unsigned by, int early) '
        f"{{ return launch(&{name}, a, gx, gy, bx, by, early); }}\n" for i, name in enumerate(names))
    (where / f"{family}.cpp").write_text('#include "cuda_on_threads.h"\n' + source + _LAUNCH + launchers)
    library = where / f"{family}.so"
    done = subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas",
                           f"-I{Path(__file__).parent}", str(where / f"{family}.cpp"), "-o", str(library)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lib = ctypes.CDLL(str(library))
    return {name: Kernel(lib[f"launch_{i}"]) for i, name in enumerate(names)}


class DeviceArray(np.ndarray):
    """A NumPy array with CuPy's ``get()``: what :func:`numpy_as_cupy`'s functions return."""

    def get(self):
        return np.asarray(self)


def numpy_as_cupy(monkeypatch, shared_memory_optin: int = 232448):
    """Install a ``cupy`` module whose array makers are NumPy's (returning DeviceArray), so a
    device launcher runs its own code on the host; its kernels are the tests' to stand in.
    ``cupyx.scipy.sparse`` is SciPy's, its CSR matrices given CuPy's ``get()``.
    Returns the module; ``cupy.cuda.Device().attributes`` holds the shared-memory limit."""
    from scipy import sparse

    fake = types.ModuleType("cupy")
    for name in ("asarray", "zeros", "full", "empty", "arange", "flatnonzero", "sqrt", "where",
                 "ascontiguousarray", "repeat"):
        make = getattr(np, name)
        setattr(fake, name, lambda *a, make=make, **k: np.asarray(make(*a, **k)).view(DeviceArray))
    device = types.SimpleNamespace(attributes={"MaxSharedMemoryPerBlockOptin": shared_memory_optin})
    fake.cuda = types.SimpleNamespace(Device=lambda: device)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    fake_sparse = types.ModuleType("cupyx.scipy.sparse")
    fake_sparse.coo_matrix, fake_sparse.csr_matrix = sparse.coo_matrix, sparse.csr_matrix
    fake_scipy = types.ModuleType("cupyx.scipy")
    fake_scipy.sparse = fake_sparse
    fake_cupyx = types.ModuleType("cupyx")
    fake_cupyx.scipy = fake_scipy
    for name, module in (("cupyx", fake_cupyx), ("cupyx.scipy", fake_scipy), ("cupyx.scipy.sparse", fake_sparse)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sparse.csr_matrix, "get", lambda self: self, raising=False)
    return fake


def launchers_on_threads(monkeypatch, built: dict[str, dict[str, Kernel]]) -> dict[str, tuple]:
    """Make ``gpusc._core.cuda.get_kernel`` hand out the stand-ins of ``built`` (family ->
    :func:`build`'s result), so that a launcher's own get_kernel and launch calls run the
    kernels on threads. Returns name -> the arguments of its latest launch."""
    launched = {}

    def get_kernel(family, names, name):
        assert name in names, f"{name} is not among {family}'s name expressions"

        def launch(grid, block, args, shared_mem=0):
            launched[name] = args
            built[family][name](grid, block, args, shared_mem=shared_mem)
        return launch

    monkeypatch.setattr(cuda, "get_kernel", get_kernel)
    return launched
