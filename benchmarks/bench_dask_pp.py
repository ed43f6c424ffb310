"""gpusc on a dask X (row chunks, one per core) against gpusc in memory, step by step (issue 11).

    python benchmarks/bench_dask_pp.py [--cells 200000] [--repeats 5] [--chunks N] [--steps a,b] [--out FILE]

Cells are model-drawn from pbmc3k (gpusc.datasets.resample, CSR float32). Steps: QC (one
dask computation), filter_cells, normalize_total (median target: one pass for the totals,
then the lazy scaling, computed), log1p (lazy, computed). Each dask timing includes computing
the result (X persisted as host chunks), so both sides end with the same numbers in memory.
The two sides alternate within one process, on fresh copies, after one warm-up call each;
the load average is recorded before and after (the dev box is shared: read the ratios, not
the seconds, and take the numbers on a quiet machine).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
from scipy import sparse

import gpusc as rsc
from gpusc._bench import load_average, machine, versions

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GPUSC_DATA", ROOT / ".." / "shared" / "data")) / "pbmc3k_counts_labeled.h5ad"


def as_dask(x: sparse.csr_matrix, n_chunks: int):
    """``x`` split by rows into ``n_chunks`` CSR chunks, each a graph key (no slicing at compute)."""
    import dask.array as da

    bounds = np.linspace(0, x.shape[0], n_chunks + 1).astype(int)
    name = f"bench-{id(x):x}"
    graph = {(name, i, 0): x[a:b] for i, (a, b) in enumerate(itertools.pairwise(bounds))}
    return da.Array(graph, name, chunks=(tuple(np.diff(bounds)), (x.shape[1],)), meta=x[:0])


def step_calls():
    """name -> call(adata): the step, with the dask result computed."""
    def materialize(a):
        if hasattr(a.X, "compute"):
            a.X = a.X.persist()  # every chunk computed, kept as chunks

    def normalize(a):
        rsc.pp.normalize_total(a)
        materialize(a)

    def log1p(a):
        rsc.pp.log1p(a)
        materialize(a)

    return {
        "calculate_qc_metrics": lambda a: rsc.pp.calculate_qc_metrics(a, qc_vars=["mt"], inplace=True),
        "filter_cells": lambda a: rsc.pp.filter_cells(a, min_genes=200, inplace=False),
        "normalize_total": normalize,
        "log1p": log1p,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=os.cpu_count(), help="row chunks (default: one per core)")
    parser.add_argument("--steps", default=",".join(step_calls()), help="comma-separated subset of the steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    steps = {name: call for name, call in step_calls().items() if name in args.steps.split(",")}
    out = args.out or ROOT / f"benchmarks/results/cpu-dev-dask-pp-{args.cells // 1000}k.json"

    source = ad.read_h5ad(DATA)
    data = rsc.datasets.resample(source, args.cells, groupby="seurat_cell_type", seed=0)
    data.var["mt"] = data.var_names.str.startswith("MT-")
    x = sparse.csr_matrix(data.X)

    def fresh(side):
        a = ad.AnnData(x.copy(), var=data.var.copy())
        if side == "dask":
            a.X = as_dask(a.X, args.chunks)
        return a

    load_before = load_average()
    rows = []
    for name, call in steps.items():
        times = {"memory": [], "dask": []}
        for side in ("memory", "dask"):  # warm-up: numba compilation, dask's first graph
            call(fresh(side))
        for _ in range(args.repeats):
            for side, seconds in times.items():  # alternate the two sides
                a = fresh(side)
                start = time.perf_counter()
                call(a)
                seconds.append(time.perf_counter() - start)
        ratio = min(times["dask"]) / min(times["memory"])
        rows.append({"step": name, **{k: {"seconds": v, "best": min(v)} for k, v in times.items()},
                     "dask_over_memory": ratio, "load_average": load_average()})
        print(f"{name:22s} memory {min(times['memory']):7.3f} s  dask {min(times['dask']):7.3f} s  "
              f"dask/memory {ratio:5.2f}  load {load_average()}", flush=True)
    record = {
        "benchmark": "dask-pp", "cells": args.cells, "genes": x.shape[1], "nnz": int(x.nnz),
        "chunks": args.chunks, "repeats": args.repeats, "load_average_before": load_before,
        "load_average_after": load_average(), "machine": machine(False), "versions": versions(),
        "method": "one warm-up call per side, then best of repeats, sides alternating in one process; "
                  "dask results computed (persist) inside the timing; fresh copies not timed",
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
