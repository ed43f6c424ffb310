"""``gpusc run``: scanpy's standard pipeline on raw counts (or synthetic cells), timed step by step.

Usage::

    gpusc run [INPUT] [--out DIR] [--device auto|gpu|cpu] [--n-obs N] [--seed S]
              [--groupby COL] [--batch-key COL] [--qc-vars mt,ribo,hb]
              [--n-top-genes 2000] [--resolution 1.0] [--min-genes 100] [--min-cells 3]
              [--chunk-size N [--gpus K] [--memory-limit SIZE]]
    gpusc bench ...   (see gpusc._bench)
    python -m gpusc run ...

INPUT is raw counts as an .h5ad file, a .zarr store, a 10x Cell Ranger .h5 file or a 10x
folder (``matrix.mtx[.gz]`` with ``features.tsv[.gz]``/``genes.tsv`` and
``barcodes.tsv[.gz]``), read with anndata's and scanpy's readers. Without INPUT the data
are ``gpusc.datasets.synthetic(n_obs=N or 20_000, n_vars=5_000)`` (cell types known:
``obs['cell_type']``; drawn once, then read back from ``$GPUSC_CACHE_DIR``, else
``~/.cache/gpusc``); with INPUT and ``--n-obs`` the input is replaced by N new cells
drawn from a model of it (``gpusc.datasets.resample``).

The pipeline is the table ``STEPS``, with scanpy's defaults: QC, filter_cells,
filter_genes, normalize_total, log1p, highly_variable_genes(n_top_genes), ``adata.raw``
and the subset to the highly variable genes (as scanpy's tutorial), scale(max_value=10),
pca, neighbors, umap (gpusc's deterministic optimiser: the CUDA kernel, or its numba twin
on the CPU), leiden (igraph's, scanpy's coming default), rank_genes_groups of the
clusters. A step whose function gpusc does not have is listed as "skipped (not in gpusc
yet)". Writes ``OUT/result.h5ad`` (host arrays), ``OUT/report.json`` (per-step seconds,
numba compilation seconds, shapes, host peak RSS and device peak memory, warnings, device,
versions; the ARI of the Leiden clusters against the known labels), ``OUT/report.html``
(one self-contained page: the table, QC violins with the thresholds, the HVG plot, PCA
variance ratio, UMAPs, marker genes; see :mod:`gpusc._report`) and ``OUT/umap.png``, and
prints the table. Errors in the command line or the input are one line on stderr and exit
code 2.

Out of core (``--chunk-size N``): X is read lazily in chunks of N cells with anndata's
reader (:mod:`gpusc._outofcore`; .h5ad or .zarr input) and every step runs on a
dask.distributed cluster (a LocalCluster of one worker per core, or a dask-cuda
LocalCUDACluster of ``--gpus K`` GPUs), whose dashboard address is printed. Element-wise
steps stay lazy, so their rows show little time and the pass over the data is counted in
the step that synchronises (the statistics of QC, filtering, HVG, scale, PCA); the table,
report and plot are those of the in-memory run.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import io
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXIT_USAGE = 2
SKIPPED = "skipped (not in gpusc yet)"
CLUSTER_KEY = "leiden"
N_SYNTHETIC = 20_000

# --qc-vars names that need no column in var: flags from the gene symbols, upper-cased so
# that mouse symbols (mt-Nd1, Rps3, Hba-a1) match too; as scanpy's tutorial defines them.
KNOWN_QC_VARS = {
    "mt": ("mitochondrial: MT-", lambda names: names.str.startswith("MT-")),
    "ribo": ("ribosomal: RPS, RPL", lambda names: names.str.startswith(("RPS", "RPL"))),
    "hb": ("haemoglobin: ^HB[^(P)]", lambda names: names.str.contains("^HB[^(P)]", regex=True)),
}

EXAMPLES = """\
examples:
  gpusc run                                     20,000 synthetic cells (known cell types)
  gpusc run pbmc3k.h5ad --groupby louvain       raw counts in an .h5ad; UMAP also coloured by obs['louvain']
  gpusc run filtered_feature_bc_matrix.h5       a 10x Cell Ranger .h5 file
  gpusc run filtered_feature_bc_matrix/         a 10x folder: matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz
  gpusc run cells.zarr --batch-key sample       an anndata .zarr store; highly variable genes per batch
  gpusc run cells.h5ad --qc-vars mt,ribo,hb     % of counts in mitochondrial, ribosomal, haemoglobin genes
  gpusc run cells.h5ad --qc-vars mt,ercc=ERCC-  NAME=PREFIX flags the genes whose names start with PREFIX
  gpusc run cells.h5ad --n-obs 200000 --groupby cell_type
                                                200,000 new cells drawn from a model of each cell type
  gpusc run atlas.zarr --chunk-size 50000 --memory-limit 6GiB
                                                out of core: X read 50,000 cells at a time on a dask
                                                LocalCluster (one worker per core, 6 GiB in all)
  gpusc run atlas.zarr --chunk-size 200000 --gpus 2
                                                out of core on a dask-cuda cluster of two GPUs

