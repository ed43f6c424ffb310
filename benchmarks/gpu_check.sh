#!/usr/bin/env bash
# The first thing to run on a new GPU (about 10 minutes): the GPU-marked tests (int64 parity
# included), compute-sanitizer memcheck and racecheck on every kernel family, and the 1M-cell
# timings of every pipeline step against their floors. Raw JSON: gpu-check-<device>.json.
#
# On this workplace's device machine, from the project root:
#   ../shared/tools/device-prep dask==2026.7.1 distributed==2026.7.1 'dask-cuda==26.10.*' \
#       cuda-core cuda-pathfinder toolz cloudpickle partd locket fsspec msgpack sortedcontainers \
#       tblib zict tornado psutil nvidia-ml-py click jinja2 markupsafe pyyaml
#                                                    # here, once: wheels and data into .device/;
#                                                    # with dask, distributed and dask-cuda (the dask
#                                                    # version dask-cuda 26.10 pins) for the dask
#                                                    # twins: the device image has none (all
#                                                    # downloadable here, checked; unrun on a device)
#   device run, carry [".device"]:  source .device/setup.sh && bash benchmarks/gpu_check.sh
# The results come back from $OUT; commit them under benchmarks/results/.
# On any other machine with a GPU: make test-gpu's venv, then
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
# Arguments go to benchmarks/gpu_check.py (e.g. --cells 200000, --parts tests,timings).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
