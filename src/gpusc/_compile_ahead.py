"""``gpusc run``'s later kernels compiled in a second process while the run does its first steps.

The first run after an install spends most of its time in numba's compiler, which works one
function after another on one core. On a cold cache, :meth:`Ahead.start` launches this module as a
second process: it runs the later steps of :data:`gpusc.__main__.STEPS` (from ``scale`` to
``rank_genes_groups``) on a few hundred made-up cells whose arrays have the dtypes the run
gives those steps (log-normalised float32 CSR with int32 indices), so numba compiles their
kernels on the other core and writes them to its on-disk cache while the run is still reading,
filtering and normalising. When the run reaches those steps, numba loads the kernels from the
cache instead of compiling them; a kernel the run reaches first it compiles itself, as without
this process. The result does not depend on it: the cache holds the same machine code either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

FIRST_STEP = "scale"  # the run compiles the steps before it itself


def cache_is_cold() -> bool:
    """Whether numba's cache lacks the umap optimiser, one of the kernels this process compiles
    (a cache that has it was filled by an earlier run or by this process: it has the others)."""
    from ._kernels import umap

    try:
        return not os.path.exists(umap._optimize_host._cache._cache_file._index_path)  # numba's private layout
    except AttributeError:  # another numba: do not guess, compile in the run as before
        return False


class Ahead:
    """The second process of one run: :meth:`start` it on a cold cache, :meth:`finish` it once
    the run's steps are done (``outcome`` says what it did); leaving the ``with`` block stops it
    if the run failed and waits for it otherwise."""

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self.outcome: dict = {"started": False}

    def start(self) -> None:
        if not cache_is_cold():
            return
        # one numba thread: the few hundred cells take no time, the compiler is single-threaded
        env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
        self._process = subprocess.Popen([sys.executable, "-m", "gpusc._compile_ahead"], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
        self.outcome["started"] = True

    def finish(self, timeout: float = 120.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()  # numba writes each cache file whole (a rename): none is left half-written
            _, stderr = process.communicate()
        self.outcome.update(returncode=process.returncode, stderr=(stderr or "")[-2000:])

    def __enter__(self) -> Ahead:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.finish(timeout=0.0 if exc_type is not None else 120.0)


def made_up_cells(n_obs: int = 450, n_vars: int = 120, seed: int = 0):
    """Cells along a continuum (each gene peaks at its own place on it), log-normalised, as
    float32 CSR (int32 indices) in X and raw: what the run's later steps receive, small enough to
    take no time. A continuum, not separate groups: its neighbourhood graph is connected, so
    umap's spectral start is gpusc's own (a disconnected graph would take umap-learn's per-component
    layout and compile umap-learn's kernels, which the run does not use); Leiden still cuts it
    into several clusters for rank_genes_groups."""
    import anndata as ad
    import numpy as np
    from scipy import sparse

    rng = np.random.default_rng(seed)
    place = np.sort(rng.uniform(0, 1, n_obs))
    peak = np.linspace(0, 1, n_vars)
    rates = 0.3 + 6.0 * np.exp(-(((place[:, None] - peak[None, :]) / 0.15) ** 2))
    counts = rng.poisson(rates).astype(np.float32)
    x = sparse.csr_matrix(np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4), dtype=np.float32)
    adata = ad.AnnData(x)
    adata.raw = adata
    return adata


def main() -> None:
    warnings.simplefilter("ignore")  # nobody reads this process's output
    import gpusc

    from .__main__ import STEPS, _parser

    args = _parser().parse_args(["run"])
    gpusc.settings.device = "cpu"
    adata = made_up_cells()
    first = [step.name for step in STEPS].index(FIRST_STEP)
    for step in STEPS[first:]:
        if step.available() and not (step.skip_if and step.skip_if(adata)):
            step.run(gpusc, adata, args)


if __name__ == "__main__":
    main()
