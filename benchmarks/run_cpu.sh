#!/usr/bin/env bash
# The CPU benchmarks committed in benchmarks/results/ (dev box: 2 cores, shared; see docs/benchmarks.md).
# Run from the repository root with gpusc and its bench extra installed (make venv).
# Usage: bash benchmarks/run_cpu.sh [pipeline|sweep|features|pca|graph|synthetic|all]   (default all)
set -euo pipefail
cd "$(dirname "$0")/.."
GPUSC=${GPUSC:-gpusc}
PYTHON=${PYTHON:-python}
DATA=${GPUSC_DATA:-../shared/data}/pbmc3k_counts_labeled.h5ad
OUT=benchmarks/results
what=${1:-all}

if [[ $what == pipeline || $what == all ]]; then
  # every pipeline step gpusc has, 50k cells model-drawn from pbmc3k
  "$GPUSC" bench --device cpu --cells 50000 --data "$DATA" --groupby seurat_cell_type \
    --repeats 3 --out "$OUT" --name cpu-dev-pipeline-50k
fi
if [[ $what == sweep || $what == all ]]; then
  # preprocessing steps (qc through scale) at 10k..200k cells; pca and neighbors are in the 50k run only
  "$GPUSC" bench --device cpu --cells 10000,50000,100000,200000 --data "$DATA" --groupby seurat_cell_type \
    --steps qc,filter_cells,filter_genes,normalize,log1p,hvg,filter_hv,scale --repeats 3 \
    --out "$OUT" --name cpu-dev-sweep-preprocess
fi
if [[ $what == features || $what == all ]]; then
  # HVG flavors, Pearson residuals, regress_out (issue 4's steps outside the pipeline)
  "$PYTHON" benchmarks/bench_feature_selection.py --repeats 5 --out "$OUT/cpu-dev-feature-selection-50k.json"
fi
if [[ $what == pca || $what == all ]]; then
  # sparse and dense pca, neighbors with recall against exact search
  "$PYTHON" benchmarks/bench_pca_neighbors.py --repeats 3 --out "$OUT/cpu-dev-pca-neighbors-50k.json"
fi
if [[ $what == graph || $what == all ]]; then
  # host work of tl.umap + tl.leiden's GPU paths on a synthetic 1M-node kNN graph (budget: 1 s)
  "$PYTHON" benchmarks/bench_graph_host.py --before --out "$OUT/cpu-dev-graph-host-1000k.json"
fi
if [[ $what == synthetic || $what == all ]]; then
  "$PYTHON" benchmarks/time_synthetic.py --out "$OUT/cpu-dev-synthetic-200k.json"
fi
