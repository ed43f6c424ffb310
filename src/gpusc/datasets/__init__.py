"""Reproducible count matrices: synthetic cells, and new cells drawn from a model of real data.

:func:`synthetic` makes negative-binomial counts with known cell types;
:func:`resample` fits a per-group negative-binomial model to a real counts AnnData and
draws new cells from it (for benchmarks larger than the real data, without copying real
cells). Both return CSR float32 integer counts and are deterministic for a seed.
"""

from __future__ import annotations

from ._resample import resample
from ._synthetic import synthetic

__all__ = ["resample", "synthetic"]
