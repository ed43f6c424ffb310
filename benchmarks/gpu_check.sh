#!/usr/bin/env bash
# The first thing to run on a new GPU: the GPU-marked tests (int64 parity included),
# compute-sanitizer memcheck and racecheck on every kernel family, and the 1M-cell timings of
# every pipeline step against their floors. Raw JSON: gpu-check-<device>.json. On an H200
# (2026-12-04): --parts tests,timings took 279 s with the set-up, --parts sanitizer 131 s, so
# two device calls back to back (a call may run 10 minutes; each part has its own limit).
#
# On this workplace's device machine, from the project root:
#   ../shared/tools/device-prep dask==2026.7.1 distributed==2026.7.1 'dask-cuda==26.10.*' \
#       partd locket tblib zict tornado harmonypy==2.1.0 bbknn==1.6.0 msgspec google-crc32c \
#       scverse-misc pydantic pydantic-core pydantic-settings python-dotenv typing-inspection \
#       annotated-types wcwidth typing-extensions
#   cp ~/.cache/pip/wheels/*/*/*/*/annoy-*.whl .device/whl/   # bbknn's annoy has no binary
#                                                    # wheel: build one here (pip wheel annoy)
#                                                    # here, once: wheels and data into .device/.
#                                                    # The device image (KINDS.md) lacks these:
#                                                    # zarr 3.4 needs msgspec and google-crc32c,
#                                                    # anndata 0.13 scverse-misc[settings]
#                                                    # (pydantic...); the rest are the dask
#                                                    # twins' and the oracles' (used 2026-12-04
#                                                    # on an H200: the set that imports)
#   device run, carry [".device"]:  source .device/setup.sh; bash benchmarks/gpu_check.sh --parts tests,timings
#   then at once (the machine stays warm 30 s):     ... --parts sanitizer
# The results come back from $OUT; commit them under benchmarks/results/.
# On any other machine with a GPU: make test-gpu's venv, then
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
# Arguments go to benchmarks/gpu_check.py (e.g. --cells 200000, --parts tests,timings).
# The steps furthest over their floors (QC, the filters, diffmap, scrublet) run under cProfile
# and keep their hot functions in their rows (--profile '' for none).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
