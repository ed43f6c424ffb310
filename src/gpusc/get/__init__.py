"""Moving data between host and device: ``X_to_GPU``, ``X_to_CPU``, ``anndata_to_GPU``, ``anndata_to_CPU``;
and ``aggregate`` (scanpy's get.aggregate).

Importing this module needs neither CuPy nor a GPU; CuPy is imported when a matrix
is moved to the device.
"""

from __future__ import annotations

from ._aggregate import aggregate
from ._transfer import X_to_CPU, X_to_GPU, anndata_to_CPU, anndata_to_GPU

__all__ = ["X_to_CPU", "X_to_GPU", "aggregate", "anndata_to_CPU", "anndata_to_GPU"]
