"""The first per-step preprocessing benchmark, now a thin wrapper around ``gpusc bench``.

It produced ``results/cpu-dev-preprocess-50k.json`` (commit e307361; that file keeps its
own format). The same measurement now::

    python benchmarks/bench_preprocess.py [--cells 50000] [--repeats 3] [--device cpu|gpu] [--out DIR]

runs ``gpusc bench --data $GPUSC_DATA/pbmc3k_counts_labeled.h5ad --groupby seurat_cell_type
--steps qc,filter_cells,filter_genes,normalize,log1p`` and writes
``DIR/<device>-<host>-preprocess-<cells/1000>k.{json,md,png}`` (default DIR benchmarks/results).
The method is gpusc._bench's (warm-up, best of repeats, scanpy's previous output as input).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GPUSC_DATA", ROOT / ".." / "shared" / "data"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host-tag", default=None, help="name in the result files (default: the hostname)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    from gpusc.__main__ import main as gpusc_main

    tag = args.host_tag or re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "dev"
    return gpusc_main(["bench", "--cells", str(args.cells), "--repeats", str(args.repeats), "--device", args.device,
                       "--seed", str(args.seed), "--data", str(DATA / "pbmc3k_counts_labeled.h5ad"),
                       "--groupby", "seurat_cell_type", "--steps", "qc,filter_cells,filter_genes,normalize,log1p",
                       "--out", str(args.out), "--name", f"{args.device}-{tag}-preprocess-{args.cells // 1000}k"])


if __name__ == "__main__":
    sys.exit(main())
