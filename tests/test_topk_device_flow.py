"""knn_device's own flow (padding, launches, certification, the float64 redo) on a machine
without a GPU: CuPy is stood in for by NumPy and each kernel of kernels/topk.cu by what it
is defined to compute (the K smallest (key, index) pairs of every row; exact re-ranking).

The kernels also run as written (tests/_on_threads.py: every CUDA thread a std::thread,
mma.sync from the PTX fragment layouts), which checks their logic (selection, merges,
barriers, warp votes and shuffles, the copy pipeline, fragment indexing), not the
hardware: the kernels are compiled with NVRTC in test_kernels_compile.py and run on a GPU
in the GPU-marked tests of test_pp_neighbors.py.
"""

from __future__ import annotations

import re

import _on_threads as on_threads
import numpy as np
import pytest
from test_pp_neighbors import _exact_keys, blobs, compare_sets, direct_knn, with_outliers

from gpusc._core import cuda
from gpusc._kernels import topk


def _smallest(keys, idx, K):
    """Per row the K smallest (key, index) pairs, ascending."""
    order = np.stack([np.lexsort((i, k))[:K] for k, i in zip(keys, idx, strict=True)])
    return np.take_along_axis(keys, order, axis=1), np.take_along_axis(idx, order, axis=1)


class _Kernel:
    """A stand-in that records its launches and runs ``body(*args)`` (the definition) or,
    when set, ``launch(grid, block, args, shared_mem)`` (the kernel as written, on threads)."""

    def __init__(self, body):
        self.body, self.launch, self.launches = body, None, []

    def __call__(self, grid, block, args, shared_mem=0):
        self.launches.append((grid, block, shared_mem))
        self.arguments = args
        if self.launch is not None:
            self.launch(grid, block, args, shared_mem)
        else:
            self.body(*args)


def _fused_candidates(vecs, norms, n, dim_pad, K, q_first, q_end, cand_key, cand_idx):
    n, q_first, q_end = int(n), int(q_first), int(q_end)
    assert vecs.shape[1] == dim_pad and dim_pad % 8 == 0 and vecs.shape[0] % topk.FUSED_QUERIES == 0
    assert q_first % topk.FUSED_QUERIES == 0 and 0 <= q_first < q_end <= n
    assert not (vecs.view(np.uint32) & 0x1FFF).any(), "rows must arrive rounded to TF32"
    keys = norms[None, :n] - np.float32(2) * (vecs[q_first:q_end] @ vecs[:n].T)
    key, idx = _smallest(keys, np.broadcast_to(np.arange(n), keys.shape), int(K))
    cand_key[:] = key + norms[q_first:q_end, None]
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


def _rerank(x, n, dim, code, rows, n_q, cand_key, cand_idx, K, k, err, out_idx, out_dist, kth_key):
    if code == topk.METRICS["manhattan"]:
        err = np.full_like(err, np.inf)  # the kernel skips the key check for exact L1 sums
    cand_idx = np.where((cand_idx >= 0) & (cand_idx < int(n)), cand_idx, -1)  # as the kernel's `valid`
    out_idx[:], out_dist[:], kth_key[:] = topk._rerank_host(
        np.asarray(x, np.float64), np.asarray(rows), np.asarray(cand_key, np.float64), cand_idx,
        int(k), int(code), np.asarray(err))


@pytest.fixture
def device_flow(monkeypatch):
    """knn_device with NumPy as CuPy and the kernels emulated; yields the launch records."""
    device = on_threads.numpy_as_cupy(monkeypatch).cuda.Device()
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
    idx, dist, _ = topk.knn_device(x, k, metric)
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
    idx, dist, certified = topk.knn_device(x, 6, "euclidean")
    assert kernels["topk_tile<double>"].launches, "no float64 redo ran"
    redone = kernels["rerank<double, double>"].arguments[5]  # n_q of the float64 re-ranking
    assert redone == round((1 - certified) * len(x)) and certified < 0.5
    ref_idx, ref_dist = direct_knn(x, 6, "euclidean")
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-12) == 0


@pytest.mark.parametrize("metric", ["euclidean", "manhattan"])
def test_tile_flow_is_exact(device_flow, metric):
    # 65 dimensions (past the fused pass) and small tiles, so that lists merge across tiles
    kernels, _ = device_flow
    x = blobs(n=700, dim=65, seed=1)
    idx, dist, _ = topk.knn_device(x, 10, metric, query_block=256, ref_block=300)
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



# ---------------------------------------------------------------- the kernels as written, on threads

@pytest.fixture(scope="module")
def kernels_on_threads(tmp_path_factory):
    return on_threads.build("topk", tmp_path_factory.mktemp("topk"))


def _as_written(kernels, kernels_on_threads, copies="late"):
    for name, kernel in kernels.items():
        kernel.launch = kernels_on_threads[name]
        kernel.launch.copies = copies
    return kernels


@pytest.fixture(params=["late", "early"])
def threaded_flow(request, device_flow, kernels_on_threads):
    """knn_device with every kernel run as written; cp.async copies landing late or early."""
    kernels, device = device_flow
    return _as_written(kernels, kernels_on_threads, request.param), device


