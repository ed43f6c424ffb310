"""The pipeline up to PCA out of core on a zarr store of 2M cells, gpusc against scanpy + dask
(issue 11: "the out-of-core pipeline up to PCA on a zarr store of 2M cells model-drawn from
pbmc3k completes with the dask workers limited to 6 GiB in all; side by side with scanpy+dask
on the same store").

The store is written once (kept when its marker attribute matches the arguments; rewritten
when this script made it with others; any other existing path is refused): cells
model-drawn from pbmc3k (gpusc.datasets.resample, groupby seurat_cell_type) in blocks of
``--block-cells``, seed = block number, each block appended to X (float32 CSR) with anndata's
own sparse writer, so that no more than one block is in memory.

Each side then reads X lazily in ``--chunk-rows`` rows (gpusc._outofcore.read_lazy, as
``gpusc run --chunk-size`` does) on a fresh LocalCluster of one single-threaded worker per
core sharing ``--memory-limit`` (gpusc._outofcore.cluster), and runs the steps of ``gpusc run``:
calculate_qc_metrics(qc_vars=["mt"]), filter_cells(min_genes=100), filter_genes(min_cells=3),
normalize_total, log1p, highly_variable_genes(n_top_genes=2000), filter_highly_variable
(scanpy has none: anndata's in-place subset), scale(max_value=10), pca. One run per side:
a lazy step costs little where it is called and its work is paid by the step that computes;
a dask X_pca is computed inside the pca step. Where a scanpy step raises, its exact error is
kept and gpusc's function does that step on scanpy's AnnData (not timed) so that scanpy's
next steps can run; where scanpy has a documented alternative (pca: svd_solver=
"covariance_eigh", without dask-ml) it is tried first and timed as the step. Per side: the
peak RSS of the workers alive at the end (VmHWM of each worker process, and the highest sample
of distributed's memory monitor), the workers killed for memory (a worker past 95 % of its
limit is restarted by its nanny; a task that kills 4 workers fails with KilledWorker) and the
nannies' memory log lines.

    python benchmarks/bench_outofcore_2m.py [--cells 2000000] [--store /work/tmp-2m/cells-2m.zarr]
        [--chunk-rows 20000] [--memory-limit 6GiB] [--block-cells 100000] [--out FILE]
        [--sides gpusc,scanpy]
"""

from __future__ import annotations

import argparse
import shutil
import time
import traceback
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import anndata as ad
import pandas as pd

import gpusc
from gpusc import _outofcore
from gpusc._bench import PeakRSS, load_average

from _timing import DATA, ROOT, save

GROUPBY = "seurat_cell_type"
MARKER = "gpusc_bench_store"  # root attribute of the store: how it was made


def _scanpy_filter_highly_variable(a) -> None:
    a._inplace_subset_var(a.var["highly_variable"].to_numpy())


def steps(lib):
    """(name, call) of the pipeline for ``lib`` ("gpusc" or "scanpy")."""
    if lib == "gpusc":
        pp, filter_hv = gpusc.pp, gpusc.pp.filter_highly_variable
    else:
        import scanpy as sc

        pp, filter_hv = sc.pp, _scanpy_filter_highly_variable
    return [
        ("calculate_qc_metrics", lambda a: pp.calculate_qc_metrics(a, qc_vars=["mt"], inplace=True)),
        ("filter_cells", lambda a: pp.filter_cells(a, min_genes=100)),
        ("filter_genes", lambda a: pp.filter_genes(a, min_cells=3)),
        ("normalize_total", pp.normalize_total),
        ("log1p", pp.log1p),
        ("highly_variable_genes", lambda a: pp.highly_variable_genes(a, n_top_genes=2000)),
        ("filter_highly_variable", filter_hv),
        ("scale", lambda a: pp.scale(a, max_value=10)),
        ("pca", pp.pca),
    ]


# ------------------------------------------------------------------ the store


def _store_recipe(args) -> dict:
    return {"source": DATA.name, "groupby": GROUPBY, "n_cells": args.cells, "block_cells": args.block_cells,
            "seeds": "block i (0, 1, ...) drawn with gpusc.datasets.resample(seed=i)",
            "gpusc": version("gpusc"), "complete": True}


