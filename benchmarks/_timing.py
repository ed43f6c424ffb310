"""What benchmarks/bench_*.py share: arguments, the data path, fresh inputs and best-of timing."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import anndata as ad

import gpusc
from gpusc._bench import synchronize

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GPUSC_DATA", ROOT / ".." / "shared" / "data")) / "pbmc3k_counts_labeled.h5ad"


def parse_args(doc: str, name: str) -> tuple[argparse.Namespace, bool, Path]:
    """``(args, on_gpu, out)``; out defaults to benchmarks/results/{device}-dev-{name}-{cells}k.json."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / f"benchmarks/results/{args.device}-dev-{name}-{args.cells // 1000}k.json"
    return args, args.device == "gpu", out


def fresh(lib: str, data: ad.AnnData, on_gpu: bool):
    """A maker of fresh copies of ``data`` for ``lib``; gpusc's go to the device on the GPU."""
    def make() -> ad.AnnData:
        a = data.copy()
        if lib == "gpusc" and on_gpu:
            gpusc.get.anndata_to_GPU(a)
        return a
    return make


def best_of(fn, make_input, repeats: int, on_gpu: bool = False) -> list[float]:
    """One warm-up call (numba/NVRTC compilation, caches), then ``repeats`` timed calls on
    fresh inputs; making the input is not timed, the device is synchronised around each call."""
    fn(make_input())
    synchronize(on_gpu)
    times = []
    for _ in range(repeats):
        a = make_input()
        synchronize(on_gpu)
        start = time.perf_counter()
        fn(a)
        synchronize(on_gpu)
        times.append(time.perf_counter() - start)
    return times
