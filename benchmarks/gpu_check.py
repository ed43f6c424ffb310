"""The first thing to run on a new GPU: GPU tests, int64 parity, compute-sanitizer, 1M-cell timings.

    python benchmarks/gpu_check.py [--parts tests,sanitizer,timings] [--cells 1000000] [--out DIR]

(``benchmarks/gpu_check.sh`` calls this with the device machine's set-up.) Each part runs in
its own process under a time limit, so the whole check fits about 10 minutes of device time:

tests      the GPU-marked suite (``pytest -m gpu`` with GPUSC_REQUIRE_GPU=1: no device is a
           failure), which holds the int64-index parity tests (tests/test_int64_indices.py);
sanitizer  ``compute-sanitizer`` memcheck and racecheck over small calls of every kernel family
           (benchmarks/gpu_sanitize.py);
timings    every pipeline step once at ``--cells`` model-drawn cells (gpusc.datasets.synthetic,
           20,000 genes, 5% non-zero, 4 random batches) after a small warm-up run (NVRTC
           compilation), each against its floor: the bytes the step must move at the device's
           measured copy bandwidth, or its multiply-adds at the measured GEMM rate (FP64 for
           PCA, TF32 for kNN); then diffmap, embedding_density, harmony_integrate, tsne and
           scrublet (on the counts kept aside). leiden and tsne are left out on a GPU without
           pylibcugraph / cuML (their host paths take minutes at 1M cells) unless named in --steps.

The tests run on pytest-xdist's workers where it is installed (the oracles are host work) with
pytest-timeout's 120 s per test; each part's output is written to a log under --out as it
comes, and a part stopped at its limit (its whole process group killed) still reports the
verdicts and timing rows it printed.

Writes ``gpu-check-<device>.json`` (raw: device, versions, git state, every part's results) to
``--out`` (default ``$OUT`` when set, else benchmarks/results/). Runs on the CPU too
(``--device cpu``, timings only): the same table against the host's copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"tests": 220, "sanitizer": 100, "timings": 290}  # seconds per part (per tool for the sanitizer)
SANITIZER_TOOLS = ("memcheck", "racecheck")
# timing steps run under cProfile by default: those furthest over their floors on the H200
# (2026-12-04: QC and the filters 75-110x, diffmap 1,300x, scrublet 57x), to see where their
# time goes
PROFILED = ("calculate_qc_metrics", "filter_cells", "filter_genes", "diffmap", "scrublet")
PROFILE_TOP = 15


def _run(cmd: list[str], limit: float, env: dict | None = None, keep_output: bool = False,
         log: Path | None = None) -> dict:
    """A subprocess under a time limit: return code (None when killed), seconds, output tail.

    The output goes to ``log`` as it is written (so a part stopped at its limit leaves what it
    printed there); on the limit the whole process group is killed (pytest-xdist's workers too)."""
    import signal
    import tempfile

    start = time.perf_counter()
    with (open(log, "w+") if log else tempfile.TemporaryFile("w+")) as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        sink.seek(0)
        out = sink.read()
    result = {"rc": rc, "seconds": round(time.perf_counter() - start, 2), "output_tail": out[-4000:]}
    return result | ({"output_full": out} if keep_output else {})


# ---------------------------------------------------------------- tests

# Tests that set up the device's allocator (an RMM pool of 80 % of the free memory, managed
# memory, a LocalCUDACluster's pools): run alone after the others, which share the GPU.
SERIAL_TESTS = ("tests/test_memory.py", "tests/test_dask_get_memory.py")


def run_tests(out: Path, tag: str) -> dict:
    """``pytest -m gpu``: the suite on pytest-xdist's workers where it is installed (the
    oracles are host work), then SERIAL_TESTS in one process; both within LIMITS["tests"]."""
    import importlib.util

    workers = []
    if importlib.util.find_spec("xdist"):
        workers = ["-n", str(min(12, os.cpu_count() or 1))]
    timeout = ["--timeout=120"] if importlib.util.find_spec("pytest_timeout") else []  # one hung test
    # test_notebooks has no GPU test, and its module imports nbformat (not on the device image)
    ignored = (*SERIAL_TESTS, "tests/test_notebooks.py")
    runs = {"parallel": [*workers, *(f"--ignore={path}" for path in ignored), "tests"],
            "serial": list(SERIAL_TESTS)}
    result, deadline = {}, time.perf_counter() + LIMITS["tests"]
    for name, args in runs.items():
        junit, log = out / f"gpu-check-{tag}-tests-{name}.xml", out / f"gpu-check-{tag}-tests-{name}.log"
        r = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rfE", "--tb=short",
                  "-v", *timeout, f"--junitxml={junit}", *args], max(deadline - time.perf_counter(), 10),
                 {"GPUSC_REQUIRE_GPU": "1"}, log=log)
        if junit.exists():
            suite = ET.parse(junit).getroot()
            suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
            r |= {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            r["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                           if case.find("failure") is not None or case.find("error") is not None]
            int64 = [case for case in suite.iter("testcase") if "test_int64_indices" in case.get("classname", "")]
            r["int64_parity"] = {"tests": len(int64), "failed": sum(
                case.find("failure") is not None or case.find("error") is not None for case in int64)}
        else:  # stopped at the limit: the verdicts printed so far (-v)
            text = log.read_text(errors="replace")
            r |= {"stopped": r["rc"] is None, "passed_so_far": len(re.findall(r" PASSED ", text)),
                  "failed": re.findall(r" (?:FAILED|ERROR) (tests/\S+)", text)}
        result[name] = r
    for k in ("tests", "failures", "errors", "skipped"):
        result[k] = sum(r.get(k, 0) for r in result.values() if isinstance(r, dict))
    return result


# ---------------------------------------------------------------- sanitizer

def run_sanitizer(out: Path, tag: str, tools=SANITIZER_TOOLS) -> dict:
    import shutil

    if shutil.which("compute-sanitizer") is None:
        return {"error": "compute-sanitizer is not on the PATH"}
    results = {}
    for tool in tools:
        log = out / f"gpu-check-{tag}-{tool}.log"
        r = _run(["compute-sanitizer", f"--tool={tool}", "--error-exitcode=9", sys.executable,
                  "benchmarks/gpu_sanitize.py"], LIMITS["sanitizer"], log=log)
        text = log.read_text(errors="replace")
        # memcheck: "ERROR SUMMARY: N errors"; racecheck: "RACECHECK SUMMARY: N hazards displayed
        # (E errors, W warnings)"
        found = re.findall(r"ERROR SUMMARY: (\d+) error", text) or re.findall(r"\((\d+) errors?, \d+ warnings?\)", text)
        r["errors"] = int(found[-1]) if found else None
        warned = re.findall(r"\(\d+ errors?, (\d+) warnings?\)", text)
        r["warnings"] = int(warned[-1]) if warned else 0
        # where the hazards are: the kernels named in the report, and how often
        kernels = re.findall(r"access at (?:void )?([A-Za-z_][\w:]*)", text)
        r["hazard_kernels"] = {k: kernels.count(k) for k in sorted(set(kernels))}
        r["families_done"] = re.findall(r"family (\w+): ok", text)
        results[tool] = r
    return results


# ---------------------------------------------------------------- timings

def _seconds(fn, sync, repeats=5) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` calls after one untimed call."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def _references(on_gpu: bool) -> dict:
    """The device's (or host's) copy bandwidth and GEMM rates, measured: the floors' units."""
    if not on_gpu:
        import numpy as np

        host = np.ones(1 << 27, np.float32)
        return {"copy_bytes_per_s": 2 * host.nbytes / _seconds(host.copy, lambda: None)}
    import cupy as cp

    sync = cp.cuda.Device().synchronize
    n = 8192
    flop = 2.0 * n**3
    refs = {"copy_bytes_per_s": 2 * (1 << 31) / _seconds(cp.ones(1 << 29, cp.float32).copy, sync)}
    m64 = cp.random.default_rng(0).random((n, n))
    refs["fp64_flop_per_s"] = flop / _seconds(lambda: m64 @ m64, sync)
    m32 = m64.astype(cp.float32)
    refs["fp32_flop_per_s"] = flop / _seconds(lambda: m32 @ m32, sync)
    # TF32: CuPy reads CUPY_TF32 at import, so in a process of its own
    code = ("import cupy as cp, time; m = cp.random.default_rng(0).random((8192, 8192), dtype=cp.float32); "
            "m @ m; cp.cuda.Device().synchronize(); t = time.perf_counter(); [m @ m for _ in range(5)]; "
            "cp.cuda.Device().synchronize(); print((time.perf_counter() - t) / 5)")
    tf32 = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "CUPY_TF32": "1"}, timeout=120)
    try:
        refs["tf32_flop_per_s"] = flop / float(tf32.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        refs["tf32_flop_per_s"] = None
    return refs


def _sizes(adata) -> dict:
    """What the floors read of an AnnData: bytes of X (and of its stored values), its shape,
    the PCA width and the graph's edges."""
    x = adata.X
    sparse_x = hasattr(x, "indptr")
    graph = adata.obsp["connectivities"] if "connectivities" in adata.obsp else None
    return {"x": int(x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) if sparse_x else int(x.nbytes),
            "values": int(x.data.nbytes if sparse_x else x.nbytes), "n_obs": adata.n_obs,
            "n_vars": adata.n_vars, "n_pcs": adata.obsm["X_pca"].shape[1] if "X_pca" in adata.obsm else 0,
            "edges": 0 if graph is None else int(graph.nnz)}


# Each step's floor from the sizes before (a) and after (b) it: ("bytes", n) at the copy
# bandwidth, ("fp64_flop" | "tf32_flop", n) at the GEMM rate, or (None, None).
FLOORS = {
    "read": lambda a, b: ("bytes", a["x"]),  # X read once
    "read_twice": lambda a, b: ("bytes", 2 * a["x"]),  # two passes (seurat_v3's clipped moments)
    "read_write": lambda a, b: ("bytes", a["x"] + b["x"]),  # X read, the result written
    "values_in_place": lambda a, b: ("bytes", 2 * a["values"]),  # stored values read and written
    "gram": lambda a, b: ("fp64_flop", 2.0 * a["n_obs"] * a["n_vars"] ** 2),  # XᵀX
    "all_pairs": lambda a, b: ("tf32_flop", 2.0 * a["n_obs"] ** 2 * a["n_pcs"]),  # every product
    # 200 epochs, each edge's head, tail (int32) and four float64 schedules read once
    "epochs": lambda a, b: ("bytes", 200 * 40 * a["edges"]),
    # each Lanczos product reads the graph (float32 value, int32 index) once; at least n_comps=15
    "graph_products": lambda a, b: ("bytes", 15 * 8 * a["edges"]),
    # every pair of cells: two differences, squares, a sum, an exponential (about 10 flop)
    "all_pairs_2d": lambda a, b: ("fp32_flop", 10.0 * a["n_obs"] ** 2),
    # each of the 10 Harmony iterations reads Z (n x 50) and reads and writes R (n x 100), float32
    "harmony_passes": lambda a, b: ("bytes", 10 * 4 * a["n_obs"] * (50 + 2 * 100)),
    # the kNN of observed and simulated cells (3n at sim_doublet_ratio 2) among themselves, 30 PCs
    "scrublet_pairs": lambda a, b: ("tf32_flop", 2.0 * (3 * a["n_obs"]) ** 2 * 30),
    "none": lambda a, b: (None, None),
}


def _steps(on_gpu: bool, kept: dict):
    """(name, call(adata), floor name) in pipeline order; ``kept["counts"]``: the raw counts,
    set aside by the caller before the pipeline changes X."""
    import anndata as ad

    import gpusc

    device = "gpu" if on_gpu else "cpu"
    return [
        ("calculate_qc_metrics", lambda a: gpusc.pp.calculate_qc_metrics(a, qc_vars=["mt"], inplace=True), "read"),
        ("filter_cells", lambda a: gpusc.pp.filter_cells(a, min_genes=200), "read_write"),
        ("filter_genes", lambda a: gpusc.pp.filter_genes(a, min_cells=3), "read_write"),
        ("highly_variable_genes_seurat_v3",  # on the counts; the result is not kept
         lambda a: gpusc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=2000, inplace=False),
         "read_twice"),
        ("normalize_total", lambda a: gpusc.pp.normalize_total(a), "values_in_place"),
        ("log1p", lambda a: gpusc.pp.log1p(a), "values_in_place"),
        ("highly_variable_genes", lambda a: gpusc.pp.highly_variable_genes(a, n_top_genes=2000), "read"),
        ("filter_highly_variable", lambda a: gpusc.pp.filter_highly_variable(a), "read_write"),
        ("scale", lambda a: gpusc.pp.scale(a, max_value=10), "read_write"),
        ("pca", lambda a: gpusc.pp.pca(a, n_comps=50), "gram"),
        ("neighbors", lambda a: gpusc.pp.neighbors(a, device=device), "all_pairs"),
        ("umap", lambda a: gpusc.tl.umap(a, device=device), "epochs"),
        ("leiden", lambda a: gpusc.tl.leiden(a, device=device), "none"),
        # issue 14's steps, on the pipeline's graph, UMAP and PCs
        ("diffmap", lambda a: gpusc.tl.diffmap(a, device=device), "graph_products"),
        ("embedding_density", lambda a: gpusc.tl.embedding_density(a, basis="umap", device=device), "all_pairs_2d"),
        ("harmony_integrate", lambda a: gpusc.pp.harmony_integrate(a, "batch", device=device, verbose=False),
         "harmony_passes"),
        # t-SNE on the GPU: cuML's where installed, else gpusc's own (kernels/tsne.cu)
        ("tsne", lambda a: gpusc.tl.tsne(a, device=device), "all_pairs"),
        # on the counts kept aside (outside the AnnData: in uns every in-place subset would copy
        # them); 35 neighbours (k_adj 105) keep the kNN on the device (scanpy's default,
        # 0.5 sqrt(n) = 500 at 1M cells, goes to the host search)
        ("scrublet", lambda a: gpusc.pp.scrublet(ad.AnnData(X=kept["counts"]), n_neighbors=35, verbose=False),
         "scrublet_pairs"),
    ]


RATES = {"bytes": "copy_bytes_per_s", "fp64_flop": "fp64_flop_per_s", "fp32_flop": "fp32_flop_per_s",
         "tf32_flop": "tf32_flop_per_s"}


def _hot_functions(profile, top: int = PROFILE_TOP) -> list[dict]:
    """The ``top`` functions of a cProfile run by cumulative seconds (host time: a device
    kernel's time shows in the call that waits for it)."""
    import pstats

    stats = pstats.Stats(profile).stats
    rows = sorted(stats.items(), key=lambda item: -item[1][3])[:top]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls,
             "cumulative_s": round(cumulative, 4), "own_s": round(own, 4)}
            for (file, line, name), (_, calls, own, cumulative, _) in rows]


def run_timings(n_cells: int, on_gpu: bool, steps: list[str] | None,
                profiled: tuple[str, ...] = ()) -> dict:
    """Every step once after a small warm-up. Each row is printed as it ends (``ROW {json}``),
    so that a part stopped at its time limit still returns the rows it finished; a step that
    raises is recorded with its error and the next one runs. The steps named in ``profiled``
    run under cProfile (its overhead is in their seconds) and keep their hot functions."""
    import cProfile
    import importlib.util
    import traceback
    import warnings

    import numpy as np

    import gpusc
    from gpusc._bench import DevicePeak, synchronize

    if on_gpu:
        try:
            gpusc.memory.configure("pool")
        except Exception as err:  # no RMM on this machine: CuPy's own pool
            print(f"RMM pool not configured ({err}); CuPy's default pool", flush=True)
    refs = _references(on_gpu)
    print("REFS " + json.dumps(refs), flush=True)
    # steps whose GPU path is a RAPIDS library: without it they run scanpy's host path, minutes
    # at 1M cells, so they are left out unless named in --steps
    needs = {"leiden": "pylibcugraph"}
    missing = [name for name, lib in needs.items() if on_gpu and importlib.util.find_spec(lib) is None]
    kept = {}
    chosen = [s for s in _steps(on_gpu, kept) if (s[0] in steps if steps is not None else s[0] not in missing)]

    def pipeline(n, report):
        start = time.perf_counter()
        adata = gpusc.datasets.synthetic(n, 20_000, density=0.05, seed=0)
        adata.obs["batch"] = np.random.default_rng(0).integers(0, 4, n).astype(str)
        adata.obs["batch"] = adata.obs["batch"].astype("category")
        made = time.perf_counter() - start
        if on_gpu:
            gpusc.get.anndata_to_GPU(adata)
        kept["counts"] = adata.X.copy()  # normalize_total and log1p change X in place
        rows = []
        for name, call, floor in chosen:
            before = _sizes(adata)
            error = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                synchronize(on_gpu)
                profile = cProfile.Profile() if report and name in profiled else None
                with DevicePeak(on_gpu) as peak:
                    t0 = time.perf_counter()
                    try:
                        if profile is not None:
                            profile.enable()
                        call(adata)
                        synchronize(on_gpu)
                    except Exception:
                        error = traceback.format_exc(limit=6)[-1500:]
                    finally:
                        if profile is not None:
                            profile.disable()
                    seconds = time.perf_counter() - t0
            kind, amount = FLOORS[floor](before, _sizes(adata))
            row = {"step": name, "shape_in": [before["n_obs"], before["n_vars"]], "seconds": round(seconds, 4),
                   "device_peak_gib": None if peak.peak is None else round(peak.peak / 2**30, 3)}
            if error:
                row["error"] = error
            if profile is not None:
                row["profile"] = _hot_functions(profile)
            rate = refs.get(RATES[kind]) if kind else None
            if kind is not None and not error:
                row |= {"floor": floor, "floor_kind": kind, "floor_amount": amount,
                        "achieved_per_s": amount / seconds if seconds > 0 else None,
                        "floor_seconds": amount / rate if rate else None,
                        "seconds_over_floor": round(seconds * rate / amount, 2) if rate and amount else None}
            rows.append(row)
            if report:
                print("ROW " + json.dumps(row), flush=True)
                over = f"  floor {row['floor_seconds']:.4f} s  x{row['seconds_over_floor']}" \
                    if row.get("floor_seconds") else ""
                print(f"{name:34s} {seconds:9.3f} s{over}{'  FAILED' if error else ''}", flush=True)
        return made, rows

    pipeline(2_000, report=False)  # warm-up: NVRTC and numba compilation, not timed
    made, rows = pipeline(n_cells, report=True)
    return {"cells": n_cells, "genes": 20_000, "density": 0.05, "data_seconds": round(made, 2),
            "references": refs, "steps": rows, "left_out_no_rapids": missing,
            "method": "one call per step after a 2,000-cell warm-up; synchronised before and after; "
                      "floors: the bytes a step must move at the measured copy bandwidth, or its "
                      "flop at the measured GEMM rate (FLOORS in this file)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="tests,sanitizer,timings")
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--steps", default=None, help="comma list of timing steps (default: all)")
    parser.add_argument("--profile", default=",".join(PROFILED),
                        help="comma list of timing steps run under cProfile ('' for none)")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--sanitizers", default=",".join(SANITIZER_TOOLS), help="compute-sanitizer tools")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timings-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = args.device == "gpu"
    steps = None if args.steps is None else [s.strip() for s in args.steps.split(",")]

    if args.timings_only:  # the timings part in its own process (device memory freed at exit)
        profiled = tuple(s.strip() for s in args.profile.split(",") if s.strip())
        print(json.dumps(run_timings(args.cells, on_gpu, steps, profiled)), flush=True)
        return 0

    from gpusc._bench import git_state, machine, versions

    tag = machine(on_gpu).get("gpu", "cpu").replace(" ", "-") if on_gpu else "cpu"
    record = {"benchmark": "gpu_check", "machine": machine(on_gpu), "versions": versions(),
              "git": git_state(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {}}
    parts = [p.strip() for p in args.parts.split(",")]
    if "tests" in parts and on_gpu:
        record["parts"]["tests"] = run_tests(out, tag)
        print("tests:", {k: record["parts"]["tests"].get(k) for k in ("tests", "failures", "errors", "skipped")},
              flush=True)
    if "sanitizer" in parts and on_gpu:
        record["parts"]["sanitizer"] = run_sanitizer(out, tag, args.sanitizers.split(","))
        print("sanitizer:", {t: r.get("errors") if isinstance(r, dict) else r
                             for t, r in record["parts"]["sanitizer"].items()}, flush=True)
    if "timings" in parts:
        cmd = [sys.executable, __file__, "--timings-only", "--cells", str(args.cells), "--device", args.device]
        if args.steps:
            cmd += ["--steps", args.steps]
        cmd += ["--profile", args.profile]
        r = _run(cmd, LIMITS["timings"], keep_output=True, log=out / f"gpu-check-{tag}-timings.log")
        full = r.pop("output_full").splitlines()  # the record's line is longer than the tail
        lines = [line for line in full if line.startswith("{")]
        if lines and r["rc"] == 0:
            record["parts"]["timings"] = json.loads(lines[-1])
        else:  # stopped or failed: the references and the rows it finished
            refs = [json.loads(line[5:]) for line in full if line.startswith("REFS ")]
            r["references"] = refs[-1] if refs else None
            r["steps"] = [json.loads(line[4:]) for line in full if line.startswith("ROW ")]
            record["parts"]["timings"] = r
        print("\n".join(line for line in r["output_tail"].splitlines()
                        if not line.startswith(("{", "ROW ", "REFS "))), flush=True)
    path = out / f"gpu-check-{tag}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    failed = (record["parts"].get("tests", {}).get("failures", 0) or record["parts"].get("tests", {}).get("errors", 0)
              or any(isinstance(r, dict) and r.get("errors") for r in record["parts"].get("sanitizer", {}).values()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
