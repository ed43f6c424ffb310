"""``gpusc run``: the preprocessing pipeline on a counts .h5ad (or synthetic cells), timed step by step.

Usage::

    gpusc run [INPUT.h5ad] [--out DIR] [--device auto|gpu|cpu] [--n-obs N] [--seed S]
    python -m gpusc run ...

Without INPUT the data are ``gpusc.datasets.synthetic(n_obs=N or 20_000, n_vars=5_000)``;
with INPUT and ``--n-obs`` the input is replaced by N new cells drawn from a model of it
(``gpusc.datasets.resample``). Writes ``OUT/result.h5ad`` (host arrays) and
``OUT/report.json`` (per-step seconds and shapes, device, versions) and prints a table.

The pipeline is the table ``STEPS`` below: later steps (HVG, PCA, neighbors, UMAP, Leiden)
are appended there.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the command line or the input file: message, exit code 2."""


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable  # (adata, args) -> None, modifies adata in place
    what: str  # the call, for the report


def _qc(adata, args):
    import gpusc

    gpusc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], inplace=True)


def _filter_cells(adata, args):
    import gpusc

    gpusc.pp.filter_cells(adata, min_genes=args.min_genes)


def _filter_genes(adata, args):
    import gpusc

    gpusc.pp.filter_genes(adata, min_cells=args.min_cells)


def _normalize(adata, args):
    import gpusc

    gpusc.pp.normalize_total(adata)


def _log1p(adata, args):
    import gpusc

    gpusc.pp.log1p(adata)


STEPS: list[Step] = [
    Step("calculate_qc_metrics", _qc, "pp.calculate_qc_metrics(adata, qc_vars=['mt'], inplace=True)"),
    Step("filter_cells", _filter_cells, "pp.filter_cells(adata, min_genes=MIN_GENES)"),
    Step("filter_genes", _filter_genes, "pp.filter_genes(adata, min_cells=MIN_CELLS)"),
    Step("normalize_total", _normalize, "pp.normalize_total(adata)"),
    Step("log1p", _log1p, "pp.log1p(adata)"),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpusc", description="scanpy's preprocessing on the GPU (or CPU), timed.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline and write result.h5ad and report.json")
    run.add_argument("input", nargs="?", type=Path, help="counts .h5ad (raw integer counts in X); synthetic if omitted")
    run.add_argument("--out", type=Path, default=Path("gpusc-out"), help="output folder (default ./gpusc-out)")
    run.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                     help="auto: the GPU when cupy sees one (default)")
    run.add_argument("--n-obs", type=int, default=None,
                     help="cells: synthetic size (default 20000), or cells drawn from a model of INPUT")
    run.add_argument("--seed", type=int, default=0, help="seed of the synthetic or resampled data")
    run.add_argument("--groupby", default=None, help="obs column whose groups are modelled apart (with INPUT and --n-obs)")
    run.add_argument("--min-genes", type=int, default=100, help="filter_cells(min_genes=...) (default 100)")
    run.add_argument("--min-cells", type=int, default=3, help="filter_genes(min_cells=...) (default 3)")
    return parser


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "no GPU"
        return False


def _choose_device(requested: str) -> str:
    if requested == "cpu":
        return "cpu"
    if _gpu_available():
        return "gpu"
    if requested == "gpu":
        raise UsageError("--device gpu: no CUDA device is visible to cupy (is cupy installed? try --device cpu)")
    return "cpu"


def _check_counts(X, where: str) -> None:
    from scipy import sparse

    values = X.data if sparse.issparse(X) else np.asarray(X)
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or not np.all(values == np.round(values))):
        raise UsageError(
            f"{where} does not hold raw counts (it has negative, non-integer or non-finite values); "
            "gpusc run expects raw integer UMI counts in X (e.g. adata.X = adata.layers['counts'])"
        )


def _load(args):
    import anndata as ad

    from gpusc import datasets

    if args.input is None:
        n_obs = args.n_obs if args.n_obs is not None else 20_000
        adata = datasets.synthetic(n_obs=n_obs, n_vars=5_000, seed=args.seed)
        return adata, f"gpusc.datasets.synthetic(n_obs={n_obs}, n_vars=5000, seed={args.seed})"
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
    _check_counts(adata.X, f"{path}: X")
    description = f"{path} ({adata.n_obs} x {adata.n_vars})"
    if args.n_obs is not None:
        if args.groupby is not None and args.groupby not in adata.obs.columns:
            raise UsageError(f"--groupby {args.groupby!r} is not a column of obs: {list(adata.obs.columns)}")
        adata = datasets.resample(adata, args.n_obs, groupby=args.groupby, seed=args.seed)
        description = (f"{args.n_obs} cells model-drawn (gpusc.datasets.resample, groupby={args.groupby!r}, "
                       f"seed={args.seed}) from {description}")
    if "mt" not in adata.var.columns:
        adata.var["mt"] = adata.var_names.str.startswith("MT-")
    return adata, description


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("gpusc", "numpy", "scipy", "pandas", "anndata", "scanpy", "numba", "cupy", "cupy-cuda13x", "cupy-cuda12x"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _synchronize(device: str) -> None:
    if device == "gpu":
        import cupy

        cupy.cuda.Device().synchronize()


def _timed(device: str, fn, *a) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn(*a)
    _synchronize(device)
    return time.perf_counter() - start


def _table(rows: list[dict]) -> str:
    width = max(len(r["step"]) for r in rows)
    lines = [f"{'step':<{width}}  {'seconds':>9}  {'cells x genes':>17}"]
    lines += [f"{r['step']:<{width}}  {r['seconds']:>9.3f}  {r['n_obs']:>8,} x {r['n_vars']:<7,}" for r in rows]
    lines.append(f"{'total':<{width}}  {sum(r['seconds'] for r in rows):>9.3f}")
    return "\n".join(lines)


def run(args) -> dict:
    """The ``run`` command; returns the report it writes."""
    from tqdm.auto import tqdm

    import gpusc

    device = _choose_device(args.device)
    adata, description = _load(args)
    args.out.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []

    def record(name: str, seconds: float) -> None:
        rows.append({"step": name, "seconds": seconds, "n_obs": int(adata.n_obs), "n_vars": int(adata.n_vars)})

    if device == "gpu":
        record("anndata_to_GPU", _timed(device, gpusc.get.anndata_to_GPU, adata))
    for step in tqdm(STEPS, desc="gpusc run", unit="step", disable=None):
        record(step.name, _timed(device, step.run, adata, args))
    if device == "gpu":
        record("anndata_to_CPU", _timed(device, gpusc.get.anndata_to_CPU, adata))

    print(_table(rows))
    result = args.out / "result.h5ad"
    adata.write_h5ad(result)
    report = {
        "command": "gpusc run",
        "input": description,
        "device": device,
        "device_requested": args.device,
        "options": {"min_genes": args.min_genes, "min_cells": args.min_cells, "seed": args.seed, "n_obs": args.n_obs},
        "steps": rows,
        "calls": {s.name: s.what for s in STEPS},
        "total_seconds": sum(r["seconds"] for r in rows),
        "final_shape": [int(adata.n_obs), int(adata.n_vars)],
        "versions": _versions(),
        "platform": platform.platform(),
        "result": str(result),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {result} and {args.out / 'report.json'}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gpusc`` and ``python -m gpusc``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            run(args)
    except UsageError as err:
        print(f"gpusc: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
