"""pp.scrublet and pp.bbknn, gpusc against scanpy 1.12 and the bbknn package, side by side.

--cells (default 50,000) cells model-drawn from pbmc3k (gpusc.datasets.resample, groupby
seurat_cell_type, seed 0), raw counts CSR float32, each given one of 4 batches at random
(seed 0). Steps:
  scrublet   pp.scrublet(batch_key="batch") on the raw counts, defaults otherwise: per batch
             (~12,500 cells) filtering, normalisation, HVG, 25,000 simulated doublets, PCA
             (30) and the kNN (k_adj = 168) over 37,500 points. scanpy searches those with
             PyNNDescent (its default past 8,192 points), gpusc exactly. Agreement recorded:
             identical doublet parents per batch, thresholds, share of equal predicted_doublet.
  bbknn      the bbknn graph (3 neighbours per batch, 50 PCs) of scanpy's normalize_total,
             log1p, 2,000 HVGs and pca (computed once, not timed): the bbknn package through
             sc.external.pp.bbknn with its default annoy search, and in exact mode
             (approx=False: cKDTree), against gpusc (exact). Agreement recorded: edges equal to
             the exact graph, largest connectivity difference.

Timing: one untimed warm-up call of each library on 2,000 cells (numba compilation), then
--repeats timed calls on fresh copies for gpusc and the bbknn package, and --scanpy-repeats
(default 1: a call takes minutes) for scanpy's scrublet; copies not timed. Wall seconds
and the process's CPU seconds (all threads) of each call: on shared cores the CPU seconds
compare the work done when other jobs stretch the wall times.

    python benchmarks/bench_scrublet.py [--cells 50000] [--repeats 3] [--scanpy-repeats 1] [--out FILE]

Both libraries run their numba code on numba's threads (NUMBA_NUM_THREADS, recorded).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import anndata as ad
import numba
import numpy as np
import scanpy as sc
from _timing import DATA, ROOT, save

import gpusc
from gpusc._bench import load_average

N_BATCHES = 4
WARMUP_CELLS = 2_000


def timed(fn, make_input, repeats: int) -> tuple[tuple[list[float], list[float]], object]:
    """``repeats`` timed calls on fresh inputs (making them is not timed): (wall seconds, CPU
    seconds of the process, all threads), and the last output. The CPU seconds say how much
    work each library did when other jobs share the cores and stretch the wall times."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        out = make_input()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(out)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return (times, cpu), out


def row(name: str, libs: dict) -> dict:
    entry = {"step": name}
    for lib, (times, cpu) in libs.items():
        entry[lib] = {"seconds": times, "best": min(times), "cpu_seconds": cpu, "best_cpu": min(cpu)}
    return entry


def scrublet_step(counts, args) -> dict:
    small = counts[:WARMUP_CELLS].copy()
    calls = {
        "scanpy": lambda a: sc.pp.scrublet(a, batch_key="batch", verbose=False),
        "gpusc": lambda a: gpusc.pp.scrublet(a, batch_key="batch", verbose=False),
    }
    out, times = {}, {}
    for lib, call in calls.items():
        call(small.copy())  # warm-up
        repeats = args.scanpy_repeats if lib == "scanpy" else args.repeats
        times[lib], out[lib] = timed(call, counts.copy, repeats)
        print(f"scrublet {lib:7s} {min(times[lib][0]):8.2f} s, {min(times[lib][1]):8.2f} CPU s", flush=True)
    theirs, ours = out["scanpy"].uns["scrublet"]["batches"], out["gpusc"].uns["scrublet"]["batches"]
    agreement = {
        "same_doublet_parents": all(np.array_equal(theirs[b]["doublet_parents"], ours[b]["doublet_parents"])
                                    for b in theirs),
        "threshold": {str(b): {"scanpy": float(theirs[b].get("threshold", np.nan)),
                               "gpusc": float(ours[b].get("threshold", np.nan))} for b in theirs},
        "predicted_doublet_equal_share": float((out["scanpy"].obs["predicted_doublet"]
                                                == out["gpusc"].obs["predicted_doublet"]).mean()),
        "predicted_doublets": {lib: int(out[lib].obs["predicted_doublet"].sum()) for lib in out},
    }
    entry = row("scrublet", times)
    entry["speedup"] = entry["scanpy"]["best"] / entry["gpusc"]["best"]
    entry["speedup_cpu"] = entry["scanpy"]["best_cpu"] / entry["gpusc"]["best_cpu"]
    entry["agreement"] = agreement
    entry["note"] = "scanpy: PyNNDescent kNN (its default at this size); gpusc: exact kNN"
    return entry


