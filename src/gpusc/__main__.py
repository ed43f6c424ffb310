"""``gpusc run``: scanpy's standard pipeline on a counts .h5ad (or synthetic cells), timed step by step.

Usage::

    gpusc run [INPUT.h5ad] [--out DIR] [--device auto|gpu|cpu] [--n-obs N] [--seed S]
              [--n-top-genes 2000] [--resolution 1.0] [--min-genes 100] [--min-cells 3]
    gpusc bench ...   (see gpusc._bench)
    python -m gpusc run ...

Without INPUT the data are ``gpusc.datasets.synthetic(n_obs=N or 20_000, n_vars=5_000)``
(cell types known: ``obs['cell_type']``); with INPUT and ``--n-obs`` the input is replaced
by N new cells drawn from a model of it (``gpusc.datasets.resample``).

The pipeline is the table ``STEPS``, with scanpy's defaults: QC, filter_cells,
filter_genes, normalize_total, log1p, highly_variable_genes(n_top_genes), subset to the
highly variable genes (as scanpy's tutorial), scale(max_value=10), pca, neighbors, umap,
leiden(resolution). A step whose function gpusc does not have yet is listed as
"skipped (not in gpusc yet)". Writes ``OUT/result.h5ad`` (host arrays),
``OUT/report.json`` (per-step seconds, shapes, host peak RSS and device peak memory,
device, versions; the ARI of the Leiden clusters against the known cell types on
synthetic data) and ``OUT/umap.png`` (``sc.pl.umap`` coloured by cluster, when umap and
leiden ran), and prints a table. Errors in the command line or the input exit with 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXIT_USAGE = 2
SKIPPED = "skipped (not in gpusc yet)"
CLUSTER_KEY = "leiden"


class UsageError(Exception):
    """A problem with the command line or the input file: message, exit code 2."""


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable  # (gpusc, adata, args) -> None, modifies adata in place
    what: str  # the call, for the report
    module: str = "pp"  # gpusc.<module>.<attr> must exist for the step to run
    attr: str = ""

    def available(self) -> bool:
        import gpusc

        return hasattr(getattr(gpusc, self.module), self.attr or self.name)


def _subset_hv(g, adata, args) -> None:
    g.pp.filter_highly_variable(adata)


STEPS: list[Step] = [
    Step("calculate_qc_metrics", lambda g, a, args: g.pp.calculate_qc_metrics(a, qc_vars=["mt"], inplace=True),
         "pp.calculate_qc_metrics(adata, qc_vars=['mt'], inplace=True)"),
    Step("filter_cells", lambda g, a, args: g.pp.filter_cells(a, min_genes=args.min_genes),
         "pp.filter_cells(adata, min_genes=MIN_GENES)"),
    Step("filter_genes", lambda g, a, args: g.pp.filter_genes(a, min_cells=args.min_cells),
         "pp.filter_genes(adata, min_cells=MIN_CELLS)"),
    Step("normalize_total", lambda g, a, args: g.pp.normalize_total(a), "pp.normalize_total(adata)"),
    Step("log1p", lambda g, a, args: g.pp.log1p(a), "pp.log1p(adata)"),
    Step("highly_variable_genes", lambda g, a, args: g.pp.highly_variable_genes(a, n_top_genes=args.n_top_genes),
         "pp.highly_variable_genes(adata, n_top_genes=N_TOP_GENES)"),
    Step("filter_highly_variable", _subset_hv,
         "pp.filter_highly_variable(adata)  # = adata[:, adata.var.highly_variable], as scanpy's tutorial"),
    Step("scale", lambda g, a, args: g.pp.scale(a, max_value=10), "pp.scale(adata, max_value=10)"),
    Step("pca", lambda g, a, args: g.pp.pca(a), "pp.pca(adata)"),
    Step("neighbors", lambda g, a, args: g.pp.neighbors(a), "pp.neighbors(adata)"),
    Step("umap", lambda g, a, args: g.tl.umap(a), "tl.umap(adata)", module="tl"),
    Step("leiden", lambda g, a, args: g.tl.leiden(a, resolution=args.resolution),
         "tl.leiden(adata, resolution=RESOLUTION)", module="tl"),
]


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpusc", description="scanpy's pipeline on the GPU (or CPU), timed.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline; write result.h5ad, report.json and umap.png")
    run.add_argument("input", nargs="?", type=Path, help="counts .h5ad (raw integer counts in X); synthetic if omitted")
    run.add_argument("--out", type=Path, default=Path("gpusc-out"), help="output folder (default ./gpusc-out)")
    run.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                     help="auto: the GPU when cupy sees one (default)")
    run.add_argument("--n-obs", type=_positive(int), default=None,
                     help="cells: synthetic size (default 20000), or cells drawn from a model of INPUT")
    run.add_argument("--seed", type=int, default=0, help="seed of the synthetic or resampled data")
    run.add_argument("--groupby", default=None,
                     help="obs column of INPUT whose groups are modelled apart (with --n-obs); "
                          "the Leiden clusters' ARI is computed against it")
    run.add_argument("--min-genes", type=int, default=100, help="filter_cells(min_genes=...) (default 100)")
    run.add_argument("--min-cells", type=int, default=3, help="filter_genes(min_cells=...) (default 3)")
    run.add_argument("--n-top-genes", type=_positive(int), default=2000,
                     help="highly_variable_genes(n_top_genes=...) (default 2000)")
    run.add_argument("--resolution", type=_positive(float), default=1.0, help="leiden(resolution=...) (default 1.0)")
    from ._bench import add_parser

    add_parser(sub)
    return parser


def _choose_device(requested: str) -> str:
    from ._settings import gpu_available

    if requested == "cpu":
        return "cpu"
    if gpu_available():
        return "gpu"
    if requested == "gpu":
        raise UsageError("--device gpu: no CUDA device is visible to cupy (is cupy installed? try --device cpu)")
    return "cpu"


def _check_counts(X, where: str, layers=()) -> None:
    from scipy import sparse

    values = X.data if sparse.issparse(X) else np.asarray(X)
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or not np.all(values == np.round(values))):
        hint = ("; it has layers['counts']: write that into X" if "counts" in layers
                else " (e.g. adata.X = adata.layers['counts'])")
        raise UsageError(
            f"{where} does not hold raw counts (it has negative, non-integer or non-finite values); "
            f"gpusc run expects raw integer UMI counts in X{hint}"
        )


def _load(args):
    import anndata as ad

    from gpusc import datasets

    if args.input is None:
        if args.groupby is not None:
            raise UsageError("--groupby needs an INPUT file (synthetic data have obs['cell_type'])")
        n_obs = args.n_obs if args.n_obs is not None else 20_000
        adata = datasets.synthetic(n_obs=n_obs, n_vars=5_000, seed=args.seed)
        return adata, f"gpusc.datasets.synthetic(n_obs={n_obs}, n_vars=5000, seed={args.seed})", "cell_type"
    path = args.input
    if not path.exists():
        raise UsageError(f"input file not found: {path}")
    if path.is_dir() or path.suffix != ".h5ad":
        raise UsageError(f"input must be an .h5ad file: {path}")
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # a corrupt or non-HDF5 file
        raise UsageError(f"could not read {path} as .h5ad: {err}") from err
    if adata.X is None:
        raise UsageError(f"{path} has no X; gpusc run expects raw counts in X")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise UsageError(f"{path} is empty ({adata.n_obs} x {adata.n_vars})")
    _check_counts(adata.X, f"{path}: X", adata.layers.keys())
    if args.groupby is not None and args.groupby not in adata.obs.columns:
        raise UsageError(f"--groupby {args.groupby!r} is not a column of obs: {list(adata.obs.columns)}")
    description = f"{path} ({adata.n_obs} x {adata.n_vars})"
    if args.n_obs is not None:
        adata = datasets.resample(adata, args.n_obs, groupby=args.groupby, seed=args.seed)
        description = (f"{args.n_obs} cells model-drawn (gpusc.datasets.resample, groupby={args.groupby!r}, "
                       f"seed={args.seed}) from {description}")
    if "mt" not in adata.var.columns:
        adata.var["mt"] = adata.var_names.str.startswith("MT-")
    return adata, description, args.groupby


def _gib(nbytes) -> float | None:
    return None if nbytes is None else round(nbytes / 2**30, 3)


def _table(rows: list[dict]) -> str:
    width = max(len(r["step"]) for r in rows)
    lines = [f"{'step':<{width}}  {'seconds':>9}  {'cells x genes':>17}  {'host peak GiB':>13}  {'device peak GiB':>15}"]
    for r in rows:
        if r["status"] != "ran":
            lines.append(f"{r['step']:<{width}}  {r['status']}")
            continue
        host = "–" if r["host_peak_rss_gib"] is None else f"{r['host_peak_rss_gib']:.3f}"
        dev = "–" if r["device_peak_gib"] is None else f"{r['device_peak_gib']:.3f}"
        lines.append(f"{r['step']:<{width}}  {r['seconds']:>9.3f}  {r['n_obs']:>8,} x {r['n_vars']:<7,}"
                     f"  {host:>13}  {dev:>15}")
    lines.append(f"{'total':<{width}}  {sum(r['seconds'] or 0 for r in rows):>9.3f}")
    return "\n".join(lines)


def _umap_png(adata, path: Path, labels: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    color = [CLUSTER_KEY] + ([labels] if labels is not None and labels in adata.obs.columns else [])
    sc.pl.umap(adata, color=color, show=False)
    fig = plt.gcf()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run(args) -> dict:
    """The ``run`` command; returns the report it writes."""
    from tqdm.auto import tqdm

    import gpusc

    from ._bench import DevicePeak, PeakRSS, machine, synchronize, versions

    device = _choose_device(args.device)
    adata, description, labels = _load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    on_gpu = device == "gpu"

    rows: list[dict] = []

    def timed(name: str, fn) -> None:
        with DevicePeak(on_gpu) as dev, PeakRSS() as rss:
            synchronize(on_gpu)
            start = time.perf_counter()
            fn()
            synchronize(on_gpu)
            seconds = time.perf_counter() - start
        rows.append({"step": name, "status": "ran", "seconds": seconds, "n_obs": int(adata.n_obs),
                     "n_vars": int(adata.n_vars), "host_peak_rss_gib": _gib(rss.peak),
                     "device_peak_gib": _gib(dev.peak)})

    settings_before = gpusc.settings.device
    gpusc.settings.device = device  # neighbors/umap/leiden (host obsm/obsp in) run where --device says
    try:
        if on_gpu:
            timed("anndata_to_GPU", lambda: gpusc.get.anndata_to_GPU(adata))
        for step in tqdm(STEPS, desc="gpusc run", unit="step", disable=None):
            if not step.available():
                rows.append({"step": step.name, "status": SKIPPED, "seconds": None, "n_obs": None, "n_vars": None,
                             "host_peak_rss_gib": None, "device_peak_gib": None})
                continue
            timed(step.name, lambda step=step: step.run(gpusc, adata, args))
        if on_gpu:
            timed("anndata_to_CPU", lambda: gpusc.get.anndata_to_CPU(adata))
    finally:
        gpusc.settings.device = settings_before

    print(_table(rows))
    ran = {r["step"] for r in rows if r["status"] == "ran"}
    skipped = [r["step"] for r in rows if r["status"] != "ran"]
    result = args.out / "result.h5ad"
    adata.write_h5ad(result)

    ari = None
    if "leiden" in ran and labels is not None and labels in adata.obs.columns:
        from sklearn.metrics import adjusted_rand_score

        ari = {"labels": labels, "cluster_key": CLUSTER_KEY,
               "ari": float(adjusted_rand_score(adata.obs[labels], adata.obs[CLUSTER_KEY])),
               "n_clusters": int(adata.obs[CLUSTER_KEY].nunique()), "n_labels": int(adata.obs[labels].nunique())}
        print(f"ARI of the Leiden clusters against obs[{labels!r}]: {ari['ari']:.3f} "
              f"({ari['n_clusters']} clusters, {ari['n_labels']} labels)")
    plot, plot_note = None, None
    if {"umap", "leiden"} <= ran:
        plot = args.out / "umap.png"
        _umap_png(adata, plot, labels)
    else:
        missing = [f"gpusc.tl.{s}" for s in ("umap", "leiden") if s not in ran]
        plot_note = f"no UMAP plot: {', '.join(missing)} did not run ({SKIPPED})"
        print(plot_note)
    timed_rows = [r for r in rows if r["status"] == "ran"]
    report = {
        "command": "gpusc " + " ".join(getattr(args, "argv", [])),
        "input": description,
        "device": device,
        "device_requested": args.device,
        "options": {"min_genes": args.min_genes, "min_cells": args.min_cells, "seed": args.seed,
                    "n_obs": args.n_obs, "n_top_genes": args.n_top_genes, "resolution": args.resolution,
                    "groupby": args.groupby},
        "steps": rows,
        "skipped": skipped,
        "calls": {s.name: s.what for s in STEPS},
        "total_seconds": sum(r["seconds"] for r in timed_rows),
        "timing_note": ("one call per step, as a user runs it: seconds include first-call numba/NVRTC "
                        "compilation (gpusc bench excludes it)"),
        "host_peak_rss_gib": max((r["host_peak_rss_gib"] for r in timed_rows if r["host_peak_rss_gib"] is not None),
                                 default=None),
        "device_peak_gib": max((r["device_peak_gib"] for r in timed_rows if r["device_peak_gib"] is not None),
                               default=None),
        "final_shape": [int(adata.n_obs), int(adata.n_vars)],
        "ari": ari,
        "plot": None if plot is None else str(plot),
        "plot_note": plot_note,
        "machine": machine(on_gpu),
        "versions": versions(),
        "platform": platform.platform(),
        "result": str(result),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {result}, {args.out / 'report.json'}" + (f", {plot}" if plot else ""))
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gpusc`` and ``python -m gpusc``; returns the exit code (2: usage or input errors)."""
    from ._bench import BenchError

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: unknown option or bad value (2), --help (0)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "run":
            run(args)
        elif args.command == "bench":
            from ._bench import run_bench

            run_bench(args)
    except (UsageError, BenchError) as err:
        print(f"gpusc: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
