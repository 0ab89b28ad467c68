#!/usr/bin/env bash
# One device session's whole GPU check, in one `device` call, 480 s at most (GPU_CHECK_TOTAL_S): with a
# 1-2 minute machine start that leaves about 5 of a 15-minute slot for one targeted rerun (docs/benchmarks.md).
#   1. install the carried wheels into /tmp/pylib, and the working tree itself as `lcmserve`
#      (links laid out as the installed package: lcmserve/ = client/*, lcmserve/server, lcmserve/export)
#   2. scripts/gpu_probe.py   in-process: graphs correct and fast, host work, syncs per engine iteration,
#                             eager speed levers, repros of #15 1-3 (<= 170 s: PROBE_BUDGET_S)
#   3. scripts/gpu_check.py   build, export, serve eager + CUDA graphs, bench, fp16 parity, baselines (the rest)
#   4. both tables last, so the device tool's output tail holds them
# Prepare here first (this machine has the registry): `make gpu-check-prepare` (-> .device/, git-ignored),
# then call the device tool with carry [".device"] and command `bash scripts/gpu_check.sh`.
# Arguments go to gpu_check.py (e.g. --aoti, --anchor 90, --stage-timeout export_eager=200).
# Environment: GPU_CHECK_TOTAL_S (default 480: whole script), PROBE_BUDGET_S (default 170; 0 skips the probe).
# Only small files go to $OUT: gpu.txt, probe.jsonl, probe.md, results.jsonl, table.md, log.txt.
set -uo pipefail
START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_TOTAL_S:-480}
PROBE_BUDGET=${PROBE_BUDGET_S:-170}
WORK=/tmp/lcmserve-gpu-work
export OUT="${OUT:-/tmp/lcmserve-gpu-out}" HF_HUB_OFFLINE=1 LCMSERVE_CACHE=/tmp/lcmserve-cache PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
left() { echo $((TOTAL - ($(date +%s) - START))); }

# 1. install (about 10 s): the carried wheels first on the path, over the machine's own packages
if ls .device/wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pylib \
        .device/wheels/*.whl 2>&1 | tail -3
else
    echo "no .device/wheels: run make gpu-check-prepare here and carry .device (using the machine's packages)"
fi
rm -rf /tmp/pylib/lcmserve && mkdir -p /tmp/pylib/lcmserve
for f in "$REPO"/client/*; do ln -s "$f" /tmp/pylib/lcmserve/; done
ln -s "$REPO/server" /tmp/pylib/lcmserve/server
ln -s "$REPO/export" /tmp/pylib/lcmserve/export
export PYTHONPATH=/tmp/pylib${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"

# 2. the probe, under its own budget (+30 s for start-up and the hard stop)
if [ "$PROBE_BUDGET" -gt 0 ]; then
    timeout -k 10 $((PROBE_BUDGET + 30)) $PY scripts/gpu_probe.py --budget "$PROBE_BUDGET" --out "$OUT/probe.jsonl" \
        --work "$WORK/probe" >"$WORK/probe.log" 2>&1
    echo "probe exit $?"
fi

# 3. the check, with what is left (its own budget; the outer timeout only if it overruns)
BUDGET=$(($(left) - 15))
timeout -k 10 $((BUDGET + 10)) $PY scripts/gpu_check.py --budget "$BUDGET" --out "$OUT" --work "$WORK" "$@" \
    >"$WORK/check.log" 2>&1
echo "check exit $?"

# 4. logs' tails (a 16 MiB limit per file comes back), then both tables
{ echo "==== probe.log (tail)"; tail -c 150000 "$WORK/probe.log" 2>/dev/null
  echo "==== check.log (tail)"; tail -c 300000 "$WORK/check.log"; } >"$OUT/log.txt"
grep -h -E '"status": "(failed|timeout)"' "$OUT/probe.jsonl" "$OUT/results.jsonl" 2>/dev/null | cut -c1-600
cat "$OUT/probe.md" "$OUT/table.md" 2>/dev/null
echo "total $(($(date +%s) - START)) s; nvidia-smi: $(cat "$OUT/gpu.txt")"
