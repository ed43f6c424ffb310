"""A device out-of-memory error (CuPy raises a MemoryError subclass) reaches the user as a
MemoryError that says what to do, and the AnnData is left as it was. The allocation
failure is simulated where the kernels are called, so this runs on any machine."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import synthetic_counts
from scipy import sparse

import gpusc
from gpusc._kernels import normalize as normalize_kernels
from gpusc.pp import _qc, _simple


def _out_of_memory(*args, **kwargs):
    raise MemoryError("Out of memory allocating 8,589,934,592 bytes")


@pytest.mark.parametrize(
    ("module", "name", "call"),
    [
        (_qc, "qc_stats", lambda a: gpusc.pp.calculate_qc_metrics(a, inplace=True, percent_top=None)),
        (_simple, "qc_stats", lambda a: gpusc.pp.filter_cells(a, min_counts=1)),
        (_simple, "qc_stats", lambda a: gpusc.pp.filter_genes(a, min_cells=1)),
    ],
)
def test_oom_message_and_adata_unchanged(monkeypatch, module, name, call):
    adata = ad.AnnData(sparse.csr_matrix(synthetic_counts(60, 50)))
    before = adata.copy()
    monkeypatch.setattr(module, name, _out_of_memory)
    with pytest.raises(MemoryError, match="managed") as info:
        call(adata)
    assert "8,589,934,592 bytes" in str(info.value)  # the size asked stays in the message
    assert adata.shape == before.shape
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())
    assert list(adata.obs.columns) == list(before.obs.columns)


def test_oom_in_normalize_total(monkeypatch):
    from gpusc.pp import _normalize

    adata = ad.AnnData(sparse.csr_matrix(synthetic_counts(60, 50)))
    before = adata.X.toarray()
    monkeypatch.setattr(_normalize, "row_sums", _out_of_memory)
    with pytest.raises(MemoryError, match="normalize_total: out of device memory"):
        gpusc.pp.normalize_total(adata)
    np.testing.assert_array_equal(adata.X.toarray(), before)
    assert normalize_kernels.row_sums is not _out_of_memory
