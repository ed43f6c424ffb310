"""Issue 5's steps, gpusc against scanpy 1.12: PCA on sparse and dense input, the kNN graph.

50,000 cells model-drawn from pbmc3k (gpusc.datasets.resample, groupby seurat_cell_type),
filter_genes(min_cells=3), normalize_total, log1p, highly_variable_genes(n_top_genes=2000).
Per step: one warm-up call each, then the best of --repeats on fresh copies (copies and
transfers not timed; on the GPU the step ends with a device synchronisation). Steps:
  pca_sparse_masked   log1p CSR of all genes, var['highly_variable'] set: pca() (50 comps)
  pca_sparse_hvg      log1p CSR of the 2,000 genes: pca()
  pca_dense_scaled    the 2,000 genes after scale(max_value=10), dense: pca()
  neighbors           X_pca (50) from scanpy's pca of the scaled data: neighbors() (k=15);
                      gpusc's is exact brute force, scanpy's pynndescent: both timed, and
                      each kNN's recall against scikit-learn's exact search is recorded, with
                      the fraction of rows gpusc's first (float32 or TF32) pass certified
                      (the others are redone with float64 products).
  knn_fused, knn_tiles  (--device gpu only) the exact kNN alone on the same X_pca, k=15:
                      the fused TF32 candidate pass against cuBLAS tiles + topk_tile, each
                      with its float64 re-ranking (host arrays in and out, transfers timed)
                      and the fraction of rows its first pass certified.

    python benchmarks/bench_pca_neighbors.py [--cells 50000] [--repeats 3] [--device cpu|gpu] [--out FILE]
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc

import gpusc
from gpusc._bench import load_average

from _timing import DATA, METHOD, best_of, parse_args, save, side_by_side

K = 15


def knn_indices(adata) -> list[np.ndarray]:
    """Each cell's neighbours in obsp['distances'] (scanpy keeps K - 1 or so per row: self and
    zero distances are dropped, so the count varies)."""
    d = adata.obsp["distances"].tocsr()
    return [d.indices[d.indptr[i]:d.indptr[i + 1]] for i in range(adata.n_obs)]


def recall(found: list[np.ndarray], exact: np.ndarray) -> float:
    """Share of each cell's K - 1 exact neighbours (self excluded) that were found."""
    hits = sum(np.intersect1d(f, e).size for f, e in zip(found, exact, strict=True))
    return hits / exact.size


def main() -> None:
    args, on_gpu, out = parse_args(__doc__, "pca-neighbors")

    logged = gpusc.datasets.resample(ad.read_h5ad(DATA), args.cells, groupby="seurat_cell_type", seed=0)
    sc.pp.filter_genes(logged, min_cells=3)
    sc.pp.normalize_total(logged)
    sc.pp.log1p(logged)
    sc.pp.highly_variable_genes(logged, n_top_genes=2000)
    hvg = logged[:, logged.var["highly_variable"].to_numpy()].copy()
    del hvg.var["highly_variable"]  # no mask: the whole matrix is used
    scaled = hvg.copy()
    sc.pp.scale(scaled, max_value=10)
    embedded = scaled.copy()
    sc.pp.pca(embedded)
    embedded = ad.AnnData(obs=embedded.obs[[]], obsm={"X_pca": embedded.obsm["X_pca"]})

    steps = {
        "pca_sparse_masked": (logged, lambda m: m.pca),
        "pca_sparse_hvg": (hvg, lambda m: m.pca),
        "pca_dense_scaled": (scaled, lambda m: m.pca),
        "neighbors": (embedded, lambda m: (lambda a: m.neighbors(a, n_neighbors=K, use_rep="X_pca"))),
    }
    libraries = {"scanpy": sc.pp, "gpusc": gpusc.pp}
    load_before = load_average()
    rows = side_by_side(steps, {lib: lambda name, m=m: m for lib, m in libraries.items()}, args, on_gpu,
                        lambda name, data: data.obsm["X_pca"].shape if name == "neighbors" else data.shape)

    from gpusc._kernels.topk import knn_device, knn_host

    x_pca = np.ascontiguousarray(embedded.obsm["X_pca"])
    if on_gpu:
        for name, fused in (("knn_fused", True), ("knn_tiles", False)):
            times = best_of(lambda x, fused=fused: knn_device(x, K, "euclidean", fused=fused),
                            lambda: x_pca, args.repeats, True)
            certified = knn_device(x_pca, K, "euclidean", fused=fused)[2]
            rows.append({"step": name, "shape": list(x_pca.shape),
                         "gpusc": {"seconds": times, "best": min(times)},
                         "certified_first_pass": certified})
            print(f"{name:18s} gpusc {min(times):8.3f} s, first pass certified {certified:.2%}", flush=True)

    from sklearn.neighbors import NearestNeighbors

    exact = NearestNeighbors(n_neighbors=K).fit(x_pca).kneighbors(return_distance=False)[:, : K - 1]
    quality = {}
    for lib, module in libraries.items():
        a = embedded.copy()
        module.neighbors(a, n_neighbors=K, use_rep="X_pca")
        quality[f"{lib}_recall_vs_exact"] = recall(knn_indices(a), exact)
    # what gpusc's neighbors ran: the fused TF32 pass on the GPU, float32 tiles on the host
    quality["gpusc_certified_first_pass"] = (knn_device if on_gpu else knn_host)(x_pca, K, "euclidean")[2]
    next(r for r in rows if r["step"] == "neighbors").update(quality)
    print("neighbors recall vs exact, certified:", quality)

    save(out, "pca-neighbors", args, on_gpu, load_before,
         {"description": f"{args.cells:,} cells model-drawn (gpusc.datasets.resample) from pbmc3k, "
                         "groupby seurat_cell_type, seed 0; filter_genes(min_cells=3), "
                         "normalize_total, log1p, highly_variable_genes(n_top_genes=2000)",
          "shape": list(logged.shape), "nnz_hvg": int(hvg.X.nnz)},
         METHOD + "; recall: the K-1 neighbours in obsp['distances'] against scikit-learn's exact "
                  "NearestNeighbors on the same X_pca", rows)


if __name__ == "__main__":
    main()
