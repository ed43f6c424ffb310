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


def test_modules_import_neither_scanpy_nor_sklearn():
    """Importing them costs about a second of a 12 s `gpusc run`; they load where a function uses them."""
    code = "import gpusc\ngpusc.pp\ngpusc.tl\ngpusc.get\ngpusc.datasets\nimport gpusc._report, gpusc.__main__"
    assert imported_after(code, ("scanpy", "sklearn")) == []


def test_logging_silent_without_scanpy_then_scanpy_s_own():
    """gpusc._core.logg: info/hint/debug print nothing and import nothing while scanpy is not imported
    (its default verbosity would print nothing either); a warning is scanpy's own, scanpy imported."""
    code = """
import contextlib, datetime, io, sys
from gpusc._core import logg
err = io.StringIO()
with contextlib.redirect_stderr(err):
    when = logg.info("quiet", time=datetime.datetime.now(datetime.UTC))
    logg.hint("quiet"); logg.debug("quiet")
assert isinstance(when, datetime.datetime) and when.tzinfo is not None
assert err.getvalue() == "" and "scanpy" not in sys.modules
logg.warning("loud")
assert "scanpy" in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "WARNING: loud"  # scanpy's format at its default verbosity


def test_logging_forwards_to_scanpy_once_imported(capsys):
    import scanpy as sc

    from gpusc._core import logg

    verbosity, logfile = sc.settings.verbosity, sc.settings.logfile
    try:
        # scanpy binds its log stream when first set: point it at this test's captured stderr
        sc.settings.logfile = sys.stderr
        sc.settings.verbosity = "info"
        sc.logging.info("from scanpy")
        logg.info("from gpusc")
    finally:
        sc.settings.verbosity, sc.settings.logfile = verbosity, logfile
    theirs, ours = capsys.readouterr().err.splitlines()[-2:]
    assert "from scanpy" in theirs and ours == theirs.replace("from scanpy", "from gpusc")  # printed as scanpy's


def test_check_random_state_is_sklearn_s():
    import numpy as np
    import pytest
    from sklearn.utils import check_random_state as sklearn_s

    from gpusc._core.compat import check_random_state

    assert check_random_state(None) is sklearn_s(None)
    state = np.random.RandomState(2)
    assert check_random_state(state) is state
    for seed in (0, 7, np.int64(3)):
        assert check_random_state(seed).randint(10**6, size=5).tolist() == sklearn_s(seed).randint(10**6, size=5).tolist()
    for bad in ("x", 1.5, np.random.default_rng(0)):
        with pytest.raises(ValueError) as theirs:
            sklearn_s(bad)
        with pytest.raises(ValueError, match="cannot be used to seed") as ours:
            check_random_state(bad)
        assert str(ours.value) == str(theirs.value)


def test_cpu_run_imports_neither_scanpy_nor_sklearn(tmp_path):
    """gpusc run on the CPU (synthetic cells, the report included) without scanpy, scikit-learn
    and scipy.stats: their imports are about 1.5 s of the 12 s the issue allows a warm run."""
    code = f"from gpusc.__main__ import main\nassert main(['run', '--device', 'cpu', '--n-obs', '1500', " \
           f"'--out', {str(tmp_path)!r}]) == 0"
    assert imported_after(code, ("scanpy", "sklearn", "scipy.stats")) == []
    assert (tmp_path / "report.html").is_file()
