"""Dask arrays for the tests: row chunks of a given matrix (uneven, empty), and a counter of
dask computations (to show that a lazy step computes nothing)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp

dask = __import__("pytest").importorskip("dask")  # the test extra installs it; skip only outside it
import dask.array as da  # noqa: E402
from dask.callbacks import Callback  # noqa: E402


def row_chunks(n_obs: int, kind: str = "uneven") -> tuple[int, ...]:
    """Row chunk sizes: "uneven" (a short last chunk), "empty" (an empty chunk in the
    middle and at the end), "one" (a single chunk)."""
    if kind == "one":
        return (n_obs,)
    size = max(1, n_obs // 3 + 1)
    sizes = [min(size, n_obs - start) for start in range(0, n_obs, size)]
    if kind == "empty":
        sizes = sizes[:1] + [0] + sizes[1:] + [0]
    return tuple(sizes)


def as_dask(x, kind: str = "uneven", index_dtype=None):
    """``x`` (numpy or scipy CSR) as a dask array split by rows; CSR chunks keep ``x``'s
    class, with ``index_dtype`` indices when given."""
    chunks = row_chunks(x.shape[0], kind)
    bounds = np.concatenate([[0], np.cumsum(chunks)])
    blocks = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if sp.issparse(x) and index_dtype is not None:
        for b in blocks:
            b.indices = b.indices.astype(index_dtype)
            b.indptr = b.indptr.astype(index_dtype)
    # one graph key per block, holding the block itself: dask keeps every chunk as given
    # (from_array would slice and rebuild CSR indices, and concatenate drops empty chunks)
    name = f"as-dask-{id(x):x}-{kind}"
    graph = {(name, i, 0): block for i, block in enumerate(blocks)}
    out = da.Array(graph, name, chunks=(chunks, (x.shape[1],)), meta=blocks[0][:0])
    assert out.chunks[0] == chunks and len(out.chunks[1]) == 1
    return out


class _Counter(Callback):
    def __init__(self):
        super().__init__()
        self.computes = 0

    def _start(self, dsk):
        self.computes += 1


@contextmanager
def count_computes():
    """``with count_computes() as c: ...`` then ``c.computes``: how many dask computations ran."""
    counter = _Counter()
    with counter:
        yield counter