@pytest.mark.parametrize("data", ["blobs", "copies"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_fused_kernel_on_threads_gives_exact_neighbours(threaded_flow, data, metric):
    # "copies": 20 points 30 times each, so rows tie by the dozen and buffers overflow
    kernels, _ = threaded_flow
    x = blobs(n=600, dim=20, seed=5) if data == "blobs" else np.repeat(blobs(n=20, dim=9), 30, axis=0)
    idx, dist, _ = topk.knn_device(x, 15, metric)
    assert len(kernels["fused_candidates"].launches) == 1
    if data == "copies":
        np.testing.assert_array_equal(idx[:, 0], np.arange(len(x)))
        np.testing.assert_allclose(dist, 0, atol=1e-15)  # cosine of a copy: 1 - 1 to rounding
        assert (idx // 30 == np.arange(len(x))[:, None] // 30).all()  # neighbours are copies
    else:
        assert not kernels["topk_tile<double>"].launches, "rows of well-separated blobs went uncertified"
        ref_idx, ref_dist = direct_knn(x.astype(np.float64), 15, metric)
        assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-9) == 0


@pytest.mark.parametrize("metric", ["euclidean", "manhattan"])
@pytest.mark.parametrize("rows", [(0, 256), (256, 700), (512, 513)])
def test_a_block_of_query_rows_gets_the_lists_of_a_search_of_all(device_flow, metric, rows):
    # what one dask-cuda worker runs: its rows against all references; the kernel writes
    # row q's list at q - first, and the launch covers only the block's queries
    kernels, _ = device_flow
    x = blobs(n=700, dim=12, seed=2)
    idx, dist, _ = topk.knn_device(x, 10, metric)
    block_idx, block_dist, _ = topk.knn_device(x, 10, metric, query_rows=rows)
    np.testing.assert_array_equal(block_idx, idx[rows[0]:rows[1]])
    np.testing.assert_array_equal(block_dist, dist[rows[0]:rows[1]])
    if metric == "euclidean":
        grid = kernels["fused_candidates"].launches[-1][0]
        assert grid == (-(-(rows[1] - rows[0]) // topk.FUSED_QUERIES),)
    with pytest.raises(ValueError, match="multiple of 256"):
        topk.knn_device(x, 10, metric, query_rows=(100, 700))


def test_fused_kernel_on_threads_takes_a_block_of_query_rows(device_flow, kernels_on_threads):
    # the kernel as written, queries 256..599 of 600: the same keys as the definition
    kernels = _as_written(device_flow[0], kernels_on_threads)
    n, k = 600, 15
    x = blobs(n=n, dim=20, seed=8).astype(np.float64).view(on_threads.DeviceArray)
    n_cand = topk.n_candidates(k, n, topk.DEVICE_MARGIN)
    key, idx, _ = topk._fused_candidates(x, n_cand, topk.METRICS["euclidean"], 256, n)
    assert key.shape == (n - 256, n_cand)
    vecs, norms = kernels["fused_candidates"].arguments[:2]
    ref_key, ref_idx = np.empty_like(key), np.empty_like(idx)
    _fused_candidates(vecs, norms, n, vecs.shape[1], n_cand, 256, n, ref_key, ref_idx)
    np.testing.assert_allclose(key, ref_key, rtol=0, atol=1e-5 * float(norms[:n].max()))
    assert (np.sort(idx[:, :-1], axis=1) == np.sort(ref_idx[:, :-1], axis=1)).mean() > 0.99


@pytest.mark.parametrize("n, dim, k", [(300, 13, 15), (517, 50, 15), (300, 64, 48), (20, 7, 15)])
def test_fused_kernel_on_threads_keeps_the_smallest_keys(device_flow, kernels_on_threads, n, dim, k):
    kernels = _as_written(device_flow[0], kernels_on_threads)
    x = blobs(n=n, dim=dim, seed=n).astype(np.float64).view(on_threads.DeviceArray)
    n_cand = topk.n_candidates(k, n, topk.DEVICE_MARGIN)
    key, idx, _ = topk._fused_candidates(x, n_cand, topk.METRICS["euclidean"])
    # the definition on the same padded, rounded rows (NumPy's float32 products, summed in
    # another order), as the launch handed them to the kernel
    vecs, norms = kernels["fused_candidates"].arguments[:2]
    ref_key, ref_idx = np.empty_like(key), np.empty_like(idx)
    _fused_candidates(vecs, norms, n, vecs.shape[1], n_cand, 0, n, ref_key, ref_idx)
    assert (np.diff(key, axis=1) >= 0).all()
    np.testing.assert_allclose(key, ref_key, rtol=0, atol=1e-5 * float(norms[:n].max()))
    assert (idx != ref_idx).mean() < 0.01  # order swaps between keys equal but for summation order
    assert (np.sort(idx[:, :-1], axis=1) == np.sort(ref_idx[:, :-1], axis=1)).mean() > 0.99


def test_tile_and_redo_kernels_on_threads(device_flow, kernels_on_threads):
    # the float32 tiles (65 dimensions), the L1 tiles, and rows that TF32 cannot certify
    # (neighbours 1e-3 apart far from the origin) redone by the float64 tiles, all as written
    kernels = _as_written(device_flow[0], kernels_on_threads)
    x = blobs(n=120, dim=65, seed=2)  # small: every warp vote and shuffle is a thread barrier
    for metric in ("euclidean", "manhattan"):
        idx, dist, _ = topk.knn_device(x, 10, metric, query_block=64, ref_block=50)
        ref_idx, ref_dist = direct_knn(x.astype(np.float64), 10, metric)
        assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-9) == 0
    rng = np.random.default_rng(3)
    close = 1000 + rng.normal(scale=1e-3, size=(120, 8))
    close[:, 0] += 50 * rng.integers(3, size=120)
    idx, dist, _ = topk.knn_device(close, 6, "euclidean")
    assert kernels["fused_candidates"].launches and kernels["topk_tile<double>"].launches
    ref_idx, ref_dist = direct_knn(close, 6, "euclidean")
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-12) == 0


# 3 cells (the fewest with_outliers moves) at 10x the median norm; fraction of rows the first
# pass certifies, measured on the host twin of each pass with the device's margin of 16: the
# per-row bound against the global-norm bound it replaced (span = the row's length + the
# longest row's, for every row).
#   fused TF32, blobs 600 x 24 (seed 2):    per row 1.0000, global 0.8450
#   float32 tiles, blobs 1,000 x 100:       per row 1.0000, global 0.7480
@pytest.mark.parametrize(("n", "dim", "seed", "fused"), [(600, 24, 2, True), (1000, 100, 0, False)])
def test_far_outliers_leave_other_rows_certified_on_threads(device_flow, kernels_on_threads, n, dim, seed,
                                                            fused):
    # the rerank kernel as written in both flows; the fused pass as written too (topk_tile,
    # a thread barrier per warp vote, takes its definition: 1,000 rows would take minutes)
    kernels = device_flow[0]
    _as_written({name: kernels[name] for name in kernels if name.startswith(("rerank", "fused"))},
                kernels_on_threads)
    x = with_outliers(blobs(n=n, dim=dim, seed=seed))
    idx, dist, certified = topk.knn_device(x, 15, "euclidean")
    assert bool(kernels["fused_candidates"].launches) == fused
    assert kernels["rerank<float, float>"].launches
    assert certified >= 0.99, f"the first pass certifies only {certified:.2%} of rows"
    ref_idx, ref_dist = direct_knn(x.astype(np.float64), 15, "euclidean")
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-9) == 0


def test_rerank_kernel_on_threads_matches_its_host_twin(kernels_on_threads):
    # rerank<double, float> against _rerank_host on the same lists: k = 20, so the k-th
    # candidate sits in lane 19; the key-check bounds straddle each row's float32 rounding of
    # its keys, so about half the rows pass it (the others get k-th key +inf: no certificate);
    # a quarter of the lists lack the point itself (it replaces the worst candidate), a
    # quarter carry keys that are not their candidates' (never pass)
    rng = np.random.default_rng(7)
    x = blobs(n=200, dim=10, seed=7).astype(np.float64)
    n, k, n_cand = len(x), 20, 36
    exact = _exact_keys(x, topk.METRICS["euclidean"])
    np.fill_diagonal(exact, -1)
    order = np.argsort(exact, axis=1, kind="stable")
    np.fill_diagonal(exact, 0)
    lacks_self = rng.random(n) < 0.25
    cand_idx = np.where(lacks_self[:, None], order[:, 1:n_cand + 1], order[:, :n_cand])
    exact_cand = np.take_along_axis(exact, cand_idx, axis=1)
    cand_key = exact_cand.astype(np.float32)  # ascending, as lists are
    rounding = np.abs(cand_key - exact_cand).max(axis=1)
    mislabelled = rng.random(n) < 0.25  # slots 3 and 30 trade indices, not keys: lanes 3 and 30 object
    cand_idx[mislabelled, 3], cand_idx[mislabelled, 30] = cand_idx[mislabelled, 30], cand_idx[mislabelled, 3]
    err = rounding * rng.uniform(0.5, 1.5, n)
    rows = np.arange(n, dtype=np.int64)
    host = topk._rerank_host(x, rows, cand_key.astype(np.float64), cand_idx, k, 0, err)
    out_idx, out_dist, kth_key = np.empty((n, k), np.int64), np.empty((n, k)), np.empty(n)
    kernels_on_threads["rerank<double, float>"]((-(-n // topk.WARPS_PER_BLOCK),), (128,), (
        x, np.int64(n), np.int64(10), np.int32(0), rows, np.int64(n), cand_key, cand_idx.astype(np.int64),
        np.int32(n_cand), np.int32(k), err, out_idx, out_dist, kth_key))
    passed = np.isfinite(host[2])
    assert 0.2 < passed.mean() < 0.8 and not passed[mislabelled].any()
    np.testing.assert_array_equal(kth_key, host[2])
    np.testing.assert_array_equal(out_idx, host[0])
    np.testing.assert_array_equal(out_dist, host[1])
