"""Small device calls of every kernel family, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize.py [family ...]

Each family of ``kernels/*.cu`` is reached through the public function (or launcher) that uses
it, on inputs small enough for the sanitizer's slow emulation and shaped to take every branch
(empty rows and columns, several slices per group, both kNN passes). ``benchmarks/gpu_check.py``
runs this under each tool; ``tests/test_gpu_check.py`` checks that every family is here.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
from scipy import sparse


def _counts(n_obs=600, n_vars=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, (n_obs, n_vars)) * (rng.random((n_obs, n_vars)) < 0.2)
    x[:, :5] += rng.poisson(20, (n_obs, 5))  # a few highly expressed genes
    x[7] = 0  # an empty cell
    x[:, 11] = 0  # an empty gene
    return sparse.csr_matrix(x.astype(np.float32))


def _adata(fmt="csr", seed=0):
    import anndata as ad

    import gpusc

    x = _counts(seed=seed).asformat(fmt)
    adata = ad.AnnData(x)
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]
    adata.var["mt"] = np.arange(adata.n_vars) < 10
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 3 == 0, "a", "b")
    gpusc.get.anndata_to_GPU(adata)
    return adata


def qc():
    import gpusc

    for fmt in ("csr", "csc"):
        gpusc.pp.calculate_qc_metrics(_adata(fmt), qc_vars=["mt"], percent_top=(5, 50), inplace=True)


def normalize():
    import gpusc

    a = _adata()
    gpusc.pp.normalize_total(a, exclude_highly_expressed=True, max_fraction=0.05)
    gpusc.pp.log1p(a)


def moments():
    import cupy as cp

    import gpusc
    from gpusc._kernels.moments import COUNT_NONZERO, MODE_CLIP, gene_moments

    a = _adata()
    codes = np.arange(a.n_obs) % 4
    gene_moments(a.X, codes, 4, count=COUNT_NONZERO)
    gene_moments(a.X.tocsc(), count=COUNT_NONZERO)  # CSC, one group: no copy
    gene_moments(cp.asarray(a.X.toarray()), codes, 4, mode=MODE_CLIP,
                 clip=np.full((4, a.n_vars), 3.0))
    gpusc.experimental.pp.highly_variable_genes(a, n_top_genes=50, batch_key="batch")


def hvg():
    import gpusc

    a = _adata()
    gpusc.pp.highly_variable_genes(a, flavor="poisson_gene_selection", n_top_genes=50,
                                   batch_key="batch")
    gpusc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=50, batch_key="batch")


def scale():
    import gpusc

    a = _adata()
    gpusc.pp.scale(a.copy(), zero_center=False, max_value=5)
    gpusc.pp.scale(a.copy(), max_value=5)
    gpusc.pp.normalize_pearson_residuals(a)


def aggregate():
    import gpusc

    a = _adata()
    a.obs["group"] = pd_categories(np.arange(a.n_obs) % 5)
    gpusc.get.aggregate(a, "group", ["sum", "var", "count_nonzero", "median"])


def rank_genes():
    import gpusc

    a = _adata()
    gpusc.pp.normalize_total(a)
    gpusc.pp.log1p(a)
    a.obs["group"] = pd_categories(np.arange(a.n_obs) % 4)
    for method in ("t-test", "wilcoxon"):
        gpusc.tl.rank_genes_groups(a, "group", method=method, pts=True)
    gpusc.tl.rank_genes_groups(a, "group", method="wilcoxon", reference="1", tie_correct=True)


def pd_categories(codes):
    import pandas as pd

    return pd.Categorical(codes.astype(str))


def gram():
    import gpusc

    a = _adata()
    gpusc.pp.normalize_total(a)
    gpusc.pp.log1p(a)
    gpusc.pp.pca(a, n_comps=10)


def topk():
    from gpusc._kernels.topk import knn_device

    x = np.random.default_rng(1).normal(size=(700, 20)).astype(np.float32)
    knn_device(x, 10, "euclidean")  # the fused TF32 pass
    knn_device(x, 10, "euclidean", query_rows=(256, len(x)))  # one worker's block of queries
    knn_device(x, 10, "cosine", fused=False)  # cuBLAS tiles and topk_tile
    knn_device(x, 10, "manhattan")


def connectivity():
    import anndata as ad

    import gpusc

    a = ad.AnnData(np.random.default_rng(2).normal(size=(400, 10)).astype(np.float32))
    gpusc.pp.neighbors(a, n_neighbors=10, use_rep="X", device="gpu")


def umap():
    import anndata as ad

    import gpusc

    a = ad.AnnData(np.random.default_rng(3).normal(size=(300, 10)).astype(np.float32))
    gpusc.pp.neighbors(a, n_neighbors=10, use_rep="X", device="gpu")
    gpusc.tl.umap(a, maxiter=5, device="gpu")


def density():
    import anndata as ad

    import gpusc

    # 300 cells in two groups: a partial last tile of the kde_sums kernel in each
    rng = np.random.default_rng(4)
    a = ad.AnnData(obsm={"X_umap": rng.normal(size=(300, 2)).astype(np.float32)})
    a.obs["group"] = np.where(np.arange(300) < 170, "a", "b")
    gpusc.tl.embedding_density(a, groupby="group", device="gpu")


def harmony():
    import anndata as ad

    import gpusc

    # 403 cells (a partial last tile), two keys; then 70 batches x 80 clusters, whose per-batch
    # sums pass the shared-memory limit and go to global memory
    rng = np.random.default_rng(5)
    a = ad.AnnData(obsm={"X_pca": rng.normal(size=(403, 12))})
    a.obs["batch"] = np.where(np.arange(403) % 3 == 0, "a", "b")
    a.obs["donor"] = np.array(["d0", "d1", "d2"])[np.arange(403) % 3]
    gpusc.pp.harmony_integrate(a, ["batch", "donor"], nclust=7, max_iter_harmony=2, device="gpu")
    b = ad.AnnData(obsm={"X_pca": rng.normal(size=(1400, 12))})
    b.obs["batch"] = [f"b{i % 70}" for i in range(1400)]
    gpusc.pp.harmony_integrate(b, "batch", nclust=80, max_iter_harmony=1, device="gpu")

def tsne():
    from gpusc._kernels import tsne as ktsne

    # 301 points (a partial last block), 3 gradient steps of the device t-SNE
    x = np.random.default_rng(6).normal(size=(301, 10)).astype(np.float32)
    start = np.random.default_rng(7).normal(scale=1e-4, size=(301, 2)).astype(np.float32)
    ktsne.embed(x, start, perplexity=30.0, early_exaggeration=12.0, learning_rate=1000.0,
                metric="euclidean", max_iter=3, on_device=True)


FAMILIES = {"qc": qc, "normalize": normalize, "moments": moments, "hvg": hvg, "scale": scale,
            "aggregate": aggregate, "rank_genes": rank_genes, "gram": gram, "topk": topk, "connectivity": connectivity, "umap": umap,
            "density": density, "harmony": harmony, "tsne": tsne}


def main(argv: list[str]) -> int:
    chosen = argv or list(FAMILIES)
    for name in chosen:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            FAMILIES[name]()
        import cupy

        cupy.cuda.Device().synchronize()
        print(f"family {name}: ok ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
