"""The RawModule loader: one place that turns ``kernels/<family>.cu`` into CuPy kernels.

The sources live in ``kernels/`` at the repository root (editable install) and in
``gpusc/kernels/`` inside the wheel; :func:`kernel_dir` finds either. Includes are
inlined so that editing a header changes CuPy's cache key, and a ``#line`` directive
makes compiler errors point at the file.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import numpy as np

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)".*$', re.MULTILINE)

# Scalar types as the kernels' C++ templates spell them.
CTYPE = {
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
    np.dtype(np.int32): "int",
    np.dtype(np.int64): "long long",
}


def kernel_dir() -> Path:
    here = Path(__file__).resolve().parent.parent  # .../gpusc
    for candidate in (here / "kernels", here.parent.parent / "kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"gpusc's CUDA sources were not found next to {here}; reinstall gpusc "
        "(the wheel ships them in gpusc/kernels)"
    )


def kernel_files() -> list[str]:
    """Every kernel family that ships: the ``*.cu`` files."""
    return sorted(p.stem for p in kernel_dir().glob("*.cu"))


def _inline(path: Path, seen: set[Path]) -> str:
    text = path.read_text()

    def include(match: re.Match) -> str:
        header = (path.parent / match.group(1)).resolve()
        if header in seen:
            return ""
        seen.add(header)
        resume = text.count("\n", 0, match.start()) + 2  # the line after the #include
        return (f'#line 1 "kernels/{header.name}"\n{_inline(header, seen)}\n'
                f'#line {resume} "kernels/{path.name}"')

    return _INCLUDE.sub(include, text)


@cache
def kernel_source(family: str) -> str:
    """The self-contained source of ``kernels/<family>.cu`` as NVRTC compiles it."""
    path = kernel_dir() / f"{family}.cu"
    return f'#line 1 "kernels/{path.name}"\n' + _inline(path, set())


def template_name(kernel: str, *dtypes) -> str:
    """``row_stats_csr<float, int>`` from a kernel name and numpy dtypes."""
    return f"{kernel}<{', '.join(CTYPE[np.dtype(d)] for d in dtypes)}>"


# Every instantiation a family may need, so one RawModule per family compiles once.
def name_expressions(kernels: tuple[str, ...], value_types=(np.float32, np.float64),
                     index_types=(np.int32, np.int64)) -> tuple[str, ...]:
    return tuple(
        template_name(k, v, i) for k in kernels for v in value_types for i in index_types
    )


NVRTC_OPTIONS = ("--std=c++17",)


@cache
def module(family: str, names: tuple[str, ...]):
    import cupy

    return cupy.RawModule(
        code=kernel_source(family), options=NVRTC_OPTIONS, name_expressions=names
    )


def get_kernel(family: str, names: tuple[str, ...], name: str):
    return module(family, names).get_function(name)


def launch(kernel, grid: int, block: int, args: tuple, shared_mem: int = 0) -> None:
    """Launch on CuPy's current stream; ``args`` must already hold exact dtypes.

    No blocks, no launch: a kernel of one block per row or per tile has nothing to do for an
    empty input (an empty dask chunk), and a block launched anyway reads and writes past its
    empty arrays (an illegal address on the H200 with a 0-row int64 CSR chunk)."""
    if int(grid) <= 0:
        return
    kernel((int(grid),), (int(block),), args, shared_mem=shared_mem)
