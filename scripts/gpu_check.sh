#!/usr/bin/env bash
# The GPU check, in one `device` call. Prepare here first (this machine has the registry):
#   make gpu-check-prepare      # wheels of lcmserve, diffusers and the small gRPC extras into .device/
# then run on the device with carry [".device"]:
#   bash scripts/gpu_check.sh
# The device has torch, transformers, peft, grpcio, protobuf, onnxruntime but no registry and no
# diffusers (DESIGN.md, "Working on the GPU machine"): the carried wheels go to /tmp/pylib.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/lcmserve-gpu-check}" HF_HUB_OFFLINE=1 LCMSERVE_CACHE=/tmp/lcmserve-cache
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps --no-index --target /tmp/pylib .device/wheels/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/pylib${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 540 python3 scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
