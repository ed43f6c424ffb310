"""Count matrices: real pbmc3k, synthetic cells, and new cells drawn from a model of real data.

:func:`pbmc3k` returns the real pbmc3k counts (for tutorials);
:func:`synthetic` makes negative-binomial counts with known cell types;
:func:`resample` fits a per-group negative-binomial model to a real counts AnnData and
draws new cells from it (for benchmarks larger than the real data, without copying real
cells). All three return CSR float32 integer counts; the last two are deterministic for a seed.
"""

from __future__ import annotations

from ._pbmc3k import pbmc3k
from ._resample import resample
from ._synthetic import synthetic

__all__ = ["pbmc3k", "resample", "synthetic"]
