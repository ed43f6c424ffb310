"""Tools with scanpy 1.12's functions, arguments, defaults and result keys."""

from ..pp._pca import pca

__all__ = ["pca"]
