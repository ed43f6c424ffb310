"""One module per ``kernels/*.cu`` family: the GPU launcher and its numba CPU twin,
side by side behind one function per kernel. Everything here takes arrays only."""


def prange_only() -> dict:
    """numba's ``parallel=`` option for a kernel whose threads are its ``prange`` loops only.

    ``parallel=True`` also turns every whole-array operation (``np.zeros``, ``.copy()``,
    ``.sum()``, ``.any()``, slice assignment) into a threaded loop of its own, each compiled as
    a separate function: seconds of a first run's compilation for microseconds of work. A new
    dict per call, as numba empties the one it is given.
    """
    return {"prange": True, "comprehension": False, "reduction": False, "inplace_binop": False,
            "setitem": False, "numpy": False, "stencil": False, "fusion": False}
