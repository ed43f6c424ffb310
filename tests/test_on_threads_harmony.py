"""kernels/harmony.cu run as written on the CPU (tests/_on_threads.py: every CUDA thread a
std::thread), launched by gpusc._kernels.harmony.DeviceSteps itself with NumPy standing in for
CuPy: grids, argument order and types, shared-memory and global per-batch sums, the pass
order. Compared with the numba twins (HostSteps) kernel by kernel and through a whole
Harmony run; the oracle of the algorithm itself is harmonypy (test_pp_harmony.py).

Exactness: given the same soft assignments, the fixed-point per-batch sums are integers and
must be equal. The soft assignments themselves differ in the last bits (the host's
polynomial exp2 against expf), hence the stated rtol.
"""

from __future__ import annotations

import _on_threads as on_threads
import numpy as np
import pytest

from gpusc._core import cuda
from gpusc._kernels import harmony
from gpusc._kernels.harmony import DeviceSteps, HostSteps, Pass
from gpusc.pp._harmony import harmonize

N_CELLS, N_DIMS, N_CLUSTERS = 203, 9, 7  # 203: a partial last tile


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return on_threads.build("harmony", tmp_path_factory.mktemp("harmony"))


@pytest.fixture
def device(built, monkeypatch):
    fake = on_threads.numpy_as_cupy(monkeypatch)
    for name in ("bincount", "argmin"):
        make = getattr(np, name)
        setattr(fake, name, lambda *a, make=make, **k: np.asarray(make(*a, **k)).view(on_threads.DeviceArray))
    monkeypatch.setattr(cuda, "get_kernel", lambda family, names, name: built[name])
    return fake


