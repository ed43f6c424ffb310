"""gpusc: scanpy on the GPU.

``import gpusc as rsc`` then ``rsc.get.anndata_to_GPU(adata)`` and the usual
``rsc.pp.*`` calls. Importing this package needs no GPU and imports none of the
optional RAPIDS libraries; CuPy is imported only when it is installed.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["datasets", "experimental", "get", "memory", "pp", "settings", "tl"]


def __getattr__(name: str):
    # Submodules load on first use so `import gpusc` stays light (no numba compile,
    # no scanpy import) until a function is called.
    if name == "settings":
        return import_module("._settings", __name__).settings
    if name in __all__:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gpusc' has no attribute {name!r}")
