"""What benchmarks/bench_*.py share: arguments, the data path, fresh inputs, best-of timing,
the scanpy-against-gpusc loop and the JSON record."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anndata as ad

import gpusc
from gpusc._bench import git_state, load_average, machine, synchronize, versions

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GPUSC_DATA", ROOT / ".." / "shared" / "data")) / "pbmc3k_counts_labeled.h5ad"


def feature_selection_data(n_cells: int):
    """pbmc3k resampled to ``n_cells`` (obs "half": two batches), after scanpy's QC and
    filter_genes: (counts, log1p-normalized copy, both on the 2,000 seurat_v3 genes)."""
    import numpy as np
    import scanpy as sc

    counts = gpusc.datasets.resample(ad.read_h5ad(DATA), n_cells, groupby="seurat_cell_type", seed=0)
    counts.obs["half"] = np.where(np.arange(counts.n_obs) % 2 == 0, "a", "b")
    sc.pp.calculate_qc_metrics(counts, qc_vars=["mt"], inplace=True)
    sc.pp.filter_genes(counts, min_cells=3)
    logged = counts.copy()
    sc.pp.normalize_total(logged)
    sc.pp.log1p(logged)
    sc.pp.highly_variable_genes(counts, flavor="seurat_v3", n_top_genes=2000)
    top = counts.var["highly_variable"].to_numpy()
    return counts, logged, counts[:, top].copy(), logged[:, top].copy()


def parse_args(doc: str, name: str) -> tuple[argparse.Namespace, bool, Path]:
    """``(args, on_gpu, out)``; out defaults to benchmarks/results/{device}-dev-{name}-{cells}k.json."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / f"benchmarks/results/{args.device}-dev-{name}-{args.cells // 1000}k.json"
    return args, args.device == "gpu", out


def fresh(lib: str, data: ad.AnnData, on_gpu: bool):
    """A maker of fresh copies of ``data`` for ``lib``; gpusc's go to the device on the GPU."""
    def make() -> ad.AnnData:
        a = data.copy()
        if lib == "gpusc" and on_gpu:
            gpusc.get.anndata_to_GPU(a)
        return a
    return make


def best_of(fn, make_input, repeats: int, on_gpu: bool = False) -> list[float]:
    """One warm-up call (numba/NVRTC compilation, caches), then ``repeats`` timed calls on
    fresh inputs; making the input is not timed, the device is synchronised around each call."""
    fn(make_input())
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


METHOD = ("one warm-up call each, then the best of repeats on fresh copies; copies and "
          "host-to-device transfers not timed")


def side_by_side(steps: dict, module_of: dict, args, on_gpu: bool, shape_of=None) -> list[dict]:
    """Time each step with scanpy and gpusc: ``steps`` maps a name to (data, call), ``call(module)``
    being the function to time; ``module_of[lib](name)`` picks the library's module for a step.
    Rows: step, shape (``shape_of(name, data)``, when given), both timings and the speedup."""
    rows = []
    for name, (data, call) in steps.items():
        row = {"step": name} if shape_of is None else {"step": name, "shape": list(shape_of(name, data))}
        for lib, module in module_of.items():
            times = best_of(call(module(name)), fresh(lib, data, on_gpu), args.repeats, on_gpu and lib == "gpusc")
            row[lib] = {"seconds": times, "best": min(times)}
        row["speedup"] = row["scanpy"]["best"] / row["gpusc"]["best"]
        rows.append(row)
        print(f"{name:22s} scanpy {row['scanpy']['best']:8.3f} s  gpusc {row['gpusc']['best']:8.3f} s  "
              f"{row['speedup']:5.2f}x", flush=True)
    return rows


def save(out: Path, benchmark: str, args, on_gpu: bool, load_before, data: dict, method: str, rows: list) -> None:
    """The raw JSON record of a run: machine, versions, git state, load, data, method, steps."""
    record = {
        "benchmark": benchmark, "device": args.device, "machine": machine(on_gpu), "versions": versions(),
        "git": git_state(), "repeats": args.repeats, "load_average_before": load_before,
        "load_average_after": load_average(), "data": data, "method": method, "steps": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
