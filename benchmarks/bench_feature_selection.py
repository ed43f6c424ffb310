"""Issue 4's steps that the pipeline benchmark does not cover, gpusc against scanpy 1.12.

50,000 cells model-drawn from pbmc3k (gpusc.datasets.resample, groupby seurat_cell_type).
Per step: one warm-up call each, then the best of --repeats on fresh copies (copies and,
with --device gpu, gpusc's host-to-device transfer not timed; on the GPU each call ends
with a device synchronisation). Steps and their inputs:
  hvg_seurat_v3        counts, highly_variable_genes(flavor="seurat_v3", n_top_genes=2000)
  hvg_seurat_v3_batch  the same with batch_key (two halves of the cells)
  hvg_cell_ranger      log1p data, flavor="cell_ranger", n_top_genes=2000
  hvg_pearson          counts, scanpy.experimental's highly_variable_genes(n_top_genes=2000)
  pearson_residuals    counts of the 2,000 seurat_v3 genes, normalize_pearson_residuals
  regress_out          log1p data of the 2,000 genes, regress_out(["total_counts", "pct_counts_mt"])

    python benchmarks/bench_feature_selection.py [--cells 50000] [--repeats 3] [--device cpu|gpu] [--out FILE]
"""

from __future__ import annotations

import scanpy as sc

import gpusc
from gpusc._bench import load_average

from _timing import METHOD, feature_selection_data, parse_args, save, side_by_side


def main() -> None:
    args, on_gpu, out = parse_args(__doc__, "feature-selection")

    counts, logged, top_counts, top_logged = feature_selection_data(args.cells)

    steps = {
        "hvg_seurat_v3": (counts, lambda m: lambda a: m.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=2000)),
        "hvg_seurat_v3_batch": (counts, lambda m: lambda a: m.highly_variable_genes(
            a, flavor="seurat_v3", n_top_genes=2000, batch_key="half")),
        "hvg_cell_ranger": (logged, lambda m: lambda a: m.highly_variable_genes(a, flavor="cell_ranger", n_top_genes=2000)),
        "hvg_pearson": (counts, lambda m: lambda a: m.highly_variable_genes(a, n_top_genes=2000)),
        "pearson_residuals": (top_counts, lambda m: lambda a: m.normalize_pearson_residuals(a)),
        "regress_out": (top_logged, lambda m: lambda a: m.regress_out(a, ["total_counts", "pct_counts_mt"])),
    }
    experimental = ("hvg_pearson", "pearson_residuals")
    module_of = {
        "scanpy": lambda name: sc.experimental.pp if name in experimental else sc.pp,
        "gpusc": lambda name: gpusc.experimental.pp if name in experimental else gpusc.pp,
    }
    load_before = load_average()
    rows = side_by_side(steps, module_of, args, on_gpu)
    save(out, "feature-selection", args, on_gpu, load_before,
         {"description": f"{args.cells:,} cells model-drawn (gpusc.datasets.resample) from pbmc3k, "
                         "groupby seurat_cell_type, seed 0; filter_genes(min_cells=3)",
          "shape": list(counts.shape)}, METHOD, rows)


if __name__ == "__main__":
    main()
