"""Issue 11 item 3: pp.pca's Lanczos solver against scanpy 1.12's ARPACK and gpusc's Gram path,
in memory and on dask, on real data (pbmc3k: 2,700 cells, CSR float32, normalize_total + log1p).

Cases (50 components; the sides alternate within each repeat, the best of --repeats is kept
and the load average is recorded with every time):
  wide      all 13,714 genes: scanpy's default (ARPACK on the implicitly centred matrix),
            gpusc's default there (Lanczos, above GRAM_MAX_VARS genes); with --wide-gram also
            gpusc's Gram path forced (svd_solver="covariance_eigh": a 13,714² eigh, one run)
  hvg       scanpy's 2,000 highly variable genes (mask_var): scanpy's default (ARPACK),
            gpusc's default (Gram) and svd_solver="lanczos"
  dask      the 2,000 genes as a dask array of CSR chunks of --chunk cells: gpusc's Gram path
            and Lanczos on dask, and scanpy's own dask PCA (covariance eigh)

    python benchmarks/bench_pca_lanczos.py [--repeats 3] [--chunk 900] [--wide-gram] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import anndata as ad
import dask.array as da
import scanpy as sc

import gpusc

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GPUSC_DATA", ROOT / ".." / "shared" / "data")) / "pbmc3k_counts_labeled.h5ad"
N_COMPS = 50


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, os.getloadavg()[0]


def as_dask(x, rows):
    blocks = [x[a:a + rows] for a in range(0, x.shape[0], rows)]
    name = "bench-pca-dask"
    graph = {(name, i, 0): b for i, b in enumerate(blocks)}
    return da.Array(graph, name, chunks=(tuple(b.shape[0] for b in blocks), (x.shape[1],)), meta=blocks[0][:0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=900)
    parser.add_argument("--wide-gram", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu-dev-pca-lanczos.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    adata = ad.read_h5ad(DATA)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000)
    hvg = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    x_dask = as_dask(hvg.X, args.chunk)

    cases = {
        "wide": {
            "scanpy_arpack": lambda: sc.pp.pca(adata.X, N_COMPS),
            "gpusc_lanczos": lambda: gpusc.pp.pca(adata.X, N_COMPS),
        },
        "hvg": {
            "scanpy_arpack": lambda: sc.pp.pca(adata.copy(), N_COMPS),
            "gpusc_gram": lambda: gpusc.pp.pca(adata.copy(), N_COMPS),
            "gpusc_lanczos": lambda: gpusc.pp.pca(adata.copy(), N_COMPS, svd_solver="lanczos"),
        },
        "dask": {
            "scanpy_dask_cov_eigh": lambda: _scanpy_dask(x_dask),
            "gpusc_dask_gram": lambda: gpusc.pp.pca(x_dask, N_COMPS),
            "gpusc_dask_lanczos": lambda: gpusc.pp.pca(x_dask, N_COMPS, svd_solver="lanczos"),
        },
    }
    results = {}
    for case, sides in cases.items():
        for fn in sides.values():
            fn()  # warm-up: numba compilation, caches
        runs = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                runs[name].append(timed(fn))
        results[case] = {name: dict(best_s=min(t for t, _ in r), runs=[dict(seconds=t, load=ld) for t, ld in r])
                         for name, r in runs.items()}
        print(case, {name: round(v["best_s"], 3) for name, v in results[case].items()}, flush=True)
    if args.wide_gram:
        t, ld = timed(lambda: gpusc.pp.pca(adata.X, N_COMPS, svd_solver="covariance_eigh"))
        results["wide"]["gpusc_gram_forced"] = dict(best_s=t, runs=[dict(seconds=t, load=ld)])
        print("wide gram (one run)", round(t, 3), flush=True)
    record = dict(data="pbmc3k_counts_labeled.h5ad, normalize_total + log1p (real data)",
                  n_comps=N_COMPS, chunk_rows=args.chunk, repeats=args.repeats,
                  cpus=os.cpu_count(), results=results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print("written", args.out)


def _scanpy_dask(x_dask):
    a = ad.AnnData(x_dask)
    sc.pp.pca(a, N_COMPS)  # sparse dask: scanpy's covariance eigh (PCAEighDask)
    return a.obsm["X_pca"].compute()


if __name__ == "__main__":
    main()
