"""knn_device's own flow (padding, launches, certification, the float64 redo) on a machine
without a GPU: CuPy is stood in for by NumPy and each kernel of kernels/topk.cu by what it
is defined to compute (the K smallest (key, index) pairs of every row; exact re-ranking).

This checks the launcher, not the CUDA code: the kernels themselves are compiled in
test_kernels_compile.py and run against scikit-learn in the GPU-marked tests of
test_pp_neighbors.py.
"""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest
from test_pp_neighbors import blobs, compare_sets, direct_knn

from gpusc._core import cuda
from gpusc._kernels import topk


class _Array(np.ndarray):
    def get(self):
        return np.asarray(self)


def _on_device(fn):
    return lambda *args, **kwargs: np.asarray(fn(*args, **kwargs)).view(_Array)


def _smallest(keys, idx, K):
    """Per row the K smallest (key, index) pairs, ascending."""
    order = np.stack([np.lexsort((i, k))[:K] for k, i in zip(keys, idx, strict=True)])
    return np.take_along_axis(keys, order, axis=1), np.take_along_axis(idx, order, axis=1)


class _Kernel:
    def __init__(self, body):
        self.body, self.launches = body, []

    def __call__(self, grid, block, args, shared_mem=0):
        self.launches.append((grid, block, shared_mem))
        self.body(*args)


def _fused_candidates(vecs, norms, n, dim_pad, K, cand_key, cand_idx):
    n = int(n)
    assert vecs.shape[1] == dim_pad and dim_pad % 8 == 0 and vecs.shape[0] % topk.FUSED_QUERIES == 0
    assert not (vecs.view(np.uint32) & 0x1FFF).any(), "rows must arrive rounded to TF32"
    keys = norms[None, :n] - np.float32(2) * (vecs[:n] @ vecs[:n].T)
    key, idx = _smallest(keys, np.broadcast_to(np.arange(n), keys.shape), int(K))
    cand_key[:] = key + norms[:n, None]
    cand_idx[:] = idx


def _topk_tile(tile, n_q, n_r, ld, q_norms, r_norms, r_offset, best_key, best_idx, K):
    n_r = int(n_r)
    keys = tile[:, :n_r]
    if not isinstance(q_norms, np.uintp):
        keys = q_norms[:, None] + r_norms[None, :n_r] - keys.dtype.type(2) * keys
    all_keys = np.concatenate([best_key, keys], axis=1)
    all_idx = np.concatenate([best_idx, np.broadcast_to(int(r_offset) + np.arange(n_r), keys.shape)], axis=1)
    best_key[:], best_idx[:] = _smallest(all_keys, all_idx, int(K))


def _manhattan_tile(xq, n_q, xr, n_r, dim, out, ld):
    out[:] = np.abs(xq[:, None, :].astype(np.float64) - xr[None, :, :]).sum(axis=2)


def _rerank(x, n, dim, code, rows, n_q, cand_key, cand_idx, K, k, err, out_idx, out_dist, certified):
    if code == topk.METRICS["manhattan"]:
        err = np.full_like(err, np.inf)  # the kernel skips the key check for exact L1 sums
    idx, dist, cert = topk._rerank_host(np.asarray(x, np.float64), np.asarray(rows),
                                        np.asarray(cand_key, np.float64), np.asarray(cand_idx),
                                        int(k), int(code), np.asarray(err))
    out_idx[:], out_dist[:], certified[:] = idx, dist, cert


@pytest.fixture
def device_flow(monkeypatch):
    """knn_device with NumPy as CuPy and the kernels emulated; yields the launch records."""
    fake = types.ModuleType("cupy")
    for name in ("asarray", "zeros", "full", "empty", "arange", "flatnonzero", "sqrt", "where",
                 "ascontiguousarray"):
        setattr(fake, name, _on_device(getattr(np, name)))
    device = types.SimpleNamespace(attributes={"MaxSharedMemoryPerBlockOptin": 232448})
    fake.cuda = types.SimpleNamespace(Device=lambda: device)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    kernels = {"fused_candidates": _Kernel(_fused_candidates)}
    for t in ("float", "double"):
        kernels[f"topk_tile<{t}>"] = _Kernel(_topk_tile)
        kernels[f"manhattan_tile<{t}>"] = _Kernel(_manhattan_tile)
        for g in ("float", "double"):
            kernels[f"rerank<{t}, {g}>"] = _Kernel(_rerank)
    monkeypatch.setattr(topk, "_kernel", lambda name: kernels[name])
    return kernels, device


