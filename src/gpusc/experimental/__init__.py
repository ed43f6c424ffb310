"""scanpy.experimental's names: ``gpusc.experimental.pp.highly_variable_genes`` and
``normalize_pearson_residuals``, the same functions gpusc.pp offers."""

from types import SimpleNamespace

from ..pp import highly_variable_genes_pearson_residuals, normalize_pearson_residuals

pp = SimpleNamespace(
    highly_variable_genes=highly_variable_genes_pearson_residuals,
    normalize_pearson_residuals=normalize_pearson_residuals,
)

__all__ = ["pp"]
