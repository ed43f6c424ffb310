"""`import gpusc` stays light, and no submodule pulls in the optional RAPIDS libraries."""

from __future__ import annotations

import json
import subprocess
import sys

OPTIONAL = ("cuml", "cugraph", "pylibcugraph", "cuvs", "dask_cuda", "rmm")


def imported_after(code: str, watch) -> list[str]:
    """Run ``code`` in a fresh interpreter; which of ``watch`` it left in sys.modules."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {list(watch)!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, f"{code!r} failed:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_is_lazy():
    assert imported_after("import gpusc", ("scanpy", "numba", *OPTIONAL)) == []


def test_submodules_import_no_optional_accelerators():
    code = "import gpusc\ngpusc.pp\ngpusc.get\ngpusc.memory"
    assert imported_after(code, OPTIONAL) == []
