"""Time ``gpusc.datasets.synthetic(200_000, 20_000, density=0.05)`` (the generator, on the CPU).

One small untimed call first (numba compilation), then ``--repeats`` timed calls; the
best is reported with the load average, the machine and the matrix size.

    python benchmarks/time_synthetic.py [--n-obs 200000] [--n-vars 20000] [--density 0.05]
                                        [--repeats 2] [--out benchmarks/results/cpu-dev-synthetic-200k.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-obs", type=int, default=200_000)
    parser.add_argument("--n-vars", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import numba

    from gpusc import datasets
    from gpusc._bench import PeakRSS, git_state, load_average, machine, versions

    datasets.synthetic(500, 200, seed=args.seed)  # warm-up: numba compilation, not counted
    load_before = load_average()
    times, peaks = [], []
    for _ in range(args.repeats):
        with PeakRSS() as rss:
            start = time.perf_counter()
            adata = datasets.synthetic(args.n_obs, args.n_vars, density=args.density, seed=args.seed)
            times.append(time.perf_counter() - start)
        peaks.append(rss.peak)
        shape, nnz = list(adata.shape), int(adata.X.nnz)
        del adata
    record = {
        "benchmark": "gpusc.datasets.synthetic generation time",
        "call": f"gpusc.datasets.synthetic({args.n_obs}, {args.n_vars}, density={args.density}, seed={args.seed})",
        "shape": shape, "nnz": nnz, "density_measured": nnz / (shape[0] * shape[1]),
        "seconds": times, "best_seconds": min(times),
        "peak_rss_gib": round(max(peaks) / 2**30, 3) if peaks[0] is not None else None,
        "numba_threads": numba.get_num_threads(),
        "load_average_before": load_before, "load_average_after": load_average(),
        "method": "one small untimed call first (numba compilation); best of the repeats",
        "machine": machine(), "versions": versions(), "git": git_state(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"{record['call']}: {shape[0]:,} x {shape[1]:,}, nnz {nnz:,}; best {min(times):.1f} s of {times} "
          f"(load {load_before} -> {record['load_average_after']})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
