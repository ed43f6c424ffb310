"""``gpusc bench``: each pipeline step timed in gpusc and in scanpy on the same data.

Usage::

    gpusc bench [--cells 10000,100000] [--data FILE [--groupby COL]] [--steps qc,normalize,...]
                [--compare scanpy] [--repeats 3] [--out DIR] [--name NAME] [--device auto|gpu|cpu]

Data: ``--data FILE`` (a counts .h5ad) resampled to each cell count with
:func:`gpusc.datasets.resample` (new cells model-drawn per ``--groupby`` group, no copies of
real cells), or :func:`gpusc.datasets.synthetic` without ``--data``.

Method, per cell count and step: every library starts from the same input, scanpy's
output of the steps before (copied); one untimed warm-up call (numba and NVRTC
compilation, caches), then ``--repeats`` timed calls, each on a fresh copy (copying and
moving the matrix to the GPU are not timed); the best is reported. harmony_integrate, scrublet,
bbknn and tsne start from an input of their own (batches drawn at random, fixed subsets of
cells: each row's ``input`` says which), and their reference is harmonypy, scanpy and the
bbknn package in exact mode, and scanpy. GPU calls are timed
between device synchronisations. Peak host RSS is sampled every 2 ms (psutil); device
peak is the memory held by CuPy's pool (and RMM, when its statistics are on) at its
highest during the call, resident data included.

Writes ``OUT/NAME.json`` (raw), ``OUT/NAME.md`` (tables) and ``OUT/NAME.png`` (seconds
against cells, log-log, one line per step and library).

This module also holds the measuring helpers ``gpusc run`` uses (:class:`PeakRSS`,
:class:`DevicePeak`, :class:`NumbaCompiles`, :func:`machine`, :func:`versions`). Nothing GPU is imported at
module level.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from ._core.arrays import to_host
from ._settings import gpu_available

LIBRARIES = ("scanpy", "gpusc", "rapids_singlecell")


class BenchError(Exception):
    """A problem with the bench command line or its data: message, exit code 2."""


# ------------------------------------------------------------------ measuring


class PeakRSS:
    """This process's highest RSS while the block runs.

    On Linux the kernel keeps the high-water mark itself: writing ``5`` to
    ``/proc/self/clear_refs`` resets ``VmHWM`` in ``/proc/self/status`` to the current RSS, so
    ``VmHWM`` on exit is the exact peak, at no cost while the block runs (blocks must not nest:
    an inner one resets the outer one's mark). Elsewhere a thread samples the RSS every few
    milliseconds; each wake-up takes a core from numba's threads for a moment (on a 2-core
    machine, where every kernel uses both cores).

    ``peak`` and ``start`` are bytes; both stay ``None`` when neither way is available
    (no /proc and no psutil).
    """

    STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self, interval: float = 0.002):
        self._interval = interval
        self.peak: int | None = None
        self.start: int | None = None
        self._proc = None
        self._kernel_mark = self._reset_mark()
        if not self._kernel_mark:
            try:
                import psutil
            except ImportError:
                pass
            else:
                self._proc = psutil.Process()

    def _reset_mark(self) -> bool:
        try:
            self.CLEAR_REFS.write_text("5")
            return self._status("VmHWM:") is not None
        except OSError:
            return False

    def _status(self, field: str) -> int | None:
        for line in self.STATUS.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024  # kB
        return None

    def _watch(self):
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        if self._kernel_mark:
            self._reset_mark()
            self.start = self._status("VmRSS:")
        elif self._proc is not None:
            self.start = self.peak = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._kernel_mark:
            self.peak = self._status("VmHWM:")
        elif self._proc is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss)


class DevicePeak:
    """Highest device memory held during the block (bytes), or ``None`` off the GPU.

    CuPy's default pool keeps freed blocks, so after ``free_all_blocks()`` on entry its
    ``total_bytes()`` on exit is its high-water mark over the block (what was resident
    on entry included). When RMM statistics are enabled (``gpusc.memory.configure``),
    a statistics frame is pushed and its peak added to RMM's bytes in use on entry.
    """

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.peak: int | None = None
        self.start: int | None = None

    def __enter__(self):
        if not self.on_gpu:
            return self
        import cupy

        cupy.cuda.Device().synchronize()
        self._pool = cupy.get_default_memory_pool()
        self._pool.free_all_blocks()
        self.start = int(self._pool.used_bytes())
        self._rmm_base = None
        try:
            import rmm.statistics

            stats = rmm.statistics.get_statistics()
            if stats is not None:
                self._rmm_base = int(stats.current_bytes)
                self.start += self._rmm_base
                rmm.statistics.push_statistics()
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        if not self.on_gpu:
            return
        import cupy

        cupy.cuda.Device().synchronize()
        peak = int(self._pool.total_bytes())
        if self._rmm_base is not None:
            import rmm.statistics

            frame = rmm.statistics.pop_statistics()
            peak += self._rmm_base + int(frame.peak_bytes)
        self.peak = peak


class NumbaCompiles:
    """numba compilations while the block runs: ``seconds`` (wall time of the outermost
    compilations; a function compiled inside another counts once) and ``functions``
    (``module.qualname`` of every function compiled). numba's ``numba:compile`` event fires
    only when a function is compiled, not when it is loaded from numba's on-disk cache, so a
    warm run records none."""

    def __init__(self):
        self.seconds = 0.0
        self.functions: list[str] = []

    def __enter__(self):
        from numba.core import event

        counter = self

        class Listener(event.Listener):
            depth = 0
            started = 0.0

            def on_start(self, ev):
                if self.depth == 0:
                    self.started = time.perf_counter()
                self.depth += 1
                func = getattr(ev.data.get("dispatcher"), "py_func", None)
                counter.functions.append(f"{func.__module__}.{func.__qualname__}" if func else "?")

            def on_end(self, ev):
                self.depth -= 1
                if self.depth == 0:
                    counter.seconds += time.perf_counter() - self.started

        self._listener = Listener()
        event.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc):
        from numba.core import event

        event.unregister("numba:compile", self._listener)


def synchronize(on_gpu: bool) -> None:
    if on_gpu:
        import cupy

        cupy.cuda.Device().synchronize()


def machine(on_gpu: bool = False) -> dict:
    """CPU model, cores, RAM, OS (and the GPU's name and memory when on_gpu)."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu_model": model, "logical_cores": os.cpu_count(), "platform": platform.platform(),
           "hostname": socket.gethostname()}
    try:
        import psutil

        out["physical_cores"] = psutil.cpu_count(logical=False)
        out["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if on_gpu:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        out["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        out["gpu_memory_gib"] = round(props["totalGlobalMem"] / 2**30, 1)
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("gpusc", "numpy", "scipy", "pandas", "anndata", "scanpy", "numba", "scikit-learn",
                 "pynndescent", "umap-learn", "igraph", "leidenalg", "cupy-cuda13x", "cupy-cuda12x", "rmm-cu13",
                 "rmm-cu12"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_state() -> dict:
    root = Path(__file__).resolve().parents[2]

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def rapids_singlecell_status():
    """(module or None, a word for the JSON): the module and its version, or "not installed"."""
    try:
        import rapids_singlecell
    except Exception:  # ImportError, or a broken CUDA stack under it: either way, not usable
        return None, "not installed"
    try:
        return rapids_singlecell, version("rapids_singlecell")
    except PackageNotFoundError:
        return rapids_singlecell, getattr(rapids_singlecell, "__version__", "installed")


# ------------------------------------------------------------------ the steps


def _subset_hv(a) -> None:
    a._inplace_subset_var(np.flatnonzero(a.var["highly_variable"].to_numpy(dtype=bool)))


@dataclass(frozen=True)
class BenchStep:
    """One pipeline step: how each library calls it, where gpusc's input lives.

    ``on_x``: the step works on X, so on the GPU gpusc's (and rapids-singlecell's) copy
    is moved to the device before timing; otherwise the step reads host obsm/obsp and
    runs on the device that ``device=`` names.
    """

    name: str
    aliases: tuple[str, ...]
    module: str  # "pp" or "tl": where gpusc has it
    attr: str  # gpusc's function name (checked with hasattr at run time)
    scanpy: Callable
    gpusc: Callable  # (gpusc, adata, device) -> None
    rsc: Callable | None
    on_x: bool = True
    # (pipeline state, the raw counts) -> the step's own input, built once per cell count and
    # not timed; the pipeline goes on from the state (not from this step's output)
    make_input: Callable | None = None
    input_note: str = ""  # what make_input builds, recorded in the step's row
    reference: str | None = None  # the reference package the scanpy column imports (skipped without it)


def _neighbors_gpusc(g, a, device):
    g.pp.neighbors(a, device=device)


def _with_device(fn_name, module):
    def call(g, a, device):
        from . import _settings

        before = _settings.settings.device
        _settings.settings.device = device
        try:
            getattr(getattr(g, module), fn_name)(a)
        finally:
            _settings.settings.device = before

    return call


# Integration, doublets, t-SNE: the bench data has no batches, so 4 are drawn; fixed cell
# subsets keep the references' time in bounds on 2 cores (scanpy's scrublet: 16 min at 50,000
# cells; the bbknn package's exact cKDTree search: 100 s; scikit-learn's t-SNE: minutes)
N_BATCHES = 4
SCRUBLET_CELLS = 5_000
BBKNN_CELLS = 20_000
TSNE_CELLS = 20_000


def _cell_subset(n_obs: int, cap: int | None) -> np.ndarray:
    """The indices of a fixed subset of ``cap`` cells (seed 0, in order), or all cells."""
    if cap is None or n_obs <= cap:
        return np.arange(n_obs)
    return np.sort(np.random.default_rng(0).choice(n_obs, cap, replace=False))


def _pca_input(state, cap: int | None = None, *, batches: bool = False):
    """The state's X_pca alone (of a fixed subset of ``cap`` cells); with ``batches``, obs['batch']:
    one of N_BATCHES batches per cell at random (seed 0), each batch moving X_pca by its own
    offset (Normal(0, half the standard deviation of each component), seed 0)."""
    import anndata as ad
    import pandas as pd

    cells = _cell_subset(state.n_obs, cap)
    x_pca = np.array(to_host(state.obsm["X_pca"])[cells], dtype=np.float32)
    obs = pd.DataFrame(index=state.obs_names[cells])
    if batches:
        rng = np.random.default_rng(0)
        batch = rng.integers(0, N_BATCHES, cells.size)
        offsets = rng.normal(0.0, 0.5, (N_BATCHES, x_pca.shape[1])) * x_pca.std(axis=0)
        x_pca += offsets[batch].astype(np.float32)
        obs["batch"] = pd.Categorical.from_codes(batch, [f"b{b}" for b in range(N_BATCHES)])
    return ad.AnnData(obs=obs, obsm={"X_pca": x_pca})


def _harmonypy(sc, a) -> None:
    # what sc.external.pp.harmony_integrate does, without its transpose of Z_corr (scanpy 1.12.4
    # transposes harmonypy 2.x's cells x components result and fails to store it)
    import harmonypy

    a.obsm["X_pca_harmony"] = np.asarray(harmonypy.run_harmony(
        a.obsm["X_pca"].astype(np.float64), a.obs, "batch", verbose=False).Z_corr)


BENCH_STEPS: tuple[BenchStep, ...] = (
    BenchStep("calculate_qc_metrics", ("qc",), "pp", "calculate_qc_metrics",
              lambda sc, a: sc.pp.calculate_qc_metrics(a, qc_vars=["mt"], inplace=True),
              lambda g, a, d: g.pp.calculate_qc_metrics(a, qc_vars=["mt"], inplace=True),
              lambda r, a: r.pp.calculate_qc_metrics(a, qc_vars=["mt"])),
    BenchStep("filter_cells", (), "pp", "filter_cells",
              lambda sc, a: sc.pp.filter_cells(a, min_genes=200),
              lambda g, a, d: g.pp.filter_cells(a, min_genes=200),
              lambda r, a: r.pp.filter_cells(a, min_genes=200)),
    BenchStep("filter_genes", (), "pp", "filter_genes",
              lambda sc, a: sc.pp.filter_genes(a, min_cells=3),
              lambda g, a, d: g.pp.filter_genes(a, min_cells=3),
              lambda r, a: r.pp.filter_genes(a, min_cells=3)),
    BenchStep("normalize_total", ("normalize",), "pp", "normalize_total",
              lambda sc, a: sc.pp.normalize_total(a),
              lambda g, a, d: g.pp.normalize_total(a),
              lambda r, a: r.pp.normalize_total(a)),
    BenchStep("log1p", (), "pp", "log1p",
              lambda sc, a: sc.pp.log1p(a),
              lambda g, a, d: g.pp.log1p(a),
              lambda r, a: r.pp.log1p(a)),
    BenchStep("highly_variable_genes", ("hvg",), "pp", "highly_variable_genes",
              lambda sc, a: sc.pp.highly_variable_genes(a, n_top_genes=2000),
              lambda g, a, d: g.pp.highly_variable_genes(a, n_top_genes=2000),
              lambda r, a: r.pp.highly_variable_genes(a, n_top_genes=2000)),
    BenchStep("filter_highly_variable", ("filter_hv", "subset_hv"), "pp", "filter_highly_variable",
              lambda sc, a: _subset_hv(a),
              lambda g, a, d: g.pp.filter_highly_variable(a),
              lambda r, a: _subset_hv(a)),
    BenchStep("scale", (), "pp", "scale",
              lambda sc, a: sc.pp.scale(a, max_value=10),
              lambda g, a, d: g.pp.scale(a, max_value=10),
              lambda r, a: r.pp.scale(a, max_value=10)),
    BenchStep("pca", (), "pp", "pca",
              lambda sc, a: sc.pp.pca(a),
              lambda g, a, d: g.pp.pca(a),
              lambda r, a: r.pp.pca(a)),
    BenchStep("neighbors", ("knn",), "pp", "neighbors",
              lambda sc, a: sc.pp.neighbors(a),
              _neighbors_gpusc,
              lambda r, a: r.pp.neighbors(a), on_x=False),
    BenchStep("umap", (), "tl", "umap",
              lambda sc, a: sc.tl.umap(a),
              _with_device("umap", "tl"),
              lambda r, a: r.tl.umap(a), on_x=False),
    BenchStep("leiden", (), "tl", "leiden",
              lambda sc, a: sc.tl.leiden(a),
              _with_device("leiden", "tl"),
              lambda r, a: r.tl.leiden(a), on_x=False),
    BenchStep("diffmap", (), "tl", "diffmap",
              lambda sc, a: sc.tl.diffmap(a),
              lambda g, a, d: g.tl.diffmap(a, device=d),
              lambda r, a: r.tl.diffmap(a), on_x=False),
    BenchStep("embedding_density", ("density",), "tl", "embedding_density",
              lambda sc, a: sc.tl.embedding_density(a),
              lambda g, a, d: g.tl.embedding_density(a, device=d),
              None, on_x=False),
    BenchStep("harmony_integrate", ("harmony",), "pp", "harmony_integrate",
              _harmonypy,
              lambda g, a, d: g.pp.harmony_integrate(a, "batch", device=d),
              None, on_x=False, make_input=lambda state, counts: _pca_input(state, batches=True),
              input_note=(f"X_pca with {N_BATCHES} batches drawn at random (seed 0), each moving X_pca "
                          "by its own offset; reference: harmonypy.run_harmony as "
                          "sc.external.pp.harmony_integrate calls it"),
              reference="harmonypy"),
    BenchStep("scrublet", (), "pp", "scrublet",
              lambda sc, a: sc.pp.scrublet(a),
              lambda g, a, d: g.pp.scrublet(a),
              None, make_input=lambda state, counts: counts[_cell_subset(counts.n_obs, SCRUBLET_CELLS)].copy(),
              input_note=f"the raw counts of a fixed subset of at most {SCRUBLET_CELLS:,} cells (seed 0)"),
    BenchStep("bbknn", (), "pp", "bbknn",
              lambda sc, a: sc.external.pp.bbknn(a, batch_key="batch", approx=False),
              lambda g, a, d: g.pp.bbknn(a, batch_key="batch", device=d),
              None, on_x=False, make_input=lambda state, counts: _pca_input(state, BBKNN_CELLS, batches=True),
              input_note=(f"X_pca of a fixed subset of at most {BBKNN_CELLS:,} cells (seed 0), batches drawn "
                          "as for harmony_integrate; reference: the bbknn package in exact mode (approx=False)"),
              reference="bbknn"),
    BenchStep("tsne", (), "tl", "tsne",
              lambda sc, a: sc.tl.tsne(a, use_rep="X_pca"),
              lambda g, a, d: g.tl.tsne(a, use_rep="X_pca", device=d),
              None, on_x=False, make_input=lambda state, counts: _pca_input(state, TSNE_CELLS),
              input_note=f"X_pca of a fixed subset of at most {TSNE_CELLS:,} cells (seed 0)"),
)
PREPROCESS = ("calculate_qc_metrics", "filter_cells", "filter_genes", "normalize_total", "log1p",
              "highly_variable_genes", "filter_highly_variable", "scale")


def step_names(spec: str | None) -> list[BenchStep]:
    """Steps named in a comma list (names or aliases, any order) in pipeline order; all when None."""
    if spec is None:
        return list(BENCH_STEPS)
    lookup = {s.name: s for s in BENCH_STEPS} | {alias: s for s in BENCH_STEPS for alias in s.aliases}
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in lookup]
    if unknown or not wanted:
        known = ", ".join(f"{s.name}" + (f" ({'/'.join(s.aliases)})" if s.aliases else "") for s in BENCH_STEPS)
        raise BenchError(f"--steps: unknown step(s) {unknown or spec!r}; known: {known}")
    chosen = {lookup[w].name for w in wanted}
    return [s for s in BENCH_STEPS if s.name in chosen]


def missing_in_gpusc(step: BenchStep) -> bool:
    import gpusc

    return not hasattr(getattr(gpusc, step.module), step.attr)


# ------------------------------------------------------------------ data


def load_data(path: Path | None, n_obs: int, *, groupby: str | None, seed: int, source=None):
    """(AnnData with var['mt'], description, seconds to make it); ``source`` caches the read file."""
    from . import datasets

    start = time.perf_counter()
    if path is None:
        adata = datasets.synthetic(n_obs=n_obs, n_vars=5_000, seed=seed)
        description = f"gpusc.datasets.synthetic(n_obs={n_obs}, n_vars=5000, seed={seed})"
    else:
        adata = datasets.resample(source, n_obs, groupby=groupby, seed=seed)
        description = (f"{n_obs:,} cells model-drawn from {path.name} (gpusc.datasets.resample, "
                       f"groupby={groupby!r}, seed={seed})")
    seconds = time.perf_counter() - start
    if "mt" not in adata.var.columns:
        adata.var["mt"] = adata.var_names.str.startswith("MT-")
    return adata, description, seconds


def read_source(path: Path, groupby: str | None):
    import anndata as ad

    if not path.exists():
        raise BenchError(f"--data: file not found: {path}")
    if path.is_dir() or path.suffix != ".h5ad":
        raise BenchError(f"--data must be an .h5ad file: {path}")
    try:
        source = ad.read_h5ad(path)
    except Exception as err:
        raise BenchError(f"--data: could not read {path} as .h5ad: {err}") from err
    if groupby is not None and groupby not in source.obs.columns:
        raise BenchError(f"--groupby {groupby!r} is not a column of obs in {path}: {list(source.obs.columns)}")
    return source


# ------------------------------------------------------------------ timing


def _prepare(state, lib: str, step: BenchStep, on_gpu: bool, mods: dict):
    a = state.copy()
    if on_gpu and step.on_x and lib == "gpusc":
        mods["gpusc"].get.anndata_to_GPU(a)
    elif on_gpu and step.on_x and lib == "rapids_singlecell":
        mods["rapids_singlecell"].get.anndata_to_GPU(a)
    synchronize(on_gpu)
    return a


def _call(lib: str, step: BenchStep, a, mods: dict, device: str) -> None:
    if lib == "scanpy":
        step.scanpy(mods["scanpy"], a)
    elif lib == "gpusc":
        step.gpusc(mods["gpusc"], a, device)
    else:
        step.rsc(mods["rapids_singlecell"], a)


def time_library(state, lib: str, step: BenchStep, *, repeats: int, on_gpu: bool, device: str, mods: dict):
    """Warm-up, then ``repeats`` timed calls on fresh copies; (row dict, the last output on the host)."""
    lib_gpu = on_gpu and lib != "scanpy"
    _call(lib, step, _prepare(state, lib, step, on_gpu, mods), mods, device)  # warm-up, not counted
    times, peaks, dev_peaks = [], [], []
    a = None
    for _ in range(repeats):
        a = _prepare(state, lib, step, on_gpu, mods)
        with DevicePeak(lib_gpu) as dev, PeakRSS() as rss:
            synchronize(lib_gpu)
            start = time.perf_counter()
            _call(lib, step, a, mods, device)
            synchronize(lib_gpu)
            times.append(time.perf_counter() - start)
        peaks.append((rss.start, rss.peak))
        dev_peaks.append(dev.peak)
    if lib_gpu and step.on_x:
        mods[lib].get.anndata_to_CPU(a)
    row = {"seconds": times, "best": min(times)}
    if peaks[0][0] is not None:
        row["peak_rss_gib"] = round(max(p for _, p in peaks) / 2**30, 3)
        row["peak_rss_increase_gib"] = round(max(p - s for s, p in peaks) / 2**30, 3)
    else:
        row["peak_rss_gib"] = row["peak_rss_increase_gib"] = None
    row["device_peak_gib"] = round(max(dev_peaks) / 2**30, 3) if lib_gpu and None not in dev_peaks else None
    return row, a


def _max_abs_diff_X(a, b) -> float | None:
    from scipy import sparse

    if a.shape != b.shape:
        return None
    xa, xb = a.X, b.X
    if sparse.issparse(xa) and sparse.issparse(xb):
        diff = sparse.csr_matrix(xa, dtype=np.float64) - sparse.csr_matrix(xb, dtype=np.float64)
        return float(abs(diff).max()) if diff.nnz else 0.0
    xa = xa.toarray() if sparse.issparse(xa) else np.asarray(xa)
    xb = xb.toarray() if sparse.issparse(xb) else np.asarray(xb)
    return float(np.max(np.abs(xa.astype(np.float64) - xb.astype(np.float64)))) if xa.size else 0.0


def knn_recall(approx, exact) -> float:
    """Mean over cells of |approx neighbours ∩ exact neighbours| / |exact neighbours| (obsp['distances'])."""
    a = approx.obsp["distances"].tocsr()
    e = exact.obsp["distances"].tocsr()
    hits = total = 0
    for i in range(e.shape[0]):
        ei = e.indices[e.indptr[i]:e.indptr[i + 1]]
        ai = a.indices[a.indptr[i]:a.indptr[i + 1]]
        hits += np.intersect1d(ai, ei, assume_unique=True).size
        total += ei.size
    return hits / total if total else float("nan")


def compare_outputs(step: BenchStep, outputs: dict) -> dict:
    """Agreement of gpusc's output with scanpy's for the step (what is meaningful for it)."""
    sc_out, gs_out = outputs["scanpy"], outputs["gpusc"]
    out: dict = {}
    try:
        if step.name == "neighbors":
            out["recall_scanpy_vs_gpusc_exact"] = knn_recall(sc_out, gs_out)
        elif step.name == "leiden":
            from sklearn.metrics import adjusted_rand_score

            out["ari_scanpy_vs_gpusc"] = float(adjusted_rand_score(sc_out.obs["leiden"], gs_out.obs["leiden"]))
            out["n_clusters"] = {"scanpy": int(sc_out.obs["leiden"].nunique()),
                                 "gpusc": int(gs_out.obs["leiden"].nunique())}
        elif step.name == "pca":
            k = min(20, sc_out.obsm["X_pca"].shape[1], gs_out.obsm["X_pca"].shape[1])
            vs = to_host(sc_out.varm["PCs"])[:, :k]
            vg = to_host(gs_out.varm["PCs"])[:, :k]
            out["min_abs_cos_top_components"] = float(np.min(np.abs(np.sum(vs * vg, axis=0))))
        elif step.name == "highly_variable_genes":
            hs = sc_out.var["highly_variable"].to_numpy(bool)
            hg = gs_out.var["highly_variable"].to_numpy(bool)
            out["hvg_disagreements"] = int(np.sum(hs != hg))
        elif step.name == "diffmap":
            ev_s, ev_g = np.asarray(sc_out.uns["diffmap_evals"]), np.asarray(gs_out.uns["diffmap_evals"])
            out["max_rel_eigenvalue_diff"] = float(np.max(np.abs(ev_g - ev_s) / np.abs(ev_s)))
        elif step.name == "embedding_density":
            out["max_abs_density_diff"] = float(np.max(np.abs(
                sc_out.obs["umap_density"].to_numpy() - gs_out.obs["umap_density"].to_numpy())))
        elif step.name == "harmony_integrate":
            z = np.asarray(sc_out.obsm["X_pca"], dtype=np.float64)
            out["correction_correlation"] = float(np.corrcoef(
                (np.asarray(gs_out.obsm["X_pca_harmony"]) - z).ravel(),
                (np.asarray(sc_out.obsm["X_pca_harmony"]) - z).ravel())[0, 1])
        elif step.name == "scrublet":
            out["predicted_doublet_equal_share"] = float(np.mean(
                sc_out.obs["predicted_doublet"].to_numpy() == gs_out.obs["predicted_doublet"].to_numpy()))
            out["scrublet_threshold"] = {lib: float(o.uns["scrublet"]["threshold"])
                                         for lib, o in (("scanpy", sc_out), ("gpusc", gs_out))}
        elif step.name == "bbknn":
            ref, ours = sc_out.obsp["connectivities"], gs_out.obsp["connectivities"]
            out["edges_differing"] = int((abs(ref.sign()) != abs(ours.sign())).nnz)
            out["max_abs_connectivity_diff"] = float(abs(ref - ours).max())
        elif step.name not in ("umap", "tsne"):
            out["max_abs_diff_X"] = _max_abs_diff_X(sc_out, gs_out)
    except Exception as err:  # a comparison must not sink the timings
        out["comparison_error"] = f"{type(err).__name__}: {err}"
    return out


def bench_cells(state, steps: list[BenchStep], libs: list[str], *, repeats: int, on_gpu: bool, device: str,
                mods: dict, progress=None) -> list[dict]:
    """All steps at one cell count; each starts from scanpy's output of the steps before."""
    rows = []
    counts = state
    for step in steps:
        step_input = state if step.make_input is None else step.make_input(state, counts)
        row = {"step": step.name, "input_shape": list(step_input.shape)}
        if step.input_note:
            row["input"] = step.input_note
        outputs = {}
        for lib in libs:
            if lib == "rapids_singlecell" and step.rsc is None:
                continue
            try:
                row[lib], outputs[lib] = time_library(step_input, lib, step, repeats=repeats, on_gpu=on_gpu,
                                                      device=device, mods=mods)
            except Exception as err:
                if lib == "scanpy":
                    raise
                row[lib] = {"error": f"{type(err).__name__}: {err}"}
        if "best" in row.get("gpusc", {}):
            row["speedup"] = row["scanpy"]["best"] / row["gpusc"]["best"]
            row.update(compare_outputs(step, outputs))
        if "best" in row.get("rapids_singlecell", {}):
            row["speedup_rapids_singlecell"] = row["scanpy"]["best"] / row["rapids_singlecell"]["best"]
        row["output_shape"] = list(outputs["scanpy"].shape)
        rows.append(row)
        if step.make_input is None:
            state = outputs["scanpy"]
        if progress is not None:
            progress(step, row)
        del outputs
    return rows


def geometric_mean(values) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


# ------------------------------------------------------------------ reporting


def format_table(rows: list[dict], rsc: bool) -> list[str]:
    """Markdown rows: step, scanpy s, gpusc s, speedup (and rapids-singlecell), peak RSS increase."""
    head = "| step | scanpy s | gpusc s | speedup |"
    rule = "|---|---:|---:|---:|"
    if rsc:
        head += " rapids-singlecell s | speedup |"
        rule += "---:|---:|"
    head += " peak RSS+ scanpy / gpusc GiB | device peak gpusc GiB |"
    rule += "---:|---:|"
    lines = [head, rule]

    def s(d):
        return f"{d['best']:.3f}" if "best" in d else "error"

    for r in rows:
        line = f"| {r['step']} | {s(r['scanpy'])} | {s(r.get('gpusc', {}))} | "
        line += f"{r['speedup']:.2f}x |" if "speedup" in r else "– |"
        if rsc:
            d = r.get("rapids_singlecell", {})
            line += f" {s(d)} | " + (f"{r['speedup_rapids_singlecell']:.2f}x |" if "best" in d else "– |")
        sp, gp = r["scanpy"].get("peak_rss_increase_gib"), r.get("gpusc", {}).get("peak_rss_increase_gib")
        line += f" {sp if sp is not None else '–'} / {gp if gp is not None else '–'} |"
        dp = r.get("gpusc", {}).get("device_peak_gib")
        line += f" {dp if dp is not None else '–'} |"
        lines.append(line)
    return lines


def markdown(record: dict) -> str:
    rsc = record["libraries"].get("rapids_singlecell") not in (None, "not installed")
    m = record["machine"]
    lines = [f"# gpusc bench: {record['data']['description_all']}", "",
             f"- machine: {m['cpu_model']}, {m['logical_cores']} logical cores, {m.get('ram_gib', '?')} GiB RAM"
             + (f"; GPU {m['gpu']} ({m['gpu_memory_gib']} GiB)" if "gpu" in m else "; no GPU"),
             f"- device: {record['device']}; repeats: {record['repeats']} (best of); "
             f"git {str(record['git']['commit'])[:10]}{' (dirty)' if record['git']['dirty'] else ''}",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
             f"- rapids-singlecell: {record['libraries']['rapids_singlecell']}",
             f"- method: {record['method']}", ""]
    if record["steps_skipped"]:
        lines += ["Skipped steps: " + "; ".join(f"{k}: {v}" for k, v in record["steps_skipped"].items()), ""]
    for run in record["runs"]:
        lines += [f"## {run['n_obs']:,} cells ({run['data']['shape'][0]:,} x {run['data']['shape'][1]:,}, "
                  f"nnz {run['data']['nnz']:,}); load average {run['load_average_before']} → "
                  f"{run['load_average_after']}", ""]
        lines += format_table(run["steps"], rsc)
        gm = run["geometric_mean_speedup"]
        lines += ["", f"Geometric mean speedup (gpusc over scanpy): {gm:.2f}x" if gm else "", ""]
        notes = []
        for r in run["steps"]:
            for key in ("recall_scanpy_vs_gpusc_exact", "ari_scanpy_vs_gpusc", "min_abs_cos_top_components",
                        "hvg_disagreements", "max_abs_diff_X", "correction_correlation",
                        "predicted_doublet_equal_share", "edges_differing"):
                if r.get(key) is not None:
                    v = r[key]
                    notes.append(f"{r['step']}: {key} = {v:.4g}" if isinstance(v, float) else f"{r['step']}: {key} = {v}")
        if notes:
            lines += ["Agreement: " + "; ".join(notes), ""]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> bool:
    """Seconds against cells, log-log, one line per step and library; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"scanpy": ("o", "--"), "gpusc": ("s", "-"), "rapids_singlecell": ("^", ":")}
    names = [s["step"] for s in record["runs"][0]["steps"]] if record["runs"] else []
    colors = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        for lib, (marker, ls) in styles.items():
            pts = [(run["n_obs"], r[lib]["best"]) for run in record["runs"] for r in run["steps"]
                   if r["step"] == name and "best" in r.get(lib, {})]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, marker=marker, ls=ls, color=colors(i % 20), label=f"{name} ({lib})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cells")
    ax.set_ylabel("seconds (best of repeats)")
    ax.set_title(f"gpusc (solid) vs scanpy (dashed), {record['device']}: {record['machine']['cpu_model']}, "
                 f"{record['machine']['logical_cores']} cores"
                 + (f" + {record['machine']['gpu']}" if "gpu" in record["machine"] else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------ the command


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time each step in gpusc and scanpy on the same data")
    p.add_argument("--cells", default="10000,100000", help="comma list of cell counts (default 10000,100000)")
    p.add_argument("--data", type=Path, default=None,
                   help="counts .h5ad resampled to each cell count (default: gpusc.datasets.synthetic)")
    p.add_argument("--groupby", default=None, help="obs column of --data whose groups are modelled apart")
    p.add_argument("--steps", default=None, help="comma list of steps (default: all that gpusc has)")
    p.add_argument("--compare", default="scanpy", choices=("scanpy",), help="the reference library (scanpy)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per step and library; best counts")
    p.add_argument("--out", type=Path, default=Path("gpusc-bench"), help="output folder (default ./gpusc-bench)")
    p.add_argument("--name", default="bench", help="file stem of NAME.json/.md/.png (default bench)")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: the GPU when cupy sees one (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic or resampled data")


def _parse_cells(spec: str) -> list[int]:
    try:
        cells = [int(float(c)) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise BenchError(f"--cells must be a comma list of integers, got {spec!r}") from None
    if not cells or min(cells) < 100:
        raise BenchError(f"--cells: give cell counts of at least 100, got {spec!r}")
    return sorted(set(cells))


def run_bench(args) -> dict:
    """The ``bench`` command; returns the record it writes."""
    import json
    import warnings

    # scale(zero_center=True) on sparse X densifies, as in scanpy's tutorial: known, said once here
    warnings.filterwarnings("ignore", message="zero-centering a sparse array/matrix densifies it")
    cells = _parse_cells(args.cells)
    steps = step_names(args.steps)
    if args.repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {args.repeats}")
    if args.device == "cpu":
        on_gpu = False
    elif gpu_available():
        on_gpu = True
    elif args.device == "gpu":
        raise BenchError("--device gpu: no CUDA device is visible to cupy (is cupy installed? try --device cpu)")
    else:
        on_gpu = False
    device = "gpu" if on_gpu else "cpu"
    source = read_source(args.data, args.groupby) if args.data is not None else None
    if args.data is None and args.groupby is not None:
        raise BenchError("--groupby needs --data")

    import scanpy as sc

    import gpusc

    skipped = {}
    for step in steps:
        if missing_in_gpusc(step):
            skipped[step.name] = f"skipped (not in gpusc yet: gpusc.{step.module}.{step.attr})"
        elif step.reference is not None and importlib.util.find_spec(step.reference) is None:
            skipped[step.name] = f"skipped (its reference, the {step.reference} package, is not installed)"
    steps = [s for s in steps if s.name not in skipped]
    if not steps:
        raise BenchError(f"none of the steps asked for exist in gpusc: {skipped}")

    mods = {"scanpy": sc, "gpusc": gpusc}
    libs = ["scanpy", "gpusc"]
    rsc, rsc_word = rapids_singlecell_status()
    if rsc is not None and on_gpu:
        mods["rapids_singlecell"] = rsc
        libs.append("rapids_singlecell")
    elif rsc is not None:
        rsc_word = f"{rsc_word} (not run: no GPU)"

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "gpusc bench",
        "command": "gpusc " + " ".join(getattr(args, "argv", None) or sys.argv[1:]),
        "device": device,
        "device_requested": args.device,
        "machine": machine(on_gpu),
        "versions": versions(),
        "libraries": {"scanpy": version("scanpy"), "gpusc": gpusc.__version__, "rapids_singlecell": rsc_word},
        "git": git_state(),
        "data": {"source": str(args.data) if args.data else "gpusc.datasets.synthetic",
                 "groupby": args.groupby, "seed": args.seed,
                 "description_all": (f"cells model-drawn from {args.data.name} (gpusc.datasets.resample, "
                                     f"groupby={args.groupby!r})") if args.data else
                 "gpusc.datasets.synthetic(n_vars=5000) cells"},
        "method": ("per cell count and step: each library starts from a copy of scanpy's output of the "
                   "previous steps; one untimed warm-up call (numba/NVRTC compilation), then repeats on fresh "
                   "copies, best reported; copies and host-to-device moves not timed; GPU timed between "
                   "device synchronisations; peak RSS sampled every 2 ms (psutil); device peak from CuPy's "
                   "pool high-water mark (+ RMM statistics when enabled)"),
        "repeats": args.repeats,
        "steps_requested": [s.name for s in step_names(args.steps)],
        "steps_skipped": skipped,
        "steps_run": [s.name for s in steps],
        "runs": [],
    }
    paths = {ext: args.out / f"{args.name}.{ext}" for ext in ("json", "md", "png")}
    for n_obs in cells:
        base, description, made_s = load_data(args.data, n_obs, groupby=args.groupby, seed=args.seed,
                                              source=source)
        print(f"{description}: {base.n_obs:,} x {base.n_vars:,}, nnz {base.X.nnz:,} ({made_s:.1f} s)", flush=True)
        load_before = load_average()

        def progress(step, row):
            g = row.get("gpusc", {})
            print(f"  {step.name}: scanpy {row['scanpy']['best']:.3f} s, gpusc "
                  + (f"{g['best']:.3f} s" if "best" in g else g.get("error", "?")), flush=True)

        rows = bench_cells(base, steps, libs, repeats=args.repeats, on_gpu=on_gpu, device=device, mods=mods,
                           progress=progress)
        run = {"n_obs": n_obs,
               "data": {"description": description, "shape": list(base.shape), "nnz": int(base.X.nnz),
                        "make_seconds": made_s},
               "load_average_before": load_before, "load_average_after": load_average(),
               "steps": rows,
               "geometric_mean_speedup": geometric_mean(r.get("speedup") for r in rows)}
        record["runs"].append(run)
        del base
        print()
        print("\n".join(format_table(rows, "rapids_singlecell" in libs)))
        gm = run["geometric_mean_speedup"]
        print(f"geometric mean speedup at {n_obs:,} cells: {gm:.2f}x" if gm else "no speedup measured", flush=True)
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        paths["json"].write_text(json.dumps(record, indent=2) + "\n")  # after each cell count: partial results survive
    for name, why in skipped.items():
        print(f"{name}: {why}")
    paths["md"].write_text(markdown(record))
    if not plot(record, paths["png"]):
        paths.pop("png")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return record
