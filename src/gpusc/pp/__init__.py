"""Preprocessing with scanpy 1.12's functions, arguments, defaults and result keys."""

from ._bbknn import bbknn
from ._filter_hv import filter_highly_variable
from ._harmony import harmony_integrate
from ._hvg import highly_variable_genes
from ._hvg_pearson import highly_variable_genes_pearson_residuals
from ._neighbors import neighbors
from ._normalize import normalize_total
from ._pca import pca
from ._pearson import normalize_pearson_residuals
from ._qc import calculate_qc_metrics
from ._regress_out import regress_out
from ._scale import scale
from ._scrublet import scrublet, scrublet_simulate_doublets
from ._simple import filter_cells, filter_genes, log1p

__all__ = [
    "bbknn",
    "calculate_qc_metrics",
    "filter_cells",
    "filter_genes",
    "filter_highly_variable",
    "harmony_integrate",
    "highly_variable_genes",
    "highly_variable_genes_pearson_residuals",
    "log1p",
    "neighbors",
    "normalize_pearson_residuals",
    "normalize_total",
    "pca",
    "regress_out",
    "scale",
    "scrublet",
    "scrublet_simulate_doublets",
]
