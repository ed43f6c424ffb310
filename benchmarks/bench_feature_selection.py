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

import argparse
import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc

import gpusc
from gpusc._bench import git_state, load_average, machine, synchronize, versions

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GPUSC_DATA", ROOT / ".." / "shared" / "data")) / "pbmc3k_counts_labeled.h5ad"


def best_of(fn, make_input, repeats: int, on_gpu: bool = False) -> list[float]:
    fn(make_input())  # warm-up: numba/NVRTC compilation, caches
    synchronize(on_gpu)
    times = []
    for _ in range(repeats):
        a = make_input()
        synchronize(on_gpu)
        start = time.perf_counter()
        fn(a)
        synchronize(on_gpu)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    on_gpu = args.device == "gpu"
    out = args.out or ROOT / f"benchmarks/results/{args.device}-dev-feature-selection-{args.cells // 1000}k.json"

    counts = gpusc.datasets.resample(ad.read_h5ad(DATA), args.cells, groupby="seurat_cell_type", seed=0)
    counts.obs["half"] = np.where(np.arange(counts.n_obs) % 2 == 0, "a", "b")
    sc.pp.calculate_qc_metrics(counts, qc_vars=["mt"], inplace=True)
    sc.pp.filter_genes(counts, min_cells=3)
    logged = counts.copy()
    sc.pp.normalize_total(logged)
    sc.pp.log1p(logged)
    sc.pp.highly_variable_genes(counts, flavor="seurat_v3", n_top_genes=2000)
    top_counts = counts[:, counts.var["highly_variable"]].copy()
    top_logged = logged[:, counts.var["highly_variable"]].copy()

    steps = {
        "hvg_seurat_v3": (counts, lambda m: lambda a: m.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=2000)),
        "hvg_seurat_v3_batch": (counts, lambda m: lambda a: m.highly_variable_genes(
            a, flavor="seurat_v3", n_top_genes=2000, batch_key="half")),
        "hvg_cell_ranger": (logged, lambda m: lambda a: m.highly_variable_genes(a, flavor="cell_ranger", n_top_genes=2000)),
        "hvg_pearson": (counts, lambda m: lambda a: m.highly_variable_genes(a, n_top_genes=2000)),
        "pearson_residuals": (top_counts, lambda m: lambda a: m.normalize_pearson_residuals(a)),
        "regress_out": (top_logged, lambda m: lambda a: m.regress_out(a, ["total_counts", "pct_counts_mt"])),
    }
    libraries = {
        "scanpy": lambda name: sc.experimental.pp if name in ("hvg_pearson", "pearson_residuals") else sc.pp,
        "gpusc": lambda name: gpusc.experimental.pp if name in ("hvg_pearson", "pearson_residuals") else gpusc.pp,
    }
    load_before = load_average()
    rows = []
    def make_input(lib: str, data: ad.AnnData):
        def make():
            a = data.copy()
            if lib == "gpusc" and on_gpu:
                gpusc.get.anndata_to_GPU(a)
            return a
        return make

    for name, (data, call) in steps.items():
        row = {"step": name}
        for lib, module_of in libraries.items():
            times = best_of(call(module_of(name)), make_input(lib, data), args.repeats,
                            on_gpu and lib == "gpusc")
            row[lib] = {"seconds": times, "best": min(times)}
        row["speedup"] = row["scanpy"]["best"] / row["gpusc"]["best"]
        rows.append(row)
        print(f"{name:22s} scanpy {row['scanpy']['best']:8.3f} s  gpusc {row['gpusc']['best']:8.3f} s  "
              f"{row['speedup']:5.2f}x", flush=True)
    record = {
        "benchmark": "feature-selection", "device": args.device, "machine": machine(on_gpu), "versions": versions(),
        "git": git_state(), "repeats": args.repeats, "load_average_before": load_before,
        "load_average_after": load_average(),
        "data": {"description": f"{args.cells:,} cells model-drawn (gpusc.datasets.resample) from pbmc3k, "
                                "groupby seurat_cell_type, seed 0; filter_genes(min_cells=3)",
                 "shape": list(counts.shape)},
        "method": "one warm-up call each, then the best of repeats on fresh copies; copies and "
                  "host-to-device transfers not timed",
        "steps": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