def bbknn_step(counts, args) -> dict:
    pcs = counts.copy()
    sc.pp.normalize_total(pcs)
    sc.pp.log1p(pcs)
    sc.pp.highly_variable_genes(pcs, n_top_genes=2000, subset=True)
    sc.pp.pca(pcs, n_comps=50)
    pcs = ad.AnnData(obs=pcs.obs[["batch"]].copy(), obsm={"X_pca": pcs.obsm["X_pca"]})
    calls = {
        "bbknn_annoy": lambda a: sc.external.pp.bbknn(a, batch_key="batch"),
        "bbknn_exact": lambda a: sc.external.pp.bbknn(a, batch_key="batch", approx=False),
        "gpusc": lambda a: gpusc.pp.bbknn(a, batch_key="batch"),
    }
    out, times = {}, {}
    for lib, call in calls.items():
        call(pcs[:WARMUP_CELLS].copy())
        times[lib], out[lib] = timed(call, pcs.copy, args.repeats)
        print(f"bbknn {lib:12s} {min(times[lib][0]):8.2f} s, {min(times[lib][1]):8.2f} CPU s", flush=True)
    exact, ours = out["bbknn_exact"].obsp, out["gpusc"].obsp
    agreement = {}
    for key in ("distances", "connectivities"):
        other = abs(exact[key].sign()) != abs(ours[key].sign())
        agreement[f"{key}_edges_differing"] = int(other.nnz)
        agreement[f"{key}_max_abs_diff"] = float(abs(exact[key] - ours[key]).max())
    entry = row("bbknn", times)
    entry["speedup_vs_exact"] = entry["bbknn_exact"]["best"] / entry["gpusc"]["best"]
    entry["speedup_vs_annoy"] = entry["bbknn_annoy"]["best"] / entry["gpusc"]["best"]
    entry["agreement_with_exact"] = agreement
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scanpy-repeats", type=int, default=1)
    parser.add_argument("--steps", default="scrublet,bbknn")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.device = "cpu"
    out = Path(args.out) if args.out else ROOT / f"benchmarks/results/cpu-dev-scrublet-bbknn-{args.cells // 1000}k.json"
    warnings.simplefilter("ignore")

    counts = gpusc.datasets.resample(ad.read_h5ad(DATA), args.cells, groupby="seurat_cell_type", seed=0)
    counts.obs["batch"] = np.random.default_rng(0).choice([f"b{i}" for i in range(N_BATCHES)], counts.n_obs)
    counts.obs["batch"] = counts.obs["batch"].astype("category")
    load_before = load_average()
    steps = {"scrublet": scrublet_step, "bbknn": bbknn_step}
    rows = [steps[name](counts, args) for name in args.steps.split(",")]
    save(out, "scrublet-bbknn", args, False, load_before,
         {"description": f"{args.cells:,} cells model-drawn (gpusc.datasets.resample) from pbmc3k, groupby "
                         f"seurat_cell_type, seed 0; raw counts CSR float32; {N_BATCHES} batches drawn "
                         "at random (seed 0)",
          "shape": list(counts.shape), "nnz": int(counts.X.nnz),
          "batch_sizes": counts.obs["batch"].value_counts().sort_index().to_dict(),
          "numba_threads": numba.get_num_threads()},
         "one untimed warm-up call of each library on 2,000 cells, then the best of --repeats "
         "(scanpy's scrublet: --scanpy-repeats) on fresh copies; copies not timed", rows)


if __name__ == "__main__":
    main()
