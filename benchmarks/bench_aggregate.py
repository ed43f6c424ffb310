"""get.aggregate and tl.score_genes, gpusc against scanpy 1.12, side by side in one run.

50,000 cells model-drawn from pbmc3k (gpusc.datasets.resample, groupby seurat_cell_type: 9
groups), raw counts, CSR float32. Per step: one warm-up call each (numba compilation), then
the best of --repeats on fresh copies (copies and, with --device gpu, gpusc's host-to-device
transfer not timed; on the GPU each call ends with a device synchronisation). Steps:
  aggregate_sum_mean_count  get.aggregate(by="seurat_cell_type", func=["sum", "mean", "count_nonzero"])
  aggregate_var             get.aggregate(by="seurat_cell_type", func="var")
  aggregate_median          get.aggregate(by="seurat_cell_type", func="median") on 2,000 genes
  score_genes               tl.score_genes of 50 genes on normalize_total + log1p data

    python benchmarks/bench_aggregate.py [--cells 50000] [--repeats 3] [--device cpu|gpu] [--out FILE]

Both libraries run their numba kernels on numba's threads (NUMBA_NUM_THREADS, recorded in the
JSON); on a shared machine a second run with NUMBA_NUM_THREADS=1 gives the per-core ratio.
"""

from __future__ import annotations

import anndata as ad
import numba
import numpy as np
import scanpy as sc

import gpusc
from gpusc._bench import load_average

from _timing import DATA, METHOD, parse_args, save, side_by_side


def main() -> None:
    args, on_gpu, out = parse_args(__doc__, "aggregate")

    counts = gpusc.datasets.resample(ad.read_h5ad(DATA), args.cells, groupby="seurat_cell_type", seed=0)
    logged = counts.copy()
    sc.pp.normalize_total(logged)
    sc.pp.log1p(logged)
    median_genes = counts[:, :2000].copy()
    genes = list(np.random.default_rng(0).choice(counts.var_names, 50, replace=False))
    by = "seurat_cell_type"

    steps = {
        "aggregate_sum_mean_count": (counts, lambda m: lambda a: m.aggregate(
            a, by=by, func=["sum", "mean", "count_nonzero"])),
        "aggregate_var": (counts, lambda m: lambda a: m.aggregate(a, by=by, func="var")),
        "aggregate_median": (median_genes, lambda m: lambda a: m.aggregate(a, by=by, func="median")),
        "score_genes": (logged, lambda m: lambda a: m.score_genes(a, genes)),
    }
    module_of = {
        "scanpy": lambda name: sc.tl if name == "score_genes" else sc.get,
        "gpusc": lambda name: gpusc.tl if name == "score_genes" else gpusc.get,
    }
    load_before = load_average()
    rows = side_by_side(steps, module_of, args, on_gpu, shape_of=lambda name, data: data.shape)
    save(out, "aggregate", args, on_gpu, load_before,
         {"description": f"{args.cells:,} cells model-drawn (gpusc.datasets.resample) from pbmc3k, "
                         f"groupby {by} ({counts.obs[by].nunique()} groups), seed 0; raw counts "
                         "CSR float32 (score_genes: normalize_total + log1p)",
          "shape": list(counts.shape), "nnz": int(counts.X.nnz),
          "numba_threads": numba.get_num_threads()}, METHOD, rows)


if __name__ == "__main__":
    main()
