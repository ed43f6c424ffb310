"""benchmarks/gpu_check.py, the prepared device check, stays runnable without a device: every
kernel family has a sanitizer call, and its timings part runs end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gpusc._core import cuda

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_every_kernel_family_is_sanitized():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_sanitize
    finally:
        sys.path.remove(str(BENCH))
    assert set(gpu_sanitize.FAMILIES) == set(cuda.kernel_files())


def test_timings_part_runs_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--parts", "timings",
                           "--cells", "3000", "--steps", "calculate_qc_metrics,log1p", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    timings = record["parts"]["timings"]
    assert [row["step"] for row in timings["steps"]] == ["calculate_qc_metrics", "log1p"]
    for row in timings["steps"]:
        assert row["seconds"] > 0 and row["floor_kind"] == "bytes" and row["floor_seconds"] > 0
    assert timings["references"]["copy_bytes_per_s"] > 0
    assert record["machine"]["logical_cores"] > 0 and record["git"]["commit"]
