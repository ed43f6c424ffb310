"""Preprocessing with scanpy 1.12's functions, arguments, defaults and result keys."""

from ._normalize import normalize_total
from ._qc import calculate_qc_metrics
from ._simple import filter_cells, filter_genes, log1p

__all__ = ["calculate_qc_metrics", "filter_cells", "filter_genes", "log1p", "normalize_total"]