Writes OUT/result.h5ad, OUT/report.json, OUT/report.html (open it in a browser) and OUT/umap.png.
Errors in the arguments or the input: one line on stderr, exit code 2.
"""


class UsageError(Exception):
    """A problem with the command line or the input file: message, exit code 2."""


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable  # (gpusc, adata, args) -> None, modifies adata in place
    what: str  # the call, for the report
    module: str = "pp"  # gpusc.<module>.<attr> must exist for the step to run
    attr: str = ""
    skip_if: Callable | None = None  # (adata) -> the reason to skip, or None

    def available(self) -> bool:
        import gpusc

        return hasattr(getattr(gpusc, self.module), self.attr or self.name)


def _raw_and_subset_hv(g, adata, args) -> None:
    adata.raw = adata  # log-normalised, every gene: what rank_genes_groups reads (a host copy on the GPU)
    g.pp.filter_highly_variable(adata)


def _one_cluster(adata) -> str | None:
    if CLUSTER_KEY in adata.obs and adata.obs[CLUSTER_KEY].nunique() < 2:
        return "skipped (one Leiden cluster: no groups to compare)"
    return None


STEPS: list[Step] = [
    Step("calculate_qc_metrics",
         lambda g, a, args: g.pp.calculate_qc_metrics(a, qc_vars=args.qc_var_keys, inplace=True),
         "pp.calculate_qc_metrics(adata, qc_vars=QC_VARS, inplace=True)"),
    Step("filter_cells", lambda g, a, args: g.pp.filter_cells(a, min_genes=args.min_genes),
         "pp.filter_cells(adata, min_genes=MIN_GENES)"),
    Step("filter_genes", lambda g, a, args: g.pp.filter_genes(a, min_cells=args.min_cells),
         "pp.filter_genes(adata, min_cells=MIN_CELLS)"),
    Step("normalize_total", lambda g, a, args: g.pp.normalize_total(a), "pp.normalize_total(adata)"),
    Step("log1p", lambda g, a, args: g.pp.log1p(a), "pp.log1p(adata)"),
    Step("highly_variable_genes",
         lambda g, a, args: g.pp.highly_variable_genes(a, n_top_genes=args.n_top_genes, batch_key=args.batch_key),
         "pp.highly_variable_genes(adata, n_top_genes=N_TOP_GENES, batch_key=BATCH_KEY)"),
    Step("filter_highly_variable", _raw_and_subset_hv,
         "adata.raw = adata; pp.filter_highly_variable(adata)  # as scanpy's tutorial: raw keeps every gene "
         "for the marker genes, X the highly variable ones"),
    Step("scale", lambda g, a, args: g.pp.scale(a, max_value=10), "pp.scale(adata, max_value=10)"),
    Step("pca", lambda g, a, args: g.pp.pca(a), "pp.pca(adata)"),
    Step("neighbors", lambda g, a, args: g.pp.neighbors(a), "pp.neighbors(adata)"),
    Step("umap", lambda g, a, args: g.tl.umap(a, method="gpusc"),
         "tl.umap(adata, method='gpusc')  # gpusc's deterministic optimiser: CUDA, or its numba twin on the CPU",
         module="tl"),
    Step("leiden",
         lambda g, a, args: g.tl.leiden(a, resolution=args.resolution, flavor="igraph", n_iterations=2,
                                        directed=False),
         "tl.leiden(adata, resolution=RESOLUTION, flavor='igraph', n_iterations=2, directed=False)"
         "  # scanpy's coming default", module="tl"),
    Step("rank_genes_groups", lambda g, a, args: g.tl.rank_genes_groups(a, CLUSTER_KEY),
         f"tl.rank_genes_groups(adata, {CLUSTER_KEY!r})  # t-test on adata.raw", module="tl", skip_if=_one_cluster),
]


# ---------------------------------------------------------------- command line


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


def _qc_var_list(text: str) -> list[str]:
    specs = [s.strip() for s in text.split(",") if s.strip()]
    for spec in specs:
        name, eq, prefixes = spec.partition("=")
        if not name or (eq and not all(prefixes.split("|"))):
            raise argparse.ArgumentTypeError(f"expected NAME or NAME=PREFIX[|PREFIX...] items, got {spec!r}")
    return specs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpusc", description="scanpy's pipeline on the GPU (or CPU), timed.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline; write result.h5ad, report.json, report.html and umap.png",
                         description="scanpy's standard pipeline on raw counts, timed step by step, "
                                     "with an HTML report.",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("input", nargs="?", type=Path,
                     help="raw counts: .h5ad, .zarr, a 10x .h5, or a 10x folder (matrix.mtx); synthetic if omitted")
    run.add_argument("--out", type=Path, default=Path("gpusc-out"), help="output folder (default ./gpusc-out)")
    run.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                     help="auto: the GPU when cupy sees one (default)")
    run.add_argument("--n-obs", type=_positive(int), default=None,
                     help=f"cells: synthetic size (default {N_SYNTHETIC}), or cells drawn from a model of INPUT")
    run.add_argument("--seed", type=int, default=0, help="seed of the synthetic or resampled data")
    run.add_argument("--groupby", default=None,
                     help="obs column of INPUT (e.g. cell types): the UMAP is also coloured by it, the Leiden "
                          "clusters' ARI is computed against it, and with --n-obs its groups are modelled apart")
    run.add_argument("--batch-key", default=None,
                     help="obs column of batches: highly_variable_genes(batch_key=...) selects genes per batch; "
                          "the UMAP is also coloured by it")
    run.add_argument("--qc-vars", type=_qc_var_list, default=["mt"],
                     help="comma list for calculate_qc_metrics(qc_vars=...): a boolean var column, one of "
                          + ", ".join(f"{k} ({d})" for k, (d, _) in KNOWN_QC_VARS.items())
                          + ", or NAME=PREFIX[|PREFIX] to flag gene names starting with PREFIX (default mt)")
    run.add_argument("--min-genes", type=int, default=100, help="filter_cells(min_genes=...) (default 100)")
    run.add_argument("--min-cells", type=int, default=3, help="filter_genes(min_cells=...) (default 3)")
    run.add_argument("--n-top-genes", type=_positive(int), default=2000,
                     help="highly_variable_genes(n_top_genes=...) (default 2000)")
    run.add_argument("--resolution", type=_positive(float), default=1.0, help="leiden(resolution=...) (default 1.0)")
    run.add_argument("--chunk-size", type=_positive(int), default=None,
                     help="out of core: read X lazily in chunks of this many cells (.h5ad or .zarr INPUT, or "
                          "the synthetic data) and run on a dask.distributed cluster")
    run.add_argument("--gpus", type=_positive(int), default=None,
                     help="with --chunk-size: a dask-cuda LocalCUDACluster of this many GPUs (RMM pool)")
    run.add_argument("--memory-limit", default=None,
                     help="with --chunk-size: the dask workers' memory limit in all (e.g. 6GiB), shared equally")
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


# ---------------------------------------------------------------- input


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


def _is_10x_folder(path: Path) -> bool:
    return (path / "matrix.mtx.gz").is_file() or (path / "matrix.mtx").is_file()


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (path / ".zattrs").is_file() or (path / "zarr.json").is_file()


def read_counts(path: Path):
    """The AnnData in ``path`` and what it was read as: .h5ad, .zarr, a 10x .h5 or a 10x folder."""
    import anndata as ad

    if not path.exists():
        raise UsageError(f"input not found: {path}")
    if path.is_file() and path.name in ("matrix.mtx", "matrix.mtx.gz"):
        path = path.parent  # the matrix file of a 10x folder: read the folder
    if path.is_dir() and _is_10x_folder(path):
        kind = "10x folder"
        gz = (path / "matrix.mtx.gz").is_file()  # Cell Ranger 3+ gzips; 2 (genes.tsv) does not

        def read():
            import scanpy as sc  # its readers of 10x files (imported here only: .h5ad and .zarr need none)

            # scanpy 1.11 (Python 3.11) has no `compressed`: it reads Cell Ranger 3's gzipped files
            if "compressed" in inspect.signature(sc.read_10x_mtx).parameters:
                return sc.read_10x_mtx(path, compressed=gz)
            return sc.read_10x_mtx(path)
    elif path.is_dir() and _is_zarr(path):
        kind = ".zarr"

        def read():
            return ad.read_zarr(path)
    elif path.is_file() and path.suffix == ".h5ad":
        kind = ".h5ad"

        def read():
            return ad.read_h5ad(path)
    elif path.is_file() and path.suffix == ".h5":
        kind = "10x .h5"

        def read():
            import scanpy as sc

            return sc.read_10x_h5(path)
    else:
        raise UsageError(f"input must be an .h5ad file, a .zarr store, a 10x .h5 file or a 10x folder with "
                         f"matrix.mtx[.gz]: {path}")
    try:
        with warnings.catch_warnings():  # 10x gene symbols repeat; made unique below, as scanpy's tutorial
            warnings.filterwarnings("ignore", message=r"Variable names are not unique")
            adata = read()
    except Exception as err:  # a corrupt file, a missing features.tsv, an HDF5 file of another layout
        message = " ".join(str(err).split()) or type(err).__name__
        raise UsageError(f"could not read {path} as {kind}: {message}") from err
    if kind.startswith("10x"):
        adata.var_names_make_unique()
    return adata, kind


def _qc_flags(adata, specs: list[str]) -> dict[str, int]:
    """Resolve ``--qc-vars`` into boolean var columns (all checked before any is written);
    returns the number of genes flagged per name."""
    import pandas as pd

    columns = {}
    upper = pd.Index(adata.var_names.astype(str).str.upper())
    for spec in specs:
        name, eq, prefixes = spec.partition("=")
        if eq:
            columns[name] = np.asarray(adata.var_names.astype(str).str.startswith(tuple(prefixes.split("|"))))
        elif name in adata.var.columns:
            if adata.var[name].dtype != bool:
                raise UsageError(f"--qc-vars {name!r}: var[{name!r}] is {adata.var[name].dtype}, not boolean; "
                                 f"give NAME=PREFIX to flag genes by name instead")
        elif name in KNOWN_QC_VARS:
            columns[name] = np.asarray(KNOWN_QC_VARS[name][1](upper))
        else:
            raise UsageError(f"--qc-vars {name!r} is not a boolean column of var, nor one of "
                             f"{', '.join(KNOWN_QC_VARS)}; give {name}=PREFIX to flag the genes whose names "
                             f"start with PREFIX")
    for name, flags in columns.items():
        adata.var[name] = flags
    return {name.partition("=")[0]: int(adata.var[name.partition("=")[0]].sum()) for name in specs}


def _obs_column(adata, option: str, key: str | None, where: str) -> None:
    if key is not None and key not in adata.obs.columns:
        shown = list(adata.obs.columns[:20]) + (["..."] if len(adata.obs.columns) > 20 else [])
        raise UsageError(f"{option} {key!r} is not a column of obs in {where}; obs has {shown}")


@dataclass
class Loaded:
    adata: object
    description: str
    labels: str | None  # obs column the clusters are scored against (ARI) and the UMAP coloured by
    qc_var_genes: dict[str, int]


def _cache_folder() -> Path:
    """Where gpusc run keeps the synthetic cells it drew: $GPUSC_CACHE_DIR, else
    $XDG_CACHE_HOME/gpusc, else ~/.cache/gpusc."""
    if os.environ.get("GPUSC_CACHE_DIR"):
        return Path(os.environ["GPUSC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpusc"


def _synthetic(n_obs: int, seed: int):
    """``gpusc.datasets.synthetic(n_obs, 5000, seed=seed)``, drawn once, written to
    :func:`_cache_folder` and read back from there, also the first time (20,000 cells: 1.5-2 s
    to draw, 0.1 s to read). The file's name holds the arguments and a hash of the sampler's
    sources, so a changed model draws anew; a folder that cannot be written just means drawing
    every time."""
    import hashlib

    import anndata as ad

    from gpusc import datasets

    sources = sorted(Path(datasets.__file__).parent.glob("*.py"))
    model = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    path = _cache_folder() / f"synthetic-{n_obs}x5000-seed{seed}-{model}.h5ad"
    if path.is_file():
        try:
            return ad.read_h5ad(path)
        except OSError:  # a damaged file (e.g. a full disk when it was written): draw again
            path.unlink(missing_ok=True)
    adata = datasets.synthetic(n_obs=n_obs, n_vars=5_000, seed=seed)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with ad.settings.override(allow_write_nullable_strings=True):  # as result.h5ad below
            adata.write_h5ad(partial)
        os.replace(partial, path)  # whole or not at all, also with two runs at once
    except OSError:
        partial.unlink(missing_ok=True)
        return adata
    # what the next run reads (anndata writes var's strings as categories, uns lists as arrays),
    # so that the first run and the next ones start from the same AnnData
    return ad.read_h5ad(path)


def _load(args) -> Loaded:
    from gpusc import datasets

    if args.input is None:
        if args.groupby is not None:
            raise UsageError("--groupby needs an INPUT file (synthetic data have obs['cell_type'])")
        n_obs = args.n_obs if args.n_obs is not None else N_SYNTHETIC
        adata = _synthetic(n_obs, args.seed)
        description = f"gpusc.datasets.synthetic(n_obs={n_obs}, n_vars=5000, seed={args.seed})"
        labels = "cell_type"
        _obs_column(adata, "--batch-key", args.batch_key, "the synthetic data")
    else:
        path = args.input
        lazy = args.chunk_size is not None and args.n_obs is None
        adata, kind = _read_lazy_counts(path, args.chunk_size) if lazy else read_counts(path)
        if adata.X is None:
            raise UsageError(f"{path} has no X; gpusc run expects raw counts in X")
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise UsageError(f"{path} is empty ({adata.n_obs} x {adata.n_vars})")
        # out of core: the first chunk stands for the rest (reading all would be a pass of its own)
        _check_counts(adata.X.blocks[0].compute() if lazy else adata.X, f"{path}: X", adata.layers.keys())
        _obs_column(adata, "--groupby", args.groupby, str(path))
        _obs_column(adata, "--batch-key", args.batch_key, str(path))
        description = f"{path} ({kind}, {adata.n_obs} x {adata.n_vars})"
        labels = args.groupby
        if args.n_obs is not None:
            adata = datasets.resample(adata, args.n_obs, groupby=args.groupby, seed=args.seed)
            description = (f"{args.n_obs} cells model-drawn (gpusc.datasets.resample, groupby={args.groupby!r}, "
                           f"seed={args.seed}) from {description}")
            _obs_column(adata, "--batch-key", args.batch_key,
                        f"the cells drawn with --n-obs (they keep obs[{args.groupby!r}] only: give the batch "
                        f"column as --groupby)")
    if args.chunk_size is not None and not _is_dask(adata.X):  # synthetic or resampled cells
        import dask.array as da

        adata.X = da.from_array(adata.X, chunks=(args.chunk_size, -1))
    qc_var_genes = _qc_flags(adata, args.qc_vars)
    args.qc_var_keys = list(qc_var_genes)
    return Loaded(adata, description, labels, qc_var_genes)


class _NoCluster:
    def close(self) -> None:
        pass


def _dask_cluster(args):
    """With --chunk-size: the started dask.distributed cluster (its dashboard printed) and
    ``close()`` to stop it; else nothing to close."""
    if args.chunk_size is None:
        return _NoCluster()
    from contextlib import ExitStack

    from ._outofcore import cluster

    stack = ExitStack()
    client = stack.enter_context(cluster(args.gpus, args.memory_limit))
    print(f"dask dashboard: {client.dashboard_link} ({len(client.scheduler_info()['workers'])} workers)")
    return stack


def _is_dask(x) -> bool:
    from ._core.dask import is_dask

    return is_dask(x)


def _read_lazy_counts(path: Path, chunk_size: int):
    """``read_counts`` out of core: X a dask array of ``chunk_size`` cells per chunk."""
    from ._outofcore import read_lazy

    if not path.exists():
        raise UsageError(f"input not found: {path}")
    kind = ".h5ad" if path.is_file() and path.suffix == ".h5ad" else ".zarr" if path.is_dir() and _is_zarr(path) else None
    if kind is None:
        raise UsageError(f"--chunk-size reads an .h5ad file or a .zarr store lazily; convert {path} to one "
                         "first (scanpy's readers, then adata.write_zarr)")
    try:
        adata = read_lazy(path, chunk_size)
    except Exception as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise UsageError(f"could not read {path} lazily as {kind}: {message}") from err
    return adata, f"{kind}, read lazily in chunks of {chunk_size} cells"


# ---------------------------------------------------------------- run


def _gib(nbytes) -> float | None:
    return None if nbytes is None else round(nbytes / 2**30, 3)


def _table(rows: list[dict]) -> str:
    width = max(len(r["step"]) for r in rows)
    lines = [(f"{'step':<{width}}  {'seconds':>9}  {'compile s':>9}  {'cells x genes':>17}  {'host peak GiB':>13}"
              f"  {'device peak GiB':>15}")]
    for r in rows:
        if r["status"] != "ran":
            lines.append(f"{r['step']:<{width}}  {r['status']}")
            continue
        host = "–" if r["host_peak_rss_gib"] is None else f"{r['host_peak_rss_gib']:.3f}"
        dev = "–" if r["device_peak_gib"] is None else f"{r['device_peak_gib']:.3f}"
        lines.append(f"{r['step']:<{width}}  {r['seconds']:>9.3f}  {r['numba_compile_seconds']:>9.3f}"
                     f"  {r['n_obs']:>8,} x {r['n_vars']:<7,}  {host:>13}  {dev:>15}")
    lines.append(f"{'total':<{width}}  {sum(r['seconds'] or 0 for r in rows):>9.3f}"
                 f"  {sum(r['numba_compile_seconds'] or 0 for r in rows):>9.3f}")
    return "\n".join(lines)


def _numba_cache() -> str:
    """Where numba keeps gpusc's compiled kernels (numba's own choice: NUMBA_CACHE_DIR, else the
    package's __pycache__ when writable, else the user cache folder)."""
    try:
        from ._kernels import qc

        return str(qc._qc_host._cache._cache_path)  # numba's FunctionCache (private attribute)
    except AttributeError:  # another numba layout: say what numba documents
        return "numba's default (NUMBA_CACHE_DIR, else __pycache__ next to the sources, else the user cache dir)"


