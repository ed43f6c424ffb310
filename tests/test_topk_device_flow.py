"""knn_device's own flow (padding, launches, certification, the float64 redo) on a machine
without a GPU: CuPy is stood in for by NumPy and each kernel of kernels/topk.cu by what it
is defined to compute (the K smallest (key, index) pairs of every row; exact re-ranking).

The fused pass also runs as written: its section of kernels/topk.cu is compiled with g++
against tests/fused_emulation.h, which makes every CUDA thread a std::thread and computes
mma.sync from the PTX fragment layouts. That checks its logic (selection, merges, barriers,
the copy pipeline, fragment indexing), not the hardware: the kernels are compiled with
NVRTC in test_kernels_compile.py and run on a GPU in the GPU-marked tests of
test_pp_neighbors.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types

from pathlib import Path

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
    cand_idx = np.where((cand_idx >= 0) & (cand_idx < int(n)), cand_idx, -1)  # as the kernel's `valid`
    idx, dist, cert = topk._rerank_host(np.asarray(x, np.float64), np.asarray(rows),
                                        np.asarray(cand_key, np.float64), cand_idx,
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


# ---------------------------------------------------------------- the fused kernel itself, on threads

_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <thread>

int main(int argc, char** argv) {
    FILE* f = std::fopen(argv[1], "rb");
    long long n, n_pad;
    int dim_pad, K;
    bool ok = std::fread(&n, 8, 1, f) && std::fread(&n_pad, 8, 1, f) && std::fread(&dim_pad, 4, 1, f)
              && std::fread(&K, 4, 1, f);
    std::vector<float> vecs(n_pad * dim_pad), norms(n_pad), cand_key(n * K);
    std::vector<long long> cand_idx(n * K);
    ok = ok && std::fread(vecs.data(), 4, vecs.size(), f) == vecs.size()
         && std::fread(norms.data(), 4, norms.size(), f) == norms.size();
    std::fclose(f);
    if (!ok) return 2;
    copies_land_early = argc > 3;
    const int threads = FUSED_WARPS * 32;
    blockDim.x = threads;
    for (long long b = 0; b < n_pad / FUSED_QUERIES; ++b) {
        blockIdx.x = (unsigned)b;
        block_barrier = std::make_unique<std::barrier<>>(threads);
        warps.clear();
        for (int w = 0; w < FUSED_WARPS; ++w) warps.push_back(std::make_unique<Warp>());
        std::memset(smem, 0xff, sizeof smem);  // shared memory starts as garbage
        std::atomic<int> left_copies{0};
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
            pool.emplace_back([&, t] {
                threadIdx.x = t;
                copy_groups = {{}};
                fused_candidates(vecs.data(), norms.data(), n, dim_pad, K, cand_key.data(), cand_idx.data());
                left_copies += copy_groups.size() != 1 || !copy_groups.back().empty();
            });
        for (auto& th : pool) th.join();
        if (left_copies) return 3;  // a copy was queued and never waited for
    }
    f = std::fopen(argv[2], "wb");
    std::fwrite(cand_key.data(), 4, cand_key.size(), f);
    std::fwrite(cand_idx.data(), 8, cand_idx.size(), f);
    std::fclose(f);
    return 0;
}
"""


