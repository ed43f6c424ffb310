"""Tools with scanpy 1.12's functions, arguments, defaults and result keys."""

from ..pp._pca import pca
from ._diffmap import diffmap
from ._draw_graph import draw_graph
from ._embedding_density import embedding_density
from ._leiden import leiden, louvain
from ._rank_genes_groups import filter_rank_genes_groups, rank_genes_groups
from ._score_genes import score_genes, score_genes_cell_cycle
from ._tsne import tsne
from ._umap import umap

__all__ = ["pca", "diffmap", "draw_graph", "embedding_density", "leiden", "louvain", "rank_genes_groups", "filter_rank_genes_groups", "score_genes", "score_genes_cell_cycle", "tsne", "umap"]