def run(args) -> dict:
    """The ``run`` command; returns the report it writes."""
    from ._bench import NumbaCompiles
    from ._compile_ahead import Ahead

    with NumbaCompiles() as compiles, Ahead() as ahead:
        return _run(args, compiles, ahead)


def _run(args, compiles, ahead) -> dict:
    from tqdm.auto import tqdm

    import gpusc

    from . import _report
    from ._bench import DevicePeak, PeakRSS, machine, synchronize, versions

    started = time.perf_counter()
    device = _choose_device(args.device)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    if args.chunk_size is None and (args.gpus is not None or args.memory_limit is not None):
        raise UsageError("--gpus and --memory-limit set up the dask cluster of --chunk-size; add --chunk-size N")
    if args.gpus is not None and device != "gpu":
        raise UsageError("--gpus K runs on GPUs: no CUDA device is visible (or --device cpu was given)")
    if device == "cpu" and args.chunk_size is None:  # (out of core, the dask workers compile)
        ahead.start()  # on a cold numba cache: the later steps' kernels compiled on the other core
    loaded = _load(args)
    adata = loaded.adata
    load_seconds, load_compile_seconds = time.perf_counter() - started, compiles.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    on_gpu = device == "gpu"

    rows: list[dict] = []
    snapshots = _report.Snapshots()

    def timed(name: str, fn) -> None:
        compiled_before = compiles.seconds
        with warnings.catch_warnings(record=True) as caught, DevicePeak(on_gpu) as dev, PeakRSS() as rss:
            synchronize(on_gpu)
            start = time.perf_counter()
            fn()
            synchronize(on_gpu)
            seconds = time.perf_counter() - start
        said = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
        rows.append({"step": name, "status": "ran", "seconds": seconds,
                     "numba_compile_seconds": round(compiles.seconds - compiled_before, 3),
                     "n_obs": int(adata.n_obs), "n_vars": int(adata.n_vars), "host_peak_rss_gib": _gib(rss.peak),
                     "device_peak_gib": _gib(dev.peak), "warnings": said})
        snapshots.after(name, adata)

    def not_run(name: str, status: str) -> None:
        rows.append({"step": name, "status": status, "seconds": None, "numba_compile_seconds": None,
                     "n_obs": None, "n_vars": None, "host_peak_rss_gib": None, "device_peak_gib": None,
                     "warnings": []})

    settings_before = gpusc.settings.device
    gpusc.settings.device = device  # neighbors/umap/leiden (host obsm/obsp in) run where --device says
    dask_client = _dask_cluster(args)
    try:
        if on_gpu:
            timed("anndata_to_GPU", lambda: gpusc.get.anndata_to_GPU(adata))
        for step in tqdm(STEPS, desc="gpusc run", unit="step", disable=None):
            reason = SKIPPED if not step.available() else step.skip_if(adata) if step.skip_if else None
            if reason:
                not_run(step.name, reason)
                continue
            timed(step.name, lambda step=step: step.run(gpusc, adata, args))
        if on_gpu:
            timed("anndata_to_CPU", lambda: gpusc.get.anndata_to_CPU(adata))
    finally:
        gpusc.settings.device = settings_before
        dask_client.close()
    ahead.finish()

    print(_table(rows))
    for r in rows:
        for said in r["warnings"]:
            print(f"warning in {r['step']}: {said}")
    ran = {r["step"] for r in rows if r["status"] == "ran"}
    labels = loaded.labels

    ari = None
    if "leiden" in ran and labels is not None and labels in adata.obs.columns:
        known = adata.obs[labels].notna().to_numpy()  # cells without a label are not scored
        ari = {"labels": labels, "cluster_key": CLUSTER_KEY,
               "ari": _report.adjusted_rand_index(adata.obs[labels][known], adata.obs[CLUSTER_KEY][known]),
               "n_clusters": int(adata.obs[CLUSTER_KEY].nunique()), "n_labels": int(adata.obs[labels].nunique())}
        print(f"ARI of the Leiden clusters against obs[{labels!r}]: {ari['ari']:.3f} "
              f"({ari['n_clusters']} clusters, {ari['n_labels']} labels)")

    write_started = time.perf_counter()
    result = args.out / "result.h5ad"
    _write_h5ad(adata, result)
    write_seconds = time.perf_counter() - write_started

    timed_rows = [r for r in rows if r["status"] == "ran"]
    report = {
        "command": "gpusc " + " ".join(getattr(args, "argv", [])),
        "input": loaded.description,
        "device": device,
        "device_requested": args.device,
        "options": {"min_genes": args.min_genes, "min_cells": args.min_cells, "seed": args.seed,
                    "n_obs": args.n_obs, "n_top_genes": args.n_top_genes, "resolution": args.resolution,
                    "groupby": args.groupby, "batch_key": args.batch_key, "qc_vars": args.qc_var_keys,
                    "qc_var_genes": loaded.qc_var_genes},
        "steps": rows,
        "skipped": [r["step"] for r in rows if r["status"] != "ran"],
        "calls": {s.name: s.what for s in STEPS},
        "total_seconds": sum(r["seconds"] for r in timed_rows),
        "timing_note": ("one call per step, as a user runs it: seconds include first-call numba/NVRTC "
                        "compilation (numba's share in its own column; numba caches what it compiled on "
                        "disk for the next run); gpusc bench excludes it"),
        "load_seconds": load_seconds,
        "write_seconds": write_seconds,
        "report_seconds": None,  # set below, once the page is written
        "run_seconds": None,
        "numba": {"compile_seconds": None, "load_compile_seconds": round(load_compile_seconds, 3),
                  "functions_compiled": None, "functions": None, "cache": _numba_cache(),
                  "compiled_ahead": ahead.outcome},
        "host_peak_rss_gib": max((r["host_peak_rss_gib"] for r in timed_rows if r["host_peak_rss_gib"] is not None),
                                 default=None),
        "device_peak_gib": max((r["device_peak_gib"] for r in timed_rows if r["device_peak_gib"] is not None),
                               default=None),
        "final_shape": [int(adata.n_obs), int(adata.n_vars)],
        "ari": ari,
        "plot": None,
        "plot_note": None,
        "html": str(args.out / "report.html"),
        "machine": machine(on_gpu),
        "versions": versions(),
        "platform": platform.platform(),
        "numpy_madvise_hugepage": _numpy_hugepages(),
        "result": str(result),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    report_started = time.perf_counter()
    umap_png, colors = None, []
    if {"umap", "leiden"} <= ran:
        colors = list(dict.fromkeys(c for c in (CLUSTER_KEY, labels, args.batch_key)
                                    if c is not None and c in adata.obs.columns))
        umap_png = _report.umap_figure(adata, colors)
        report["plot"] = str(args.out / "umap.png")
        (args.out / "umap.png").write_bytes(umap_png)
    else:
        missing = [f"gpusc.tl.{s}" for s in ("umap", "leiden") if s not in ran]
        report["plot_note"] = f"no UMAP plot: {', '.join(missing)} did not run"
        print(report["plot_note"])
    _report.write_html(args.out / "report.html", _numbers_so_far(report, compiles), adata, snapshots,
                       cluster_key=CLUSTER_KEY, umap_png=umap_png, umap_colors=colors)
    report["report_seconds"] = time.perf_counter() - report_started
    _numbers_so_far(report, compiles)
    report["run_seconds"] = time.perf_counter() - started
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"numba compilation: {report['numba']['compile_seconds']:.1f} s "
          f"({report['numba']['functions_compiled']} functions; cache: {report['numba']['cache']})")
    print(f"wrote {result}, {args.out / 'report.json'}, {report['html']}"
          + (f", {report['plot']}" if report["plot"] else ""))
    return report


