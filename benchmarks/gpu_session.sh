#!/usr/bin/env bash
# Everything a GPU machine should run, in two stages that each fit a 10-minute call:
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh test     # build the extension (CUDA), GPU test tier
#   OUT=/some/dir bash benchmarks/gpu_session.sh report   # GPU report + the benchmarks on CUDA
#   OUT=/some/dir bash benchmarks/gpu_session.sh tuned    # the GPU report with autotuned configs
#
# Uses the machine's own torch/Triton (python3, or $PYTHON) and installs nothing else
# (pip --no-deps --no-build-isolation), so it works offline. Results, logs and the versions go
# to $OUT (default: benchmarks/results/gpu-<date>); copy them to benchmarks/results/ and commit.
set -u
# Logs are written as the tests run (unbuffered, one line per test), and each step has its own
# time limit, so a stage that runs long still leaves its results under $OUT before the device
# call's 10-minute limit.
export PYTHONUNBUFFERED=1
stage=${1:-}
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
summary="$OUT/summary.txt"

record() { echo "$(date -u +%FT%TZ) $*" | tee -a "$summary"; }

environment() {
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__)"
  } > "$OUT/environment.txt" 2>&1
  cat "$OUT/environment.txt"
}

case "$stage" in
  test)
    environment
    # the visible GPU's architecture only: a faster build than the default list
    MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1
    record "build exit $?"
    "$PY" -c "import json, tarp_fast; print(json.dumps(tarp_fast.ext_info(), indent=1, default=str))" \
      > "$OUT/ext_info.json" 2>&1
    record "ext_info written"
    timeout 330 "$PY" -m pytest tests -m "gpu or native" -v -p no:cacheprovider -rs > "$OUT/pytest_gpu.log" 2>&1
    record "GPU + native test tier exit $? ($(tail -n 1 "$OUT/pytest_gpu.log"))"
    # the Triton GPU tier again with the row schedule from the extension's CUDA helpers (opt-in
    # until this has passed on a GPU: README, "The native extension")
    TARP_FAST_CUDA_HELPERS=1 timeout 150 "$PY" -m pytest tests/test_triton_gpu.py -v -p no:cacheprovider -rs \
      > "$OUT/pytest_gpu_cuda_helpers.log" 2>&1
    record "GPU tier with TARP_FAST_CUDA_HELPERS=1 exit $? ($(tail -n 1 "$OUT/pytest_gpu_cuda_helpers.log"))"
    ;;
  report)
    environment
    timeout 420 "$PY" benchmarks/gpu_report.py --out "$OUT" > "$OUT/gpu_report.log" 2>&1
    record "gpu_report exit $?"
    timeout 120 "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only -k "cuda or llm or tams" \
      --benchmark-json "$OUT/benchmarks.json" > "$OUT/benchmarks.log" 2>&1
    record "benchmarks exit $? ($(tail -n 1 "$OUT/benchmarks.log"))"
    ;;
  tuned)
    environment
    timeout 560 "$PY" benchmarks/gpu_report.py --autotune --out "$OUT" > "$OUT/gpu_report_autotuned.log" 2>&1
    record "gpu_report --autotune exit $?"
    ;;
  *)
    echo "usage: OUT=DIR bash benchmarks/gpu_session.sh test|report|tuned" >&2
    exit 2
    ;;
esac
