"""dask X against in-memory X for highly_variable_genes, normalize_pearson_residuals, scale and
regress_out (issue 11: dask with one chunk per core at most 1.3x slower than without dask).

Cells model-drawn from pbmc3k (gpusc.datasets.resample, groupby seurat_cell_type), scipy CSR;
the dask X has one row chunk per CPU core (CSR chunks, persisted in memory). Per step: one
warm-up call each, then --repeats rounds alternating gpusc in memory and gpusc on dask in one
process (best of each); a lazy result (scale, residuals, regress_out) is persisted (every
chunk computed, kept as chunks) inside the timing. Where scanpy 1.12 accepts dask
(highly_variable_genes seurat/cell_ranger/seurat_v3, scale), scanpy on the same dask X once
after a warm-up. Steps and their inputs:
  hvg_seurat           log1p data, flavor="seurat", n_top_genes=2000
  hvg_cell_ranger      log1p data, flavor="cell_ranger", n_top_genes=2000
  hvg_seurat_v3_batch  counts, flavor="seurat_v3", n_top_genes=2000, batch_key (two halves)
  hvg_pearson          counts, flavor="pearson_residuals", n_top_genes=2000
  hvg_poisson          counts, flavor="poisson_gene_selection", n_top_genes=2000
  pearson_residuals    counts of the 2,000 seurat_v3 genes, normalize_pearson_residuals
  scale                log1p data of the 2,000 genes, scale(max_value=10) (dense float64 result)
  regress_out          log1p data of the 2,000 genes, regress_out(["total_counts", "pct_counts_mt"])

    python benchmarks/bench_dask_hvg_scale.py [--cells 200000] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import os
import time
import warnings

import anndata as ad
import dask.array as da
import scanpy as sc

import gpusc
from gpusc._bench import load_average

from _timing import feature_selection_data, parse_args, save

N_CHUNKS = os.cpu_count() or 1


def as_dask(a: ad.AnnData) -> ad.AnnData:
    """A copy of ``a`` whose X is a dask array of N_CHUNKS CSR row chunks, persisted: the
    chunks are cut once here, so the timings hold gpusc's work and dask's scheduling, not
    scipy's slicing of the whole matrix (which a dask X read from a store does not pay)."""
    out = a.copy()
    out.X = da.from_array(a.X, chunks=(-(-a.n_obs // N_CHUNKS), -1)).persist()
    return out


def run(call, a: ad.AnnData) -> float:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(a)
    if isinstance(a.X, da.Array):
        # a lazy result is part of the work: every chunk computed and kept in memory as
        # chunks, as a next dask step reads them (no concatenation into one array, which
        # copies a dense result once more and which an out-of-core pipeline never does)
        a.X = a.X.persist()
    return time.perf_counter() - start


def main() -> None:
    args, _, out = parse_args(__doc__, "dask-hvg-scale")
    if args.device != "cpu":
        raise SystemExit("this benchmark runs on the CPU; the GPU twin waits for a device")
    counts, logged, top_counts, top_logged = feature_selection_data(args.cells)

    hvg = gpusc.pp.highly_variable_genes
    steps = {  # name: (data, call, scanpy's call on dask or None)
        "hvg_seurat": (logged, lambda a: hvg(a, flavor="seurat", n_top_genes=2000),
                       lambda a: sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=2000)),
        "hvg_cell_ranger": (logged, lambda a: hvg(a, flavor="cell_ranger", n_top_genes=2000),
                            lambda a: sc.pp.highly_variable_genes(a, flavor="cell_ranger",
                                                                  n_top_genes=2000)),
        "hvg_seurat_v3_batch": (counts, lambda a: hvg(a, flavor="seurat_v3", n_top_genes=2000,
                                                      batch_key="half"),
                                lambda a: sc.pp.highly_variable_genes(
                                    a, flavor="seurat_v3", n_top_genes=2000, batch_key="half")),
        "hvg_pearson": (counts, lambda a: hvg(a, flavor="pearson_residuals", n_top_genes=2000), None),
        "hvg_poisson": (counts, lambda a: hvg(a, flavor="poisson_gene_selection", n_top_genes=2000),
                        None),
        "pearson_residuals": (top_counts, gpusc.pp.normalize_pearson_residuals, None),
        "scale": (top_logged, lambda a: gpusc.pp.scale(a, max_value=10),
                  lambda a: sc.pp.scale(a, max_value=10)),
        "regress_out": (top_logged, lambda a: gpusc.pp.regress_out(a, ["total_counts", "pct_counts_mt"]),
                        None),
    }
    load_before = load_average()
    rows = []
    for name, (data, call, scanpy_call) in steps.items():
        lazy = as_dask(data)
        # the in-memory side gets a fresh copy (scale and the others change X); the dask side
        # a new AnnData around the same lazy X (nothing changes its chunks)
        sides = {"memory": data.copy, "dask": lazy.copy}
        times = {side: [] for side in sides}
        for side, make in sides.items():
            run(call, make())  # warm-up
        for _ in range(args.repeats):
            for side, make in sides.items():
                a = make()
                times[side].append(run(call, a))
        row = {"step": name, "shape": list(data.shape), "chunks": N_CHUNKS,
               **{side: {"seconds": t, "best": min(t)} for side, t in times.items()},
               "load_average": load_average()}
        row["dask_over_memory"] = row["dask"]["best"] / row["memory"]["best"]
        line = (f"{name:20s} memory {row['memory']['best']:7.3f} s  dask {row['dask']['best']:7.3f} s"
                f"  {row['dask_over_memory']:5.2f}x")
        if scanpy_call is not None:
            run(scanpy_call, lazy.copy())  # warm-up
            row["scanpy_dask"] = {"seconds": [run(scanpy_call, lazy.copy())]}
            row["scanpy_dask_over_gpusc_dask"] = row["scanpy_dask"]["seconds"][0] / row["dask"]["best"]
            line += f"  scanpy dask {row['scanpy_dask']['seconds'][0]:7.3f} s"
        print(f"{line}  (load {row['load_average'][0]:.1f})", flush=True)
        rows.append(row)
    save(out, "dask-hvg-scale", args, False, load_before,
         {"description": f"{args.cells:,} cells model-drawn (gpusc.datasets.resample) from pbmc3k, "
                         f"groupby seurat_cell_type, seed 0; filter_genes(min_cells=3); dask: "
                         f"{N_CHUNKS} CSR row chunks (one per core)",
          "shape": list(counts.shape)},
         "one warm-up call each, then --repeats rounds alternating memory and dask (best of "
         "each); lazy results persisted (chunks computed, not concatenated) inside the timing; "
         "scanpy on dask: one run after a warm-up", rows)


if __name__ == "__main__":
    main()
