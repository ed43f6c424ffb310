"""Every kernel family compiles with NVRTC for sm_80 and sm_90, without local-memory spills.

No GPU needed: ``cuda.bindings.nvrtc`` (with the nvidia-cuda-nvrtc wheel) compiles to
cubin and ``-Xptxas=-v`` makes ptxas report each function's spill stores and loads. The
source is what the loader hands CuPy (``kernel_source``), and the instantiations are the
ones the launchers ask for (``gpusc._kernels.<family>.NAME_EXPRESSIONS``).
"""

from __future__ import annotations

import importlib
import re
import sys
import types

import pytest
from cuda.bindings import nvrtc

from gpusc._core import cuda

ARCHS = ["sm_80", "sm_90"]

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"', re.MULTILINE)
_FUNCTION = re.compile(r"Function properties for (\S+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _families() -> list[str]:
    try:
        return cuda.kernel_files()
    except FileNotFoundError:
        return []


def _check(result) -> None:
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC call failed: {nvrtc.nvrtcGetErrorString(err)[1].decode()}")


def compile_family(source: str, filename: str, expressions, options) -> tuple[str, dict[str, str]]:
    """Compile like CuPy's RawModule does; returns ptxas' log and expression -> lowered name."""
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], [])
    _check(err)
    try:
        for expr in expressions:
            _check(nvrtc.nvrtcAddNameExpression(prog, expr.encode()))
        opts = [o.encode() for o in options]
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check(err)
        buf = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(prog, buf))
        log = buf.rstrip(b"\x00").decode(errors="replace")
        assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS, (
            f"{filename} failed to compile with {' '.join(options)}:\n{log}"
        )
        lowered = {}
        for expr in expressions:
            err, name = nvrtc.nvrtcGetLoweredName(prog, expr.encode())
            assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS and name, (
                f"{filename}: no lowered name for name expression {expr!r} ({err.name})"
            )
            lowered[expr] = name.decode()
        return log, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def spills(log: str) -> dict[str, tuple[int, int]]:
    """Mangled function name -> (spill store bytes, spill load bytes), from ptxas -v."""
    out, current = {}, None
    for line in log.splitlines():
        if m := _FUNCTION.search(line):
            current = m.group(1)
        elif (m := _SPILLS.search(line)) and current is not None:
            out[current] = (int(m.group(1)), int(m.group(2)))
            current = None
    return out


def check_family(family: str, arch: str, extra_options=()) -> None:
    source = cuda.kernel_source(family)
    assert source.startswith(f'#line 1 "kernels/{family}.cu"\n'), (
        f"kernel_source({family!r}) must start with a #line directive naming kernels/{family}.cu"
    )
    left = [line.strip() for line in source.splitlines() if _LOCAL_INCLUDE.match(line)]
    assert not left, f"kernel_source({family!r}) still has local includes (not inlined): {left}"

    try:
        launcher = importlib.import_module(f"gpusc._kernels.{family}")
    except ModuleNotFoundError as exc:
        raise AssertionError(
            f"kernels/{family}.cu has no launcher module gpusc._kernels.{family} "
            "(it must define NAME_EXPRESSIONS)"
        ) from exc
    expressions = tuple(launcher.NAME_EXPRESSIONS)
    assert expressions, f"gpusc._kernels.{family}.NAME_EXPRESSIONS is empty"
    options = (*cuda.NVRTC_OPTIONS, f"-arch={arch}", "-Xptxas=-v", *extra_options)
    log, lowered = compile_family(source, f"{family}.cu", expressions, options)

    found = spills(log)
    missing = [e for e, name in lowered.items() if name not in found]
    assert not missing, f"ptxas -v reported nothing for {missing}; log:\n{log}"
    by_name = {name: expr for expr, name in lowered.items()}
    spilling = [
        f"{by_name.get(name, name)} ({name}): {st} bytes spill stores, {ld} bytes spill loads"
        for name, (st, ld) in found.items()
        if st or ld
    ]
    assert not spilling, f"{family}.cu on {arch} spills to local memory:\n" + "\n".join(spilling)