def _problem(seed=0, n_keys=2):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N_CELLS, N_DIMS)).astype(np.float32)
    z[5] = 0  # a zero row stays zero
    n_levels = [3, 2][:n_keys]
    codes = np.stack([rng.integers(0, n, N_CELLS) + sum(n_levels[:i])
                      for i, n in enumerate(n_levels)])
    centroids = rng.normal(size=(N_CLUSTERS, N_DIMS)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return z, codes, n_levels, centroids


@pytest.mark.parametrize("n", [1, 16, 17, 1000])
def test_pass_order_visits_every_cell_once(n):
    keys = harmony.pass_keys(3, 1)
    half = harmony.feistel_half_bits(-(-n // harmony.TILE))
    order = harmony.pass_order(n, half, *keys)
    assert np.array_equal(np.sort(order), np.arange(n))
    if n > 2 * harmony.TILE:
        assert not np.array_equal(order, np.arange(n))


def test_blocks_cover_the_tiles():
    n = 1000
    n_tiles = -(-n // harmony.TILE)
    parts = harmony.blocks(n, 0.05, (1, 2, 3, 4), 3)
    assert len(parts) == 20
    assert parts[0].first_tile == 0
    assert sum(p.n_slots for p in parts) == n_tiles * harmony.TILE


@pytest.mark.parametrize("shared", [True, False])
def test_kernels_as_numba_twins(device, monkeypatch, shared):
    if not shared:  # the global-memory path of the per-batch sums
        monkeypatch.setattr(harmony, "SHARED_SUMS_BYTES", 0)
    z, codes, n_levels, centroids = _problem()
    n_batches = sum(n_levels)
    cell_batches = np.ascontiguousarray(codes.T, np.int32)
    sigma = np.full(N_CLUSTERS, 0.1, np.float32)
    inv_sigma = (1 / sigma).astype(np.float32)

    unit_host = HostSteps.unit_rows(z)
    unit_device = DeviceSteps.unit_rows(DeviceSteps.to_array(z))
    np.testing.assert_allclose(unit_device, unit_host, rtol=1e-6, atol=1e-7)
    assert not unit_device[5].any()

    results = {}
    for steps in (HostSteps, DeviceSteps):
        x = steps.to_array(unit_host)
        dist = steps.similarity(x, centroids)
        r = steps.empty((N_CELLS, N_CLUSTERS), np.float32)
        every = Pass.every_cell(N_CELLS)
        sums, terms = steps.assign(dist, steps.to_array(sigma), steps.to_array(inv_sigma), None,
                                   steps.to_array(cell_batches), n_batches, r, every,
                                   similarity=True)
        results[steps.name] = (np.array(dist), np.array(r), np.array(sums), terms)
    (dist_h, r_h, sums_h, terms_h), (dist_d, r_d, sums_d, terms_d) = results["cpu"], results["gpu"]
    np.testing.assert_allclose(dist_d, dist_h, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r_d, r_h, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r_h.sum(axis=1), 1, rtol=1e-5)
    # fixed-point sums of nearly equal values: equal to within 1e-5 of a cell
    assert np.abs(sums_d - sums_h).max() < 1e-5 * harmony.FIXED_SCALE
    np.testing.assert_allclose(terms_d, terms_h, rtol=1e-5)

    # a block of a shuffled pass, with the diversity penalty, from the same R on both sides
    keys = harmony.pass_keys(11, 2)
    half = harmony.feistel_half_bits(-(-N_CELLS // harmony.TILE))
    block = harmony.blocks(N_CELLS, 0.3, keys, half)[1]
    share = np.bincount(codes.ravel(), minlength=n_batches) / N_CELLS
    theta = np.linspace(1, 2, n_batches)
    after = {}
    for steps in (HostSteps, DeviceSteps):  # copies: both sides write R and the sums in place
        r = steps.to_array(r_h.copy())
        o_sums = steps.to_array(sums_h.copy())
        removed = steps.batch_sums(r, steps.to_array(cell_batches), n_batches, block)
        log_div = steps.log_diversity(o_sums, removed, steps.to_array(share),
                                      steps.to_array(theta))
        added, terms = steps.assign(steps.to_array(dist_h.copy()), steps.to_array(sigma),
                                    steps.to_array(inv_sigma), log_div,
                                    steps.to_array(cell_batches), n_batches, r, block)
        steps.apply_delta(o_sums, removed, added)
        after[steps.name] = (np.array(removed), np.array(log_div), np.array(r), np.array(o_sums),
                             terms)
    host, dev = after["cpu"], after["gpu"]
    assert np.array_equal(dev[0], host[0])  # the same R: the same integers
    np.testing.assert_allclose(dev[1], host[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dev[2], host[2], rtol=1e-5, atol=1e-7)
    n_tiles = -(-N_CELLS // harmony.TILE)
    tiles = [harmony.tile_at(p, n_tiles, half, *(np.uint64(k) for k in keys))
             for p in range(block.first_tile, block.first_tile + block.n_slots // harmony.TILE)]
    in_block = {t * harmony.TILE + i for t in tiles for i in range(harmony.TILE)}
    changed = set(np.flatnonzero(np.abs(host[2] - r_h).max(axis=1) > 0).tolist())
    assert changed and changed <= in_block  # only the block's cells were reassigned
    assert np.abs(dev[3] - host[3]).max() < 1e-5 * harmony.FIXED_SCALE
    np.testing.assert_allclose(dev[4], host[4], rtol=1e-5)


def test_assign_then_sums_as_assign_and_batch_sums(device):
    # the next block's sums computed with this block's assignment (host: one parallel region)
    # equal batch_sums after the assignment, on both sides
    z, codes, n_levels, centroids = _problem(seed=2)
    n_batches = sum(n_levels)
    cell_batches = np.ascontiguousarray(codes.T, np.int32)
    sigma = np.full(N_CLUSTERS, 0.1, np.float32)
    inv_sigma = (1 / sigma).astype(np.float32)
    x = HostSteps.unit_rows(z)
    dist = 2 * (1 - x @ centroids.T)
    r0 = np.random.default_rng(2).dirichlet(np.ones(N_CLUSTERS), N_CELLS).astype(np.float32)
    keys = harmony.pass_keys(5, 1)
    block, following = harmony.blocks(N_CELLS, 0.3, keys,
                                      harmony.feistel_half_bits(-(-N_CELLS // harmony.TILE)))[1:3]
    log_div = np.linspace(-1, 1, n_batches * N_CLUSTERS, dtype=np.float32).reshape(n_batches, -1)
    results = {}
    for steps in (HostSteps, DeviceSteps):
        args = [steps.to_array(a) for a in (dist, sigma, inv_sigma, log_div, cell_batches)]
        r_fused, r_apart = steps.to_array(r0.copy()), steps.to_array(r0.copy())
        fused = steps.assign_then_sums(*args, n_batches, r_fused, block, following)
        apart = steps.assign(*args, n_batches, r_apart, block)
        following_sums = steps.batch_sums(r_apart, args[4], n_batches, following)
        assert np.array_equal(np.array(fused[0]), np.array(apart[0]))
        assert np.array_equal(np.array(fused[2]), np.array(following_sums))
        assert np.array_equal(np.array(r_fused), np.array(r_apart))
        np.testing.assert_array_equal(fused[1], apart[1])
        results[steps.name] = np.array(fused[2])
    assert np.array_equal(results["cpu"], results["gpu"])  # the same R rows: the same integers
    total = results["cpu"][n_batches]
    assert total.sum() > 0 and np.array_equal(results["cpu"][:n_levels[0]].sum(axis=0), total)


def test_race_winners_as_every_key():
    # the host's race skips the logarithm of rows that cannot win: the winners must be those
    # of every key (kernels/harmony.cu's race_keys, then the column minima)
    rng = np.random.default_rng(7)
    for n, n_cols, seed in ((5000, 30, 1), (5000, 30, 2), (800, 100, 3)):
        x = HostSteps.unit_rows(rng.normal(size=(n, 12)).astype(np.float32))
        seed_rows = rng.integers(0, n, n_cols)
        keys = x @ x[seed_rows].T
        harmony._race_keys_host(keys, np.uint64(seed))
        assert np.array_equal(HostSteps.race_winners(x, seed_rows, seed),
                              harmony._winners(keys, np))


def test_kmeans_step_as_numpy():
    rng = np.random.default_rng(8)
    x = HostSteps.unit_rows(rng.normal(size=(3000, 10)).astype(np.float32))
    means = x[rng.choice(3000, 40, replace=False)].copy()
    means[5] = means[4]  # a tie: the first mean takes the cells
    sums, counts = HostSteps.kmeans_step(x, means)
    norms = (means.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
    labels = np.argmax(np.float32(2) * (x @ means.T) - norms, axis=1)
    expected = np.zeros((40, 10))
    np.add.at(expected, labels, x.astype(np.float64))
    assert np.array_equal(counts, np.bincount(labels, minlength=40)) and counts[5] == 0
    np.testing.assert_allclose(sums, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [0, 5, 3001])  # fewer rows than HOST_CHUNKS, and many
def test_chunked_products_as_numpy(n):
    # similarity and correct run their products in fixed chunks of rows on numba's threads;
    # each row's result must be numpy's product, to float32 rounding (a one-row chunk goes to
    # BLAS's matrix-vector kernel, which adds in another order)
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(9)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    centroids = rng.normal(size=(7, 12)).astype(np.float32)
    r = rng.random((n, 7)).astype(np.float32)
    segments = np.array([0, n // 3, n // 3, n])  # an empty segment too
    corrections = rng.normal(size=(3, 7, 12)).astype(np.float32)
    with threadpool_limits(1, user_api="blas"):
        dist = HostSteps.similarity(x, centroids)
        out = np.empty_like(x)
        HostSteps.correct(x, r, corrections, segments, out)
        np.testing.assert_allclose(dist, x @ centroids.T, rtol=1e-6, atol=1e-6)
        expected = np.concatenate([x[lo:hi] - r[lo:hi] @ corrections[c]
                                   for c, (lo, hi) in enumerate(zip(segments[:-1],
                                                                    segments[1:]))])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_race_keys_as_numba_twin(device):
    z, _, _, _ = _problem()
    x = HostSteps.unit_rows(z)
    seed_rows = np.array([0, 7, 50, 199])
    host = HostSteps.race_winners(x, seed_rows, 12345)
    dev = DeviceSteps.race_winners(DeviceSteps.to_array(x), seed_rows, 12345)
    assert np.array_equal(dev, host)
    assert len(set(host.tolist())) == seed_rows.size


def test_harmonize_on_device_as_on_host(device):
    z, codes, n_levels, _ = _problem(seed=1)
    n_batches = sum(n_levels)
    params = {"n_clusters": N_CLUSTERS, "theta": np.full(n_batches, 2.0), "lamb": None, "alpha": 0.2,
                  "sigma": np.full(N_CLUSTERS, 0.1), "block_size": 0.25, "max_iter_harmony": 3,
                  "max_iter_kmeans": 2, "epsilon_cluster": 1e-3, "epsilon_harmony": 1e-2,
                  "batch_prop_cutoff": 1e-5, "random_state": 4}
    host = harmonize(z, codes, n_levels, steps=HostSteps, **params)
    dev = harmonize(z, codes, n_levels, steps=DeviceSteps, **params)
    again = harmonize(z, codes, n_levels, steps=DeviceSteps, **params)
    assert np.array_equal(dev.z_corr, again.z_corr)
    np.testing.assert_allclose(dev.initial_centroids, host.initial_centroids, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dev.objective_harmony, host.objective_harmony, rtol=1e-4)
    np.testing.assert_allclose(dev.z_corr, host.z_corr, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dev.r, host.r, rtol=1e-3, atol=1e-5)
