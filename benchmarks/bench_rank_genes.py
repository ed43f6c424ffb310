"""rank_genes_groups, gpusc against scanpy 1.12 (and illico's Wilcoxon, when installed).

50,000 cells model-drawn from pbmc3k (gpusc.datasets.resample, groupby seurat_cell_type: 9
groups), every gene, after scanpy's normalize_total and log1p (CSR float32). Per step: one
warm-up call each, then the best of --repeats on fresh copies (copies and, with --device gpu,
gpusc's host-to-device transfer not timed); the Wilcoxon steps (scanpy: minutes) take the
best of $WILCOXON_REPEATS (default 1) instead. Steps:
  t-test            rank_genes_groups(groupby, method="t-test")
  wilcoxon          method="wilcoxon" (one group against the rest, no tie correction)
  wilcoxon_ref      method="wilcoxon", reference = the largest group, tie_correct=True
illico (https://github.com/remydubois/illico) runs the same one-against-rest Wilcoxon test
(asymptotic_wilcoxon, no continuity correction, no tie correction, as scanpy's default) on
the same data, with as many threads as the machine has cores; it is not a dependency of
gpusc: install it somewhere of its own and put it on PYTHONPATH for the run, e.g.
    pip install --no-deps --target /tmp/illico_site illico loguru
    PYTHONPATH=/tmp/illico_site python benchmarks/bench_rank_genes.py
Without it the illico row is left out with a note.

    python benchmarks/bench_rank_genes.py [--cells 50000] [--repeats 3] [--device cpu|gpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import warnings

import anndata as ad
import scanpy as sc
from _timing import DATA, METHOD, best_of, parse_args, save, side_by_side

import gpusc
from gpusc._bench import load_average

GROUPBY = "seurat_cell_type"


def _illico(logged: ad.AnnData, args) -> dict:
    """illico's one-against-rest Wilcoxon on the wilcoxon step's data, or why it did not run."""
    try:
        from illico import asymptotic_wilcoxon
    except ImportError as err:
        return {"step": "wilcoxon", "illico": None, "note": f"illico not installed ({err}); skipped"}

    def run(a):
        asymptotic_wilcoxon(a, is_log1p=True, group_keys=GROUPBY, reference=None,
                            n_threads=os.cpu_count(), use_continuity=False, tie_correct=False,
                            return_as_scanpy=True)

    times = best_of(run, logged.copy, args.repeats)
    row = {"step": "wilcoxon", "illico": {"seconds": times, "best": min(times),
                                          "n_threads": os.cpu_count()}}
    print(f"{'wilcoxon (illico)':22s} illico {min(times):8.3f} s", flush=True)
    return row


def main() -> None:
    args, on_gpu, out = parse_args(__doc__, "rank-genes")
    args.wilcoxon_repeats = int(os.environ.get("WILCOXON_REPEATS", "1"))

    logged = gpusc.datasets.resample(ad.read_h5ad(DATA), args.cells, groupby=GROUPBY, seed=0)
    sc.pp.normalize_total(logged)
    sc.pp.log1p(logged)
    largest = logged.obs[GROUPBY].value_counts().index[0]

    def rank(**kw):
        def call(module):
            def run(a):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module.rank_genes_groups(a, GROUPBY, **kw)
            return run
        return logged, call

    module_of = {"scanpy": lambda name: sc.tl, "gpusc": lambda name: gpusc.tl}
    load_before = load_average()
    # the t-test takes a second: best of --repeats; scanpy's Wilcoxon takes minutes: best of
    # --wilcoxon-repeats (default 1)
    rows = side_by_side({"t-test": rank(method="t-test")}, module_of, args, on_gpu)
    slow = argparse.Namespace(**{**vars(args), "repeats": args.wilcoxon_repeats})
    rows += side_by_side({"wilcoxon": rank(method="wilcoxon"),
                          "wilcoxon_ref": rank(method="wilcoxon", reference=largest, tie_correct=True)},
                         module_of, slow, on_gpu)
    rows.append(_illico(logged, slow))
    save(out, "rank-genes", args, on_gpu, load_before,
         {"description": f"{args.cells:,} cells model-drawn (gpusc.datasets.resample) from pbmc3k, "
                         f"groupby {GROUPBY} ({logged.obs[GROUPBY].nunique()} groups), seed 0; "
                         "normalize_total + log1p (scanpy), CSR float32, all genes",
          "shape": list(logged.shape), "nnz": int(logged.X.nnz), "reference": str(largest)},
         METHOD, rows)


if __name__ == "__main__":
    main()