def _store_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ensure_store(args) -> dict:
    """Write the store unless it is there with this recipe; its description (and write time)."""
    import zarr

    recipe = _store_recipe(args)
    path = args.store
    if path.exists():
        try:
            group = zarr.open_group(path, mode="r")
            made = dict(group.attrs.get(MARKER, {}))
            shape = list(group["X"].attrs["shape"]) if "X" in group else None
        except Exception:  # noqa: BLE001  (zarr's errors for a path that is no group: never ours)
            made, shape = {}, None
        if made == recipe and shape is not None and shape[0] == args.cells:
            print(f"store {path} is there ({shape[0]} x {shape[1]}), not rewritten", flush=True)
            return {"path": str(path), "written_now": False, "shape": shape, "bytes_on_disk": _store_size(path),
                    "recipe": recipe}
        if not made:
            raise SystemExit(f"{path} exists and was not written by this benchmark (no {MARKER!r} attribute); "
                             "remove it or give another --store")
        print(f"store {path} was made otherwise ({made}); writing it again", flush=True)
        shutil.rmtree(path)
    return write_store(args, recipe)


def write_store(args, recipe: dict) -> dict:
    """Cells drawn block by block; block 0 is written as a whole AnnData (anndata's encoding),
    the next blocks are appended to its X (anndata's sparse_dataset.append), obs at the end."""
    import zarr

    path = args.store
    path.parent.mkdir(parents=True, exist_ok=True)
    source = ad.read_h5ad(DATA)
    obs_parts, n_vars, nnz = [], None, 0
    start = time.perf_counter()
    for block, first in enumerate(range(0, args.cells, args.block_cells)):
        n = min(args.block_cells, args.cells - first)
        cells = gpusc.datasets.resample(source, n, groupby=GROUPBY, seed=block)
        cells.obs_names = pd.Index([f"cell{i}" for i in range(first, first + n)])
        nnz += cells.X.nnz
        if block == 0:
            n_vars = cells.n_vars
            cells.uns["gpusc_resample"]["seed"] = "block i drawn with seed i"
            cells.write_zarr(path)
            # anndata refuses to edit a group opened from its consolidated metadata: open the
            # group itself, and consolidate again at the end (X's shape and obs change)
            group = zarr.open_group(path, mode="r+", use_consolidated=False)
            group.attrs[MARKER] = {**recipe, "complete": False}
            matrix = ad.io.sparse_dataset(group["X"])
        else:
            matrix.append(cells.X)
        obs_parts.append(cells.obs)
        del cells
        print(f"  store: {first + n:>9} cells, {nnz:.3g} values, {time.perf_counter() - start:7.1f} s", flush=True)
    ad.io.write_elem(group, "obs", pd.concat(obs_parts))
    group.attrs[MARKER] = recipe  # last: a store without it is unfinished
    with warnings.catch_warnings():  # anndata reads consolidated metadata, zarr warns that v3 lacks it
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(path)
    seconds = time.perf_counter() - start
    shape = list(zarr.open_group(path, mode="r")["X"].attrs["shape"])
    assert shape == [args.cells, n_vars], shape
    size = _store_size(path)
    print(f"store written: {shape[0]} x {shape[1]}, {nnz} values, {size / 2**30:.2f} GiB on disk, "
          f"{seconds:.1f} s", flush=True)
    return {"path": str(path), "written_now": True, "shape": shape, "nnz": nnz, "bytes_on_disk": size,
            "write_seconds": seconds, "float32_csr_bytes": nnz * 8 + (args.cells + 1) * 8, "recipe": recipe}


# ------------------------------------------------------------------ the workers


def _worker_rss(dask_worker) -> dict:
    """Run on each worker: its process's peak RSS (VmHWM) and distributed's highest sample."""
    peak = None
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    samples = dask_worker.monitor.quantities.get("memory", [])
    return {"vmhwm_bytes": peak, "monitor_max_bytes": int(max(samples)) if len(samples) else None,
            "memory_limit_bytes": dask_worker.memory_manager.memory_limit}


def _memory_log_lines(client) -> list[str]:
    """The nannies' and workers' log lines about memory (restarts, pauses, spilling), each once:
    a LocalCluster's nannies live in this process and share one logger, so every nanny's log
    holds them all."""
    lines = set()
    for nanny in (True, False):
        try:
            logs = client.get_worker_logs(nanny=nanny)
        except Exception as err:  # noqa: BLE001  (a worker that is gone: say so, go on)
            lines.add(f"(logs not read: {err})")
            continue
        for entries in logs.values():
            lines |= {message for _level, message in entries
                      if any(word in message.lower() for word in ("memory", "restart", "killed", "pause"))}
    return sorted(lines)


# ------------------------------------------------------------------ one side


