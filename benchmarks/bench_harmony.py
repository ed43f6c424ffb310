"""pp.harmony_integrate: gpusc against harmonypy 2.x (through scanpy.external), side by side.

--cells (default 50,000) cells model-drawn from pbmc3k (gpusc.datasets.resample, groupby
seurat_cell_type, seed 0), given one of 4 batches at random (seed 0); each batch multiplies 5%
of the genes by its own fold (LogNormal(0, 1), seed 0): a known batch effect on known cell
types. scanpy's normalize_total, log1p, 2,000 HVGs and pca (50 comps) make X_pca (not timed).

Timed: harmonypy.run_harmony(adata.obsm["X_pca"], adata.obs, "batch") stored in obsm, as
sc.external.pp.harmony_integrate does (scanpy 1.12.4's own call transposes harmonypy 2.x's
result and fails; harmonypy's C++ backend, its default threads: one per physical core) and gpusc.pp.harmony_integrate(adata, "batch", device=...)
with the same defaults (theta 2, sigma 0.1, 100 clusters, at most 10 Harmony iterations of 4
k-means passes, the same convergence tests). Recorded with them: iterations run, the k-means
passes of each iteration and the last objective (both libraries), the load average after each
repeat, iLISI (batch) and cLISI (cell type) of each corrected space (harmonypy's compute_lisi,
perplexity 30, on a fixed 10,000-cell subsample), and, from harmonypy's own initial
centroids, the correlation of the two corrections (Z_corr - Z).

gpusc runs each block of a k-means pass on all threads: on a machine busier than its cores,
every block waits for descheduled threads, so compare on an idle machine (or with one thread).

    python benchmarks/bench_harmony.py [--cells 50000] [--repeats 3] [--device cpu|gpu] [--out FILE]

Threads: both libraries get ncores = numba's thread count (NUMBA_NUM_THREADS, recorded), and
BLAS is limited to as many (threadpoolctl); NUMBA_NUM_THREADS=1 compares one core each.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import anndata as ad
import numba
import numpy as np
import scanpy as sc
import scanpy.logging
from _timing import DATA, parse_args, save, synchronize

import gpusc
from gpusc._bench import load_average

N_BATCHES = 4
LISI_CELLS = 10_000


def make_data(n_cells: int) -> ad.AnnData:
    counts = gpusc.datasets.resample(ad.read_h5ad(DATA), n_cells, groupby="seurat_cell_type", seed=0)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, N_BATCHES, counts.n_obs)
    folds = np.ones((N_BATCHES, counts.n_vars), np.float32)
    for b in range(N_BATCHES):
        genes = rng.choice(counts.n_vars, counts.n_vars // 20, replace=False)
        folds[b, genes] = rng.lognormal(0.0, 1.0, genes.size)
    x = counts.X.tocsr().astype(np.float32)
    x.data = rng.poisson(x.data * folds[batch[x.nonzero()[0]], x.indices]).astype(np.float32)
    x.eliminate_zeros()
    counts.X = x
    counts.obs["batch"] = np.array([f"b{i}" for i in range(N_BATCHES)])[batch]
    counts.obs["batch"] = counts.obs["batch"].astype("category")
    sc.pp.normalize_total(counts)
    sc.pp.log1p(counts)
    sc.pp.highly_variable_genes(counts, n_top_genes=2000, subset=True)
    sc.pp.pca(counts, n_comps=50, random_state=0)
    return ad.AnnData(obs=counts.obs[["batch", "seurat_cell_type"]].copy(),
                      obsm={"X_pca": counts.obsm["X_pca"]})


def lisi(embedding, obs, subsample) -> dict:
    from harmonypy.lisi import compute_lisi

    values = compute_lisi(embedding[subsample], obs.iloc[subsample], ["batch", "seurat_cell_type"])
    return {"iLISI": float(values[:, 0].mean()), "cLISI": float(values[:, 1].mean())}


def _our_result(data, device):
    """gpusc's HarmonyResult of one harmony_integrate call on a copy of ``data``."""
    from gpusc.pp import _harmony

    kept = []
    harmonize = _harmony.harmonize
    _harmony.harmonize = lambda *a, **k: kept.append(harmonize(*a, **k)) or kept[-1]
    try:
        gpusc.pp.harmony_integrate(data.copy(), "batch", device=device,
                                   ncores=numba.get_num_threads())
    finally:
        _harmony.harmonize = harmonize
    return kept[0]


def main() -> None:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(numba.get_num_threads()):
        run()


