"""Per-step preprocessing benchmark: scanpy 1.12 against gpusc on the same data.

Data: pbmc3k (``$GPUSC_DATA`` or ``../shared/data``) grown to ``--cells`` cells by
``gpusc.datasets.resample`` (new cells model-drawn per ``seurat_cell_type``; no copies
of real cells). Steps, in pipeline order, each starting from the state scanpy reaches
after the previous steps: calculate_qc_metrics(qc_vars=["mt"]), filter_cells(min_genes=200),
filter_genes(min_cells=3), normalize_total, log1p.

Per step and library: one untimed warm-up call (numba compilation, caches), then
``--repeats`` timed calls, each on a fresh copy (copying is not timed); the best is
reported. Peak RSS during each call is sampled with psutil. With ``--device gpu`` gpusc's
copy is moved to the device before timing and the device is synchronised around the call.

    python benchmarks/bench_preprocess.py [--cells 50000] [--repeats 3] [--device cpu|gpu]

Writes ``benchmarks/results/<device>-<host>-preprocess-<cells/1000>k.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GPUSC_DATA", ROOT / ".." / "shared" / "data"))
SOURCE = "pbmc3k_counts_labeled.h5ad"
GROUPBY = "seurat_cell_type"

STEPS = {
    "calculate_qc_metrics": lambda pp, a: pp.calculate_qc_metrics(a, qc_vars=["mt"], inplace=True),
    "filter_cells": lambda pp, a: pp.filter_cells(a, min_genes=200),
    "filter_genes": lambda pp, a: pp.filter_genes(a, min_cells=3),
    "normalize_total": lambda pp, a: pp.normalize_total(a),
    "log1p": lambda pp, a: pp.log1p(a),
}


class PeakRSS:
    """Samples this process's RSS every few milliseconds while the block runs."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = 0

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self):
        self.start = self._proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _machine() -> dict:
    import psutil

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    return {
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "scanpy", "anndata", "numba", "gpusc", "cupy-cuda13x", "cupy-cuda12x"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _git() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _gpu_info() -> dict:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return {"gpu": props["name"].decode(), "gpu_memory_gib": round(props["totalGlobalMem"] / 2**30, 1)}


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        import cupy

        cupy.cuda.Device().synchronize()


def _time_call(fn, adata, on_gpu: bool) -> tuple[float, int, int]:
    """Seconds, peak RSS and RSS before for one call."""
    _sync(on_gpu)
    with PeakRSS() as rss:
        start = time.perf_counter()
        fn(adata)
        _sync(on_gpu)
        seconds = time.perf_counter() - start
    return seconds, rss.peak, rss.start


def _max_abs_diff(a, b) -> float | None:
    """Largest |X_scanpy - X_gpusc| (None when shapes differ)."""
    from scipy import sparse

    if a.shape != b.shape:
        return None
    xa, xb = a.X, b.X
    if sparse.issparse(xa) or sparse.issparse(xb):
        diff = sparse.csr_matrix(xa, dtype=np.float64) - sparse.csr_matrix(xb, dtype=np.float64)
        return float(abs(diff).max()) if diff.nnz else 0.0
    return float(np.max(np.abs(np.asarray(xa, np.float64) - np.asarray(xb, np.float64))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host-tag", default=None,
                        help='name in the result file (default: the hostname, or "dev" when it has none)')
    parser.add_argument("--out", type=Path, default=None, help="result JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    import anndata as ad
    import scanpy as sc

    import gpusc
    from gpusc.datasets import resample

    on_gpu = args.device == "gpu"
    if on_gpu:
        import cupy  # noqa: F401  (fails clearly without cupy)

    source_path = DATA / SOURCE
    if not source_path.exists():
        print(f"{source_path} not found; set $GPUSC_DATA", file=sys.stderr)
        return 2
    source = ad.read_h5ad(source_path)
    t0 = time.perf_counter()
    base = resample(source, args.cells, groupby=GROUPBY, seed=args.seed)
    resample_seconds = time.perf_counter() - t0
    base.var["mt"] = base.var_names.str.startswith("MT-")
    print(f"data: {base.n_obs:,} x {base.n_vars:,}, nnz {base.X.nnz:,} (resample took {resample_seconds:.1f} s)")

    load_before = os.getloadavg()
    results = []
    state = base  # the input of the next step: scanpy's output of the steps so far
    for name, step in STEPS.items():
        row = {"step": name, "input_shape": list(state.shape)}
        outputs = {}
        for lib, pp in (("scanpy", sc.pp), ("gpusc", gpusc.pp)):

            def prepare(lib=lib):
                a = state.copy()
                if lib == "gpusc" and on_gpu:
                    gpusc.get.anndata_to_GPU(a)
                    _sync(True)
                return a

            def call(a, pp=pp, step=step):
                step(pp, a)

            call(prepare())  # warm-up: numba compilation and caches, not counted
            times, peaks = [], []
            for _ in range(args.repeats):
                a = prepare()
                seconds, peak, before = _time_call(call, a, on_gpu and lib == "gpusc")
                times.append(seconds)
                peaks.append({"peak_rss_bytes": peak, "rss_before_bytes": before})
            if lib == "gpusc" and on_gpu:
                gpusc.get.anndata_to_CPU(a)
            outputs[lib] = a
            row[lib] = {"seconds": times, "best": min(times), "rss": peaks,
                        "peak_rss_gib": round(max(p["peak_rss_bytes"] for p in peaks) / 2**30, 3),
                        "peak_rss_increase_gib": round(max(p["peak_rss_bytes"] - p["rss_before_bytes"] for p in peaks) / 2**30, 3)}
        row["speedup"] = row["scanpy"]["best"] / row["gpusc"]["best"]
        row["output_shape"] = list(outputs["scanpy"].shape)
        row["max_abs_diff_X"] = _max_abs_diff(outputs["scanpy"], outputs["gpusc"])
        results.append(row)
        print(f"  {name}: scanpy {row['scanpy']['best']:.3f} s, gpusc {row['gpusc']['best']:.3f} s", flush=True)
        state = outputs["scanpy"]
        del outputs

    geomean = math.exp(sum(math.log(r["speedup"]) for r in results) / len(results))
    width = max(len(r["step"]) for r in results)
    print(f"\n{'step':<{width}}  {'scanpy s':>9}  {'gpusc s':>9}  {'speedup':>8}  {'peak RSS+ sc/gs GiB':>20}")
    for r in results:
        print(f"{r['step']:<{width}}  {r['scanpy']['best']:>9.4f}  {r['gpusc']['best']:>9.4f}  {r['speedup']:>7.2f}x"
              f"  {r['scanpy']['peak_rss_increase_gib']:>9.3f} / {r['gpusc']['peak_rss_increase_gib']:.3f}")
    print(f"geometric mean speedup: {geomean:.2f}x")

    tag = args.host_tag or re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "dev"
    out = args.out or ROOT / "benchmarks" / "results" / f"{args.device}-{tag}-preprocess-{args.cells // 1000}k.json"
    machine = _machine()
    if on_gpu:
        machine.update(_gpu_info())
    record = {
        "benchmark": "preprocess",
        "device": args.device,
        "machine": machine,
        "versions": _versions(),
        "git": _git(),
        "data": {
            "description": f"{args.cells:,} cells model-drawn (gpusc.datasets.resample) from pbmc3k, groupby {GROUPBY}",
            "source": SOURCE,
            "shape": list(base.shape),
            "nnz": int(base.X.nnz),
            "seed": args.seed,
            "resample_seconds": resample_seconds,
        },
        "method": "per step: one warm-up call each, then repeats on fresh copies of scanpy's state after the "
                  "previous steps; best of repeats; copies not timed; peak RSS sampled every 2 ms (psutil)",
        "repeats": args.repeats,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "steps": results,
        "geometric_mean_speedup": geomean,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
