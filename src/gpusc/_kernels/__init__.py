"""One module per ``kernels/*.cu`` family: the GPU launcher and its numba CPU twin,
side by side behind one function per kernel. Everything here takes arrays only."""
