"""Tools with scanpy 1.12's functions, arguments, defaults and result keys."""

from ..pp._pca import pca
from ._leiden import leiden, louvain
from ._rank_genes_groups import filter_rank_genes_groups, rank_genes_groups
from ._score_genes import score_genes, score_genes_cell_cycle
from ._umap import umap

__all__ = ["pca", "leiden", "louvain", "rank_genes_groups", "filter_rank_genes_groups", "score_genes", "score_genes_cell_cycle", "umap"]