class _PieceFile(io.FileIO):
    """A file written 64 KiB at a time, never more than 16 MiB of it waiting in the page cache.

    On this project's VMs (Firecracker with free-page reporting, ext4 on Linux 6.18) memory the
    kernel has not used lately goes back to the host, and taking it again is slow: writing
    result.h5ad (370 MB, HDF5 puts the dense X in one ``write()``) into a new file took
    0.25-3.2 s, with 2-3 s in a third of the runs, depending on how much memory the run had
    touched; the pieces keep ext4 from asking for large folios, and syncing and dropping every
    16 MiB written lets the page cache reuse the same few MiB: 0.44-0.53 s in every one of 19
    runs. The cost elsewhere: the file is on disk when the command ends (a slow disk waits for it).
    """

    PIECE = 1 << 16
    WINDOW = 16 << 20

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unsynced = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            step = super().write(view[written:written + self.PIECE])
            written += step
            self._unsynced += step
            if self._unsynced >= self.WINDOW and hasattr(os, "posix_fadvise"):  # (not on macOS)
                os.fdatasync(self.fileno())  # clean pages can be dropped, dirty ones cannot
                os.posix_fadvise(self.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                self._unsynced = 0
        return written


def _write_h5ad(adata, path: Path) -> None:
    """``adata.write_h5ad(path)``, through :class:`_PieceFile`: the same groups, datasets and
    attributes (anndata's own writer of the whole object into the file's root), written faster."""
    import anndata as ad
    import h5py

    adata.strings_to_categoricals()  # as write_h5ad does before writing
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    # anndata 0.11-0.12 (Python 3.11) read pandas' string arrays from newer files but refuse to
    # write them back unless asked
    with ad.settings.override(allow_write_nullable_strings=True), \
            _PieceFile(path, "w+") as raw, h5py.File(raw, "w") as store:
        ad.io.write_elem(store, "/", adata)


def _numbers_so_far(report: dict, compiles) -> dict:
    report["numba"].update(compile_seconds=round(compiles.seconds, 3), functions_compiled=len(compiles.functions),
                           functions=sorted(set(compiles.functions)))
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


def command() -> None:
    """The ``gpusc`` command and ``python -m gpusc``: :func:`main`, then exit with its code.

    ``gc.freeze()`` first: on the way out Python's collector would walk every object the run
    made, about 0.6 s of a 14 s run; the process is ending, so nothing needs collecting.
    (Not in :func:`main`, which tests call in their own process.)
    """
    _small_pages()
    code = main()
    gc.freeze()
    sys.exit(code)


def _small_pages() -> None:
    """Stop numpy asking the kernel for 2 MB pages in this process (unless the user chose).

    numpy madvises every large array for transparent huge pages; where the kernel honours it
    (THP "madvise", Ubuntu's default) a huge page must be whole contiguous memory, which on a
    VM that hands freed memory back to its host (this project's Firecracker machines) is
    memory the host must back again: filling a new 156 MB array took 1.09 s with huge pages
    and 0.06 s without, and scale's dense output and filter_cells' copy added 1.5-2 s to a
    12 s warm run. The command owns its process, so it
    chooses; a library does not change a process-wide setting, and ``NUMPY_MADVISE_HUGEPAGE``
    (numpy's own switch) set by the user wins.
    """
    switch = _hugepage_switch()
    if switch is not None and "NUMPY_MADVISE_HUGEPAGE" not in os.environ:
        switch(False)


def _hugepage_switch():
    """numpy's setter of its huge-page advice (returns the previous setting), or None."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy 1.26
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            return None
    return _set_madvise_hugepage


def _numpy_hugepages() -> bool | None:
    """Whether numpy now advises huge pages for large arrays (None: this numpy cannot say)."""
    switch = _hugepage_switch()
    if switch is None:
        return None
    now = switch(True)
    switch(now)
    return bool(now)


if __name__ == "__main__":
    command()
