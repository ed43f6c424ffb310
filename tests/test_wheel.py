"""The wheel ships the CUDA sources, and an installed wheel finds them (not the checkout's)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(outdir: Path) -> Path:
    cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir)]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.append("--no-isolation")  # the backend is here: skip fetching it again
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    (wheel,) = outdir.glob("gpusc-*.whl")
    return wheel


def test_wheel_ships_kernels_and_installs(tmp_path):
    wheel = build_wheel(tmp_path / "dist")

    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))
    assert any(s.endswith(".cu") for s in sources), "kernels/ has no .cu files to ship"
    missing = [s for s in sources if f"gpusc/kernels/{s}" not in names]
    assert not missing, f"{wheel.name} lacks gpusc/kernels/{missing}"

    # A fresh venv that sees this interpreter's packages (numpy, ...) but gets gpusc only
    # from the wheel. --system-site-packages reaches the base interpreter, not an outer
    # venv, so the outer venv's site-packages go in by a .pth (appended after the new
    # venv's own site-packages, and without running the editable install's .pth hook).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    outer = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(site) / "_outer_env.pth").write_text("\n".join(sorted(outer)) + "\n")

    proc = subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"pip install of {wheel.name} failed:\n{proc.stdout}\n{proc.stderr}"

    family = sorted(s for s in sources if s.endswith(".cu"))[0].removesuffix(".cu")
    check = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import gpusc
        from gpusc._core import cuda
        venv = Path(sys.prefix).resolve()
        assert venv == Path({str(venv)!r}).resolve(), sys.prefix
        assert venv in Path(gpusc.__file__).resolve().parents, gpusc.__file__
        assert venv in cuda.kernel_dir().resolve().parents, cuda.kernel_dir()
        src = cuda.kernel_source({family!r})
        assert src.startswith('#line 1 "kernels/{family}.cu"'), src[:80]
        assert '__global__' in src
        print(gpusc.__file__)
    """)
    # cwd outside the checkout so nothing there shadows the installed package
    proc = subprocess.run([py, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, f"installed wheel check failed:\n{proc.stdout}\n{proc.stderr}"
