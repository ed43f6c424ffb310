"""benchmarks/gpu_check.py, the prepared device check, stays runnable without a device: every
kernel family has a sanitizer call, its timings part runs end to end on the CPU, and a part
stopped at its limit leaves its log and no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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
    # calculate_qc_metrics is profiled by default, log1p is not
    profile = timings["steps"][0]["profile"]
    assert "profile" not in timings["steps"][1] and 0 < len(profile) <= 15
    assert any("calculate_qc_metrics" in hot["function"] for hot in profile)
    assert all(hot["cumulative_s"] <= timings["steps"][0]["seconds"] for hot in profile)
    assert timings["references"]["copy_bytes_per_s"] > 0
    assert record["machine"]["logical_cores"] > 0 and record["git"]["commit"]


def test_a_part_stopped_at_its_limit_leaves_its_log_and_no_process(tmp_path):
    """gpu_check's _run: at the limit the whole process group goes (pytest-xdist's workers
    would otherwise keep the GPU), and what the part printed is in its log and its tail."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    log = tmp_path / "part.log"
    script = "sleep 60 & echo child $!; echo started; wait"
    start = time.perf_counter()
    result = gpu_check._run(["bash", "-c", script], 2, log=log)
    assert time.perf_counter() - start < 30 and result["rc"] is None
    assert "started" in log.read_text() and "started" in result["output_tail"]
    child = int(log.read_text().split("child ")[1].split()[0])
    time.sleep(0.5)
    status = Path(f"/proc/{child}/status")  # gone, or a zombie waiting for init to reap it
    assert not status.exists() or "State:\tZ" in status.read_text()