def _message(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# pandas 3 warns about an option some library still sets, on every step: not the step's own warning
_NOISE = "'mode.chained_assignment' option is deprecated"


def _timed(name: str, call, adata) -> dict:
    """One call on ``adata``: seconds (or the error after how long), the warnings it gave."""
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            call(adata)
            if name == "pca" and hasattr(adata.obsm["X_pca"], "dask"):
                adata.obsm["X_pca"] = adata.obsm["X_pca"].compute()  # the pass pca left lazy
            out["seconds"] = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001  (whatever a step raises is the result)
            out["seconds_until_error"] = time.perf_counter() - start
            out["error"] = _message(err)
            out["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
    out["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught if _NOISE not in str(w.message)})
    return out


def _shown(timed: dict) -> str:
    return f"{timed['seconds']:8.2f} s" if "error" not in timed else f"FAILED after {timed['seconds_until_error']:.1f} s"


def _scanpy_retries() -> dict:
    """What a scanpy user would try next when a step raises: step -> (description, call)."""
    import scanpy as sc

    return {"pca": ("sc.pp.pca(adata, svd_solver='covariance_eigh'): scanpy's own dask PCA, no dask-ml",
                    lambda a: sc.pp.pca(a, svd_solver="covariance_eigh"))}


def run_side(lib: str, args) -> dict:
    """The pipeline of ``lib`` on a fresh cluster: per-step seconds, errors, warnings, memory."""
    stand_ins = dict(steps("gpusc"))
    retries = _scanpy_retries() if lib == "scanpy" else {}
    record = {"steps": [], "stopped": None}
    with _outofcore.cluster(None, args.memory_limit) as client, PeakRSS() as main_rss:
        workers_at_start = sorted(client.scheduler_info()["workers"])
        adata = _outofcore.read_lazy(args.store, args.chunk_rows)
        shape_in = list(adata.shape)
        print(f"{lib}: {len(workers_at_start)} workers, {shape_in[0]} x {shape_in[1]}, "
              f"chunks of {args.chunk_rows} rows; dashboard {client.dashboard_link}", flush=True)
        for name, call in steps(lib):
            row = {"step": name, **_timed(name, call, adata)}
            print(f"  {lib:6s} {name:24s} {_shown(row)}  {adata.n_obs} x {adata.n_vars}", flush=True)
            if "error" in row:
                print(f"         {row['error'][:400]}", flush=True)
                if name in retries:
                    description, retry = retries[name]
                    row["retry"] = {"call": description, **_timed(name, retry, adata)}
                    print(f"  {lib:6s} {name + ' (retry)':24s} {_shown(row['retry'])}  {description}", flush=True)
                if "seconds" not in row.get("retry", {}) and name != "pca":  # pca: nothing comes after it
                    try:  # gpusc's step brings scanpy's AnnData to the state its next step needs
                        start = time.perf_counter()
                        stand_ins[name](adata)
                        row["stand_in"] = "gpusc's step on scanpy's AnnData (not in scanpy's total)"
                        row["stand_in_seconds"] = time.perf_counter() - start
                    except Exception as err:  # noqa: BLE001  (recorded; this side stops)
                        row["stand_in_error"] = _message(err)
                        record["steps"].append(row)
                        record["stopped"] = f"after {name}: gpusc's stand-in failed too"
                        break
            row["shape_after"] = list(adata.shape)
            row["X_after"] = type(adata.X).__name__ + (f" of {type(adata.X._meta).__name__}"
                                                       if hasattr(adata.X, "_meta") else "")
            record["steps"].append(row)
        workers_at_end = sorted(client.scheduler_info()["workers"])
        log_lines = _memory_log_lines(client)
        record["workers"] = {
            "n_workers": len(workers_at_start), "memory_limit_total": args.memory_limit,
            # distributed's nanny: "Worker ... exceeded 95% memory budget. Restarting..."
            "killed_for_memory": sum("exceeded" in line and "memory budget" in line for line in log_lines),
            "first_workers_gone": sorted(set(workers_at_start) - set(workers_at_end)),
            "memory_of_workers_at_end": client.run(_worker_rss), "log_lines": log_lines}
    peaks = [w["vmhwm_bytes"] for w in record["workers"]["memory_of_workers_at_end"].values() if w["vmhwm_bytes"]]
    record["workers"]["peak_vmhwm_gib"] = round(max(peaks) / 2**30, 3) if peaks else None
    record["main_process_peak_rss_gib"] = None if main_rss.peak is None else round(main_rss.peak / 2**30, 3)
    record["shape_in"] = shape_in
    record["shape_out"] = list(adata.shape)
    timed = [t for t in map(step_seconds, record["steps"]) if t is not None]
    record["total_seconds"] = sum(timed)
    record["complete"] = len(timed) == len(steps(lib))
    print(f"{lib}: total {record['total_seconds']:.1f} s over {len(timed)} steps; worker peak "
          f"{record['workers']['peak_vmhwm_gib']} GiB; workers killed for memory {record['workers']['killed_for_memory']}",
          flush=True)
    return record


def step_seconds(row: dict | None) -> float | None:
    """A step's time: its own call's, else its retry's; None when neither ran through."""
    if row is None:
        return None
    return row.get("seconds", row.get("retry", {}).get("seconds"))


# ------------------------------------------------------------------ main


def _versions() -> dict:
    out = {}
    for name in ("dask", "distributed", "zarr", "numcodecs"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=2_000_000)
    parser.add_argument("--store", type=Path, default=Path("/work/tmp-2m/cells-2m.zarr"))
    parser.add_argument("--chunk-rows", type=int, default=20_000)
    parser.add_argument("--memory-limit", default="6GiB", help="the workers' limit in all, shared equally")
    parser.add_argument("--block-cells", type=int, default=100_000, help="cells drawn and appended at a time")
    parser.add_argument("--sides", default="gpusc,scanpy", help="which sides to run, in this order")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu-dev-outofcore-2m.json")
    args = parser.parse_args()
    args.device, args.repeats = "cpu", 1  # for _timing.save
    sides = args.sides.split(",")
    if not set(sides) <= {"gpusc", "scanpy"}:
        parser.error(f"--sides takes gpusc and/or scanpy; got {args.sides}")
    free = shutil.disk_usage(args.store.parent if args.store.parent.exists() else Path("/")).free
    print(f"store {args.store}: {free / 2**30:.0f} GiB free there", flush=True)

    load_before = load_average()
    store = ensure_store(args)
    results = {}
    for lib in sides:
        results[lib] = run_side(lib, args)
    both = sides == ["gpusc", "scanpy"] or sides == ["scanpy", "gpusc"]
    rows = []
    for name, _ in steps("gpusc"):
        row = {"step": name}
        for lib in sides:
            row[lib] = next((r for r in results[lib]["steps"] if r["step"] == name), None)
        seconds = {lib: step_seconds(row[lib]) for lib in sides}
        if both and None not in seconds.values():
            row["scanpy_over_gpusc"] = seconds["scanpy"] / max(seconds["gpusc"], 1e-9)
            if "retry" in row["scanpy"]:
                row["scanpy_timed_call"] = row["scanpy"]["retry"]["call"]
        rows.append(row)
    totals = {lib: results[lib]["total_seconds"] for lib in sides}
    if both and results["scanpy"]["complete"] and results["gpusc"]["complete"]:
        totals["scanpy_over_gpusc"] = totals["scanpy"] / totals["gpusc"]
    elif both:  # a total over the steps that both sides did, the others named
        done = [row for row in rows if "scanpy_over_gpusc" in row]
        gpusc_part = sum(step_seconds(row["gpusc"]) for row in done)
        totals["steps_both_did"] = {
            "gpusc": gpusc_part, "scanpy": sum(step_seconds(row["scanpy"]) for row in done),
            "left_out": [row["step"] for row in rows if row not in done]}
        totals["steps_both_did"]["scanpy_over_gpusc"] = totals["steps_both_did"]["scanpy"] / max(gpusc_part, 1e-9)
    rows.append({"step": "total", **totals})
    for row in rows:
        ratio = row.get("scanpy_over_gpusc")
        print(f"{row['step']:24s} " + "  ".join(f"{lib} {_seconds_text(row.get(lib))}" for lib in sides)
              + (f"  {ratio:6.2f}x" if ratio else "") + ("  (scanpy: retry)" if "scanpy_timed_call" in row else ""))
    if "steps_both_did" in totals:
        part = totals["steps_both_did"]
        print(f"{'total of steps both did':24s} gpusc {part['gpusc']:8.2f} s  scanpy {part['scanpy']:8.2f} s  "
              f"{part['scanpy_over_gpusc']:6.2f}x  (left out: {', '.join(part['left_out'])})")
    save(args.out, "outofcore-2m", args, False, load_before,
         {"store": store, "chunk_rows": args.chunk_rows, "memory_limit_total": args.memory_limit,
          "cluster": "LocalCluster, one single-threaded worker per core (gpusc._outofcore.cluster)",
          "reader": "gpusc._outofcore.read_lazy (anndata.experimental.read_elem_lazy)",
          "versions_extra": _versions(), "sides": {lib: {k: v for k, v in results[lib].items() if k != "steps"}
                                                   for lib in sides}},
         "one run per side, each on a fresh cluster, gpusc first; a step's seconds are where it is called "
         "(lazy steps are paid by the step that computes); a dask X_pca is computed inside pca; a failed "
         "scanpy step keeps its error, then scanpy's retry where there is one (pca: svd_solver="
         "'covariance_eigh', timed as the step) or else gpusc's step stands in (not timed)", rows)


def _seconds_text(step) -> str:
    seconds = step if isinstance(step, float) else step_seconds(step)
    if seconds is not None:
        return f"{seconds:8.2f} s"
    return "       -  " if step is None else "  FAILED  "


if __name__ == "__main__":
    main()
