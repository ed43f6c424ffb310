"""pbmc3k: the real 10x counts, from ``$GPUSC_DATA`` when there, else scanpy's downloader."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad

# The file in $GPUSC_DATA (the project's real-data folder; see tests/conftest.py).
LOCAL_FILE = "pbmc3k_counts_labeled.h5ad"


def pbmc3k() -> ad.AnnData:
    """3k PBMCs from a healthy donor (10x Genomics), raw UMI counts.

    Reads ``$GPUSC_DATA/pbmc3k_counts_labeled.h5ad`` when the environment variable
    ``GPUSC_DATA`` names a folder holding that file; otherwise returns
    :func:`scanpy.datasets.pbmc3k` (which downloads 5.9 MB on its first call and keeps
    them in ``scanpy.settings.datasetdir``). Both are the same cells and counts:

    * from ``$GPUSC_DATA``: 2,700 cells × 13,714 genes, the genes that remain after
      scanpy's ``filter_genes(min_cells=3)``, with the labels ``obs['louvain']`` (scanpy's
      pbmc3k tutorial clusters; NaN for the cells that tutorial filters out),
      ``obs['seurat_cell_type']`` and ``obs['in_pbmc3k_processed']``;
    * from scanpy: 2,700 cells × 32,738 genes (every gene of the 10x reference) and
      ``var['gene_ids']``, no labels.

    ``filter_genes(min_cells=3)`` on either gives the same matrix. Gene symbols are the
    var names in both (``MT-`` prefixes for mitochondrial genes).

    Returns
    -------
    AnnData
        X: CSR float32 integer counts, cells × genes, on the host.
    """
    folder = os.environ.get("GPUSC_DATA")
    if folder and (path := Path(folder) / LOCAL_FILE).is_file():
        return ad.read_h5ad(path)
    import scanpy as sc

    return sc.datasets.pbmc3k()