def run() -> None:
    args, on_gpu, out = parse_args(__doc__, "harmony")
    warnings.simplefilter("ignore")
    logging.getLogger("harmonypy").setLevel(logging.WARNING)
    import harmonypy
    from harmonypy.harmony import _physical_cores

    load_before = load_average()
    data = make_data(args.cells)
    subsample = np.sort(np.random.default_rng(1).choice(data.n_obs, min(LISI_CELLS, data.n_obs),
                                                        replace=False))
    threads = numba.get_num_threads()
    messages: list[str] = []
    scanpy.logging.info = lambda msg, *a, **k: messages.append(msg)  # our per-iteration lines
    calls = {
        # what sc.external.pp.harmony_integrate does, without its transpose of Z_corr (scanpy
        # 1.12.4 transposes harmonypy 2.x's cells x dims result and fails to store it)
        "harmonypy": lambda a: a.obsm.__setitem__("X_pca_harmony", harmonypy.run_harmony(
            a.obsm["X_pca"].astype(np.float64), a.obs, "batch", verbose=False,
            ncores=threads).Z_corr),
        "gpusc": lambda a: gpusc.pp.harmony_integrate(a, "batch", device=args.device,
                                                      ncores=threads),
    }
    for call in calls.values():  # warm-up on the full data: every numba variant, NVRTC, caches
        call(data.copy())
    times = {lib: [] for lib in calls}
    loads = []  # the 1-minute load average after each repeat: timings on a busy machine mislead
    outputs = {}
    for _ in range(args.repeats):  # alternated, so that both see the same load
        for lib, call in calls.items():
            a = data.copy()
            messages.clear()
            synchronize(on_gpu)
            start = time.perf_counter()
            call(a)
            synchronize(on_gpu)
            times[lib].append(time.perf_counter() - start)
            outputs[lib] = a.obsm["X_pca_harmony"]
        loads.append(os.getloadavg()[0])
    iterations_ours = sum("Harmony iteration" in m for m in messages)
    converged_ours = any("converged" in m for m in messages)
    reference = harmonypy.run_harmony(data.obsm["X_pca"], data.obs, "batch", verbose=False)
    ours = _our_result(data, args.device)  # not timed: the k-means passes of each iteration

    z = data.obsm["X_pca"]
    start_centroids = np.asarray(harmonypy.run_harmony(z, data.obs, "batch", verbose=False,
                                                       max_iter_harmony=0).Y).T
    same_start = data.copy()
    gpusc.pp.harmony_integrate(same_start, "batch", init_centroids=start_centroids,
                               device=args.device)
    correlation = float(np.corrcoef((same_start.obsm["X_pca_harmony"] - z).ravel(),
                                    (np.asarray(reference.Z_corr) - z).ravel())[0, 1])

    row = {"step": "harmony_integrate", "shape": list(z.shape)}
    for lib in calls:
        row[lib] = {"seconds": times[lib], "best": min(times[lib]),
                    **lisi(outputs[lib], data.obs, subsample)}
    row["harmonypy"] |= {"iterations": len(reference.objective_harmony) - 1,
                         "kmeans_rounds": list(reference.kmeans_rounds),
                         "last_objective": float(reference.objective_harmony[-1])}
    row["gpusc"] |= {"iterations": iterations_ours, "converged": converged_ours,
                     "kmeans_rounds": list(ours.kmeans_rounds),
                     "last_objective": float(ours.objective_harmony[-1])}
    row["load_average_per_repeat"] = loads
    row["before"] = lisi(z, data.obs, subsample)
    row["speedup"] = row["harmonypy"]["best"] / row["gpusc"]["best"]
    row["correction_correlation_same_start"] = correlation
    print(f"harmony  harmonypy {row['harmonypy']['best']:.3f} s  gpusc {row['gpusc']['best']:.3f} s"
          f"  {row['speedup']:.2f}x  iLISI {row['harmonypy']['iLISI']:.3f} / {row['gpusc']['iLISI']:.3f}"
          f"  cLISI {row['harmonypy']['cLISI']:.3f} / {row['gpusc']['cLISI']:.3f}"
          f"  corr(same start) {correlation:.6f}", flush=True)
    save(out, "harmony", args, on_gpu, load_before,
         {"description": f"{args.cells:,} cells model-drawn (gpusc.datasets.resample) from pbmc3k, "
                         f"groupby seurat_cell_type, seed 0; {N_BATCHES} batches at random, each "
                         "multiplying 5% of the genes by a LogNormal(0, 1) fold; scanpy "
                         "normalize_total, log1p, 2,000 HVGs, pca 50",
          "shape": list(z.shape),
          "batch_sizes": data.obs["batch"].value_counts().sort_index().to_dict(),
          "threads": threads, "harmonypy_default_threads": _physical_cores(),
          "harmonypy_version": harmonypy.__version__ if hasattr(harmonypy, "__version__") else None},
         "one warm-up call each on the full data, then --repeats calls alternating the libraries "
         "on fresh copies (best kept); copies not timed", [row])


if __name__ == "__main__":
    main()