@pytest.mark.parametrize("n, dim, k", [(1037, 13, 15), (300, 64, 48), (20, 7, 15)])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_fused_flow_is_exact(device_flow, n, dim, k, metric):
    kernels, _ = device_flow
    x = blobs(n=n, dim=dim, seed=n)
    idx, dist = topk.knn_device(x, k, metric)
    fused = kernels["fused_candidates"].launches
    assert len(fused) == 1
    grid, block, shared = fused[0]
    assert grid == (-(-n // topk.FUSED_QUERIES),) and block == (topk.FUSED_THREADS,)
    assert shared == topk.fused_shared_bytes(min(k + topk.DEVICE_MARGIN, n))
    assert not kernels["topk_tile<double>"].launches, "rows of well-separated blobs went uncertified"
    ref_idx, ref_dist = direct_knn(x.astype(np.float64), k, metric)
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-9) == 0


def test_uncertified_rows_are_redone_in_float64(device_flow):
    # far from the origin with neighbours 1e-3 apart: TF32 cannot certify these rows
    kernels, _ = device_flow
    rng = np.random.default_rng(3)
    x = 1000 + rng.normal(scale=1e-3, size=(400, 8))
    x[:, 0] += 50 * rng.integers(3, size=400)
    idx, dist = topk.knn_device(x, 6, "euclidean")
    assert kernels["topk_tile<double>"].launches, "no float64 redo ran"
    ref_idx, ref_dist = direct_knn(x, 6, "euclidean")
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-12) == 0


@pytest.mark.parametrize("metric", ["euclidean", "manhattan"])
def test_tile_flow_is_exact(device_flow, metric):
    # 65 dimensions (past the fused pass) and small tiles, so that lists merge across tiles
    kernels, _ = device_flow
    x = blobs(n=700, dim=65, seed=1)
    idx, dist = topk.knn_device(x, 10, metric, query_block=256, ref_block=300)
    assert not kernels["fused_candidates"].launches
    ref_idx, ref_dist = direct_knn(x.astype(np.float64), 10, metric)
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-9) == 0


def test_fused_pass_needs_room_for_its_lists(device_flow):
    kernels, device = device_flow
    device.attributes["MaxSharedMemoryPerBlockOptin"] = 166912  # an A100: K <= 46
    x = blobs(n=500, dim=20)
    topk.knn_device(x, 30, "euclidean")  # K = 46
    assert len(kernels["fused_candidates"].launches) == 1
    topk.knn_device(x, 31, "euclidean")  # K = 47: the tile path
    assert len(kernels["fused_candidates"].launches) == 1
    with pytest.raises(ValueError, match="shared memory"):
        topk.knn_device(x, 31, "euclidean", fused=True)


def test_launcher_constants_match_the_kernel_defines():
    # the launcher lays out shared memory and pads with these; the kernel compiles with its own
    defines = dict(re.findall(r"^#define (\w+) (.+?)(?:\s*//.*)?$", cuda.kernel_source("topk"), re.M))
    value = lambda name: eval(re.sub(r"[A-Z_]+", lambda m: str(value(m.group())), defines[name]))  # noqa: E731,S307
    for name in ("TOPK_MAX", "WARPS_PER_BLOCK", "FUSED_QUERIES", "FUSED_REFS", "FUSED_STRIDE",
                 "FUSED_BUF", "FUSED_MAX_DIM", "FUSED_MAX_K"):
        assert value(name) == getattr(topk, name), name
    assert value("FUSED_WARPS") * 32 == topk.FUSED_THREADS
