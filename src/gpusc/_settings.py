"""``gpusc.settings``: where steps that start from host obsm/obsp arrays run."""

from __future__ import annotations

from typing import Literal

Device = Literal["auto", "gpu", "cpu"]
DEVICES = ("auto", "gpu", "cpu")


def _check_device(device, arg: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"{arg} must be one of {DEVICES}, got {device!r}")
    return device


class Settings:
    """Global options. ``device``: ``"auto"`` (the GPU when CuPy sees one), ``"gpu"`` or ``"cpu"``.

    Steps that read host arrays from obsm/obsp (neighbors, umap, leiden, ...) run where
    this says unless their own ``device=`` argument overrides it.
    """

    def __init__(self) -> None:
        self._device: str = "auto"

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: Device) -> None:
        self._device = _check_device(value, "gpusc.settings.device")

    def __repr__(self) -> str:
        return f"gpusc.settings(device={self._device!r})"


settings = Settings()


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "no GPU"
        return False


def resolve_device(device: Device | None = None) -> Literal["gpu", "cpu"]:
    """``"gpu"`` or ``"cpu"`` for a ``device=`` argument (``None``: ``settings.device``).

    ``"auto"`` is the GPU only when CuPy imports and sees a device; ``"gpu"`` without
    one raises a RuntimeError that says how to get one.
    """
    if device is None:
        device = settings.device
    _check_device(device, "device")
    if device == "cpu":
        return "cpu"
    if device == "gpu":
        if not gpu_available():
            raise RuntimeError(
                "device='gpu' but CuPy is not installed or sees no CUDA device; install "
                "gpusc[cu13] (or cu12) on a machine with a GPU, or use device='cpu'"
            )
        return "gpu"
    return "gpu" if gpu_available() else "cpu"
