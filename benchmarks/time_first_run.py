"""Time ``gpusc run`` as a new user meets it: the first run after ``pip install .`` (numba
compiles gpusc's CPU kernels and writes its cache) and the run after it (everything loaded from
that cache), each in a fresh interpreter, on the default 20,000 synthetic cells.

Usage (the install is not timed)::

    python3.12 -m venv /tmp/user-venv && /tmp/user-venv/bin/pip install '.[bench]'
    python benchmarks/time_first_run.py /tmp/user-venv --out benchmarks/results/cpu-dev-first-run-20k.json

The numba cache starts empty: ``NUMBA_CACHE_DIR`` points at a new empty folder (numba looks
there before the package's ``__pycache__``), and the installed package must hold no ``*.nbc``
files. Writes the raw JSON that ``benchmarks/make_docs.py`` turns into a docs section.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _gpusc_dir(venv: Path) -> Path:
    code = "import gpusc, pathlib; print(pathlib.Path(gpusc.__file__).parent)"
    return Path(subprocess.run([venv / "bin" / "python", "-c", code], check=True, capture_output=True,
                               text=True, cwd=tempfile.gettempdir()).stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path, help="a venv with gpusc installed by `pip install .` (not editable)")
    parser.add_argument("--out", type=Path, required=True, help="the raw JSON to write")
    parser.add_argument("--runs", type=int, default=2, help="runs after the empty cache (default 2: first, warm)")
    args = parser.parse_args()

    package = _gpusc_dir(args.venv)
    if "site-packages" not in str(package):
        raise SystemExit(f"gpusc in {args.venv} is not a wheel install ({package}): pip install . (not -e)")
    stale = list(package.rglob("*.nbc"))
    if stale:
        raise SystemExit(f"{len(stale)} numba cache files already in {package}: reinstall into a fresh venv")

    runs = []
    with tempfile.TemporaryDirectory(prefix="gpusc-numba-cache-") as cache, \
            tempfile.TemporaryDirectory(prefix="gpusc-data-cache-") as data_cache, \
            tempfile.TemporaryDirectory(prefix="gpusc-first-run-") as work:
        # both caches start empty: numba's kernels and gpusc run's drawn synthetic cells
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "GPUSC_CACHE_DIR": data_cache}
        for i in range(args.runs):
            out = Path(work) / f"run{i}"
            load_before = os.getloadavg()
            cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            done = subprocess.run([args.venv / "bin" / "gpusc", "run", "--device", "cpu", "--out", str(out)],
                                  env=env, cwd=work, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            # CPU seconds of the run (all its threads): wall time on a shared machine varies with
            # the other jobs on it, this far less
            cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
            if done.returncode != 0:
                raise SystemExit(f"gpusc run failed:\n{done.stderr[-3000:]}")
            report = json.loads((out / "report.json").read_text())
            runs.append({"run": "first" if i == 0 else "warm", "wall_seconds": wall, "cpu_seconds": cpu,
                         "steps_seconds": report["total_seconds"], "load_seconds": report["load_seconds"],
                         "write_seconds": report["write_seconds"], "report_seconds": report["report_seconds"],
                         "numba_compile_seconds": report["numba"]["compile_seconds"],
                         "numba_functions_compiled": report["numba"]["functions_compiled"],
                         "compiled_ahead": report["numba"].get("compiled_ahead"),
                         "steps": {r["step"]: r["seconds"] for r in report["steps"]},
                         "warnings": [w for r in report["steps"] for w in r["warnings"]],
                         "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                         "input": report["input"], "final_shape": report["final_shape"], "ari": report["ari"]})
            print(f"{runs[-1]['run']}: {wall:.1f} s wall, {cpu:.1f} s CPU, steps {report['total_seconds']:.1f} s, numba compilation "
                  f"{report['numba']['compile_seconds']:.1f} s ({report['numba']['functions_compiled']} functions)")
    record = {"benchmark": "first-run", "command": "gpusc run --device cpu", "user_runs": runs,
              "machine": report["machine"], "versions": report["versions"], "platform": report["platform"],
              "install": "pip install '.[bench]' into a new venv (not timed)",
              "numba_cache": "NUMBA_CACHE_DIR = a new empty folder",
              "data_cache": "GPUSC_CACHE_DIR = a new empty folder (the first run draws the synthetic cells and "
                            "keeps them there, the next reads them)",
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