def test_kernel_families_exist():
    assert _families(), f"no kernels/*.cu found in {cuda.kernel_dir()}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", _families())
def test_kernel_compiles_without_spills(family, arch):
    check_family(family, arch)


# The checker itself, on kernels of our own: it passes a clean one and fails a spilling one.

_COMMON = """\
#pragma once
// sum over a warp; every lane gets the total
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
"""

_CLEAN = """\
#include "_common.cuh"

// one warp per row; lanes stride the row's non-zeros
template <typename T, typename I>
__global__ void row_sums(const T* data, const I* indptr, I n_rows, double* out) {
  long long row = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
  int lane = threadIdx.x % 32;
  if (row >= n_rows) return;
  double s = 0;
  for (I j = indptr[row] + lane; j < indptr[row + 1]; j += 32) s += (double)data[j];
  s = warp_sum(s);
  if (lane == 0) out[row] = s;
}
"""

# 64 accumulators live across the loop: far more than 32 registers hold
_SPILLING = """\
// one thread per output; acc[] stays live across the loop
template <typename T>
__global__ void many_live(const T* __restrict__ x, T* __restrict__ y, int n) {
  T acc[64];
#pragma unroll
  for (int j = 0; j < 64; ++j) acc[j] = x[j * n + threadIdx.x];
  for (int it = 0; it < n; ++it) {
#pragma unroll
    for (int j = 0; j < 64; ++j) acc[j] = acc[j] * acc[(j + 1) & 63] + x[it];
  }
  T s = 0;
#pragma unroll
  for (int j = 0; j < 64; ++j) s += acc[j] * (j + 1);
  y[threadIdx.x] = s;
}
"""


@pytest.fixture
def toy_kernels(tmp_path, monkeypatch):
    """A kernels/ directory of our own, with launcher modules naming their instantiations."""
    (tmp_path / "_common.cuh").write_text(_COMMON)
    (tmp_path / "toy_clean.cu").write_text(_CLEAN)
    (tmp_path / "toy_spill.cu").write_text(_SPILLING)
    monkeypatch.setattr(cuda, "kernel_dir", lambda: tmp_path)
    names = {
        "toy_clean": cuda.name_expressions(("row_sums",)),
        "toy_spill": ("many_live<float>", "many_live<double>"),
    }
    for family, exprs in names.items():
        mod = types.ModuleType(f"gpusc._kernels.{family}")
        mod.NAME_EXPRESSIONS = exprs
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    cuda.kernel_source.cache_clear()  # kernel_source caches by family name
    yield tmp_path
    cuda.kernel_source.cache_clear()


@pytest.mark.parametrize("arch", ARCHS)
def test_checker_passes_clean_kernel(toy_kernels, arch):
    assert cuda.kernel_files() == ["toy_clean", "toy_spill"]
    check_family("toy_clean", arch)
    assert "warp_sum" in cuda.kernel_source("toy_clean")  # the header was inlined


def test_checker_fails_spilling_kernel(toy_kernels):
    with pytest.raises(AssertionError, match=r"many_live<float> \(_Z\w+\): [1-9]\d* bytes spill"):
        check_family("toy_spill", "sm_80", extra_options=("--maxrregcount=32",))


def test_checker_fails_leftover_include(toy_kernels, monkeypatch):
    source = '#line 1 "kernels/toy_clean.cu"\n' + _CLEAN
    with monkeypatch.context() as m, pytest.raises(AssertionError, match="local includes"):
        m.setattr(cuda, "kernel_source", lambda family: source)
        check_family("toy_clean", "sm_80")


def test_checker_reports_compile_errors(toy_kernels):
    (toy_kernels / "toy_clean.cu").write_text(_CLEAN.replace("s = warp_sum(s);", "s = warp_sum(s)"))
    with pytest.raises(AssertionError, match=r"kernels/toy_clean\.cu\(\d+\): error"):
        check_family("toy_clean", "sm_80")