@pytest.fixture(scope="module")
def fused_on_threads(tmp_path_factory):
    """The fused section of kernels/topk.cu built for the CPU; a kernel stand-in that runs it."""
    compiler = shutil.which("g++")
    assert compiler, "g++ is needed to run the fused kernel on the CPU"
    source = cuda.kernel_source("topk")
    section = source[source.index("// ---------------------------------------------------------------- fused"):]
    here = tmp_path_factory.mktemp("fused")
    (here / "fused.cpp").write_text('#include "fused_emulation.h"\n' + section + _HARNESS)
    binary = here / "fused"
    subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas",
                    f"-I{Path(__file__).parent}", str(here / "fused.cpp"), "-o", str(binary)],
                   check=True, capture_output=True)

    def run(vecs, norms, n, dim_pad, K, cand_key, cand_idx, copies="late"):
        inputs, outputs = here / "in.bin", here / "out.bin"
        with open(inputs, "wb") as f:
            f.write(np.int64([n, vecs.shape[0]]).tobytes() + np.int32([dim_pad, K]).tobytes())
            f.write(np.ascontiguousarray(vecs, np.float32).tobytes() + np.ascontiguousarray(norms).tobytes())
        early = ["early"] if copies == "early" else []
        done = subprocess.run([str(binary), str(inputs), str(outputs), *early], capture_output=True)
        assert done.returncode == 0, f"the fused kernel on threads exited {done.returncode}"
        out = np.fromfile(outputs, np.uint8)
        cand_key[:] = out[: cand_key.nbytes].view(np.float32).reshape(cand_key.shape)
        cand_idx[:] = out[cand_key.nbytes:].view(np.int64).reshape(cand_idx.shape)

    return run


@pytest.mark.parametrize("n, dim, k", [(300, 13, 15), (517, 50, 15), (300, 64, 48), (20, 7, 15)])
def test_fused_kernel_on_threads_keeps_the_smallest_keys(device_flow, fused_on_threads, n, dim, k):
    kernels, _ = device_flow
    x = blobs(n=n, dim=dim, seed=n)
    n_cand = topk.n_candidates(k, n, topk.DEVICE_MARGIN)
    ours_key, ours_idx = np.empty((n, n_cand), np.float32), np.empty((n, n_cand), np.int64)
    vecs_norms = {}
    kernels["fused_candidates"].body = lambda v, nrm, *rest: (
        vecs_norms.update(vecs=v.copy(), norms=nrm.copy()), fused_on_threads(v, nrm, *rest))
    key, idx, _ = topk._fused_candidates(np.asarray(x).view(_Array), n_cand, topk.METRICS["euclidean"])
    ours_key[:], ours_idx[:] = key, idx
    # the definition on the same rounded rows (NumPy's float32 products, summed in another order)
    _fused_candidates(vecs_norms["vecs"], vecs_norms["norms"], n, vecs_norms["vecs"].shape[1], n_cand,
                      ref_key := np.empty_like(ours_key), ref_idx := np.empty_like(ours_idx))
    assert (np.diff(ours_key, axis=1) >= 0).all()
    np.testing.assert_allclose(ours_key, ref_key, rtol=0, atol=1e-5 * float(vecs_norms["norms"][:n].max()))
    differ = ours_idx != ref_idx
    assert differ.mean() < 0.01  # order swaps between keys equal to within summation order
    assert (np.sort(ours_idx[:, :-1], axis=1) == np.sort(ref_idx[:, :-1], axis=1)).mean() > 0.99


@pytest.mark.parametrize("copies", ["late", "early"])
@pytest.mark.parametrize("data", ["blobs", "copies"])
def test_fused_kernel_on_threads_gives_exact_neighbours(device_flow, fused_on_threads, data, copies):
    # "copies": 20 points 30 times each, so rows tie by the dozen and buffers overflow
    kernels, _ = device_flow
    kernels["fused_candidates"].body = lambda *args: fused_on_threads(*args, copies=copies)
    x = blobs(n=600, dim=20, seed=5) if data == "blobs" else np.repeat(blobs(n=20, dim=9), 30, axis=0)
    idx, dist = topk.knn_device(x, 15, "euclidean")
    assert len(kernels["fused_candidates"].launches) == 1
    if data == "copies":
        np.testing.assert_array_equal(idx[:, 0], np.arange(len(x)))
        np.testing.assert_array_equal(dist, 0)
        assert (idx // 30 == np.arange(len(x))[:, None] // 30).all()  # neighbours are copies
    else:
        assert not kernels["topk_tile<double>"].launches
        ref_idx, ref_dist = direct_knn(x.astype(np.float64), 15, "euclidean")
        assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-9) == 0
