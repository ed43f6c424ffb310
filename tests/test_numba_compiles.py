"""What a first ``gpusc run`` compiles: the CPU kernels' threads are their ``prange`` loops
only (:func:`gpusc._kernels.prange_only`), and the per-row functions those loops call with
the loop's index compile once per input type, not a second time for prange's unsigned index
(inside its thread function the index is a uint64)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numba
import numpy as np

from gpusc._kernels import prange_only


def test_prange_only_is_a_new_dict_each_time():
    # numba empties the dict it is given: a shared one would leave the next kernel with
    # numba's defaults (every option on)
    first = prange_only()
    assert first == prange_only() and first is not prange_only()
    assert first["prange"] and not any(v for k, v in first.items() if k != "prange")

    @numba.njit(parallel=prange_only())
    def add_one(a):
        for i in numba.prange(a.size):
            a[i] += 1.0

    a = np.zeros(1000)
    add_one(a)
    np.testing.assert_array_equal(a, 1.0)


CALLS = """
import json, sys
import numpy as np
from numba.core import event
from scipy import sparse
from gpusc._kernels import connectivity, moments, umap

compiled = []

class Listener(event.Listener):
    def on_start(self, ev):
        func = ev.data["dispatcher"].py_func
        compiled.append([func.__module__ + "." + func.__qualname__, str(ev.data["args"])])

    def on_end(self, ev):
        pass

event.register("numba:compile", Listener())
rng = np.random.default_rng(0)
dist = np.sort(rng.uniform(0, 1, (300, 10)), axis=1)
dist[:, 0] = 0.0  # each point its own first neighbour
idx = np.argsort(rng.uniform(0, 1, (300, 300)), axis=1)[:, :10]
idx[:, 0] = np.arange(300)
connectivity.umap_memberships_host(idx, dist)
counts = sparse.random(200, 50, density=0.2, format="csr", dtype=np.float32, random_state=0)
moments.gene_moments(counts)
graph = sparse.random(300, 300, density=0.05, format="coo", random_state=1)
umap.optimize_layout_host(rng.uniform(0, 10, (300, 2)), graph.row, graph.col,
                          umap.epochs_per_sample(graph.data, 20), 20, 1.58, 0.9, 1.0, 1.0, 5.0, 7)
json.dump(compiled, sys.stdout)
"""
HELPERS = ("connectivity._membership_row", "moments._moments_slice", "umap._apply_moves")


def test_row_functions_compile_once(tmp_path):
    # a fresh numba cache: a cached kernel loads its helpers' code with it, compiling nothing
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", CALLS], env=env, capture_output=True, text=True,
                          check=True)
    compiled = json.loads(done.stdout)
    for helper in HELPERS:
        signatures = [args for name, args in compiled if name == f"gpusc._kernels.{helper}"]
        assert len(signatures) == 1, (helper, signatures)  # not again for prange's uint64 index
        assert "uint64" not in signatures[0], (helper, signatures)
