#!/usr/bin/env bash
# The one command for a GPU machine (see ../shared/DESIGN.md):
#   bash scripts/gpu_check.sh OUT_DIR [--full] [--sanitize]
# installs fastlayers with its CUDA extension for sm_90, runs the GPU tests, `fastlayers check` (every kernel
# compiled for the GPU against its reference, bf16 included) and the benchmarks; writes a summary, the benchmark
# results (JSON, markdown, PNG) and all logs under OUT_DIR, packed so they fit the device tool's few-files limit.
# Default: quick benchmarks without the torch.compile baselines, every step under a timeout, about 9 minutes at
# most on an H100. --full: all benchmark shapes and baselines, and the whole CPU test suite on the GPU too
# (compiled instead of interpreted kernels); budget 30+ minutes. --sanitize: compute-sanitizer memcheck and
# racecheck over `fastlayers check`.
set -uo pipefail
OUT=${1:-gpu_out}
shift || true
SANITIZE=0; FULL=0
for a in "$@"; do
  case "$a" in --sanitize) SANITIZE=1 ;; --full) FULL=1 ;; esac
done
cd "$(dirname "$0")/.."
mkdir -p "$OUT/logs" "$OUT/results"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTLAYERS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
SUMMARY="$OUT/summary.md"
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)" | tee -a "$SUMMARY"; }

step "environment"
{ nvidia-smi; $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0))"; } \
  > "$OUT/logs/env.txt" 2>&1
tail -1 "$OUT/logs/env.txt" | tee -a "$SUMMARY"

# Python packages missing on the machine travel as wheels in .whl/ (see the device tool's README).
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/fl-site .whl/*.whl && export PYTHONPATH=/tmp/fl-site
fi

step "install (CUDA extension for sm_${TORCH_CUDA_ARCH_LIST/./})"
if ! timeout 200 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/logs/build.log" 2>&1; then
  echo "BUILD FAILED (last lines):" | tee -a "$SUMMARY"; tail -30 "$OUT/logs/build.log" | tee -a "$SUMMARY"
fi
$PY -m fastlayers.cli info 2>&1 | tee "$OUT/logs/info.txt" | tail -20

step "fastlayers check (kernels vs references, bf16 included)"
timeout 90 $PY -m fastlayers.cli check > "$OUT/logs/check.txt" 2>&1
echo "exit $?: $(tail -1 "$OUT/logs/check.txt")" | tee -a "$SUMMARY"
grep -E "FAIL|ERROR" "$OUT/logs/check.txt" | head -20 | tee -a "$SUMMARY"

step "GPU tests (pytest -m gpu)"
# pytest-timeout (on the GPU image) stops a hung test after 60 s; the whole step has 170 s
timeout 170 $PY -m pytest -q -m gpu tests -p no:cacheprovider -p timeout --timeout=60 \
  > "$OUT/logs/gpu_tests.log" 2>&1
echo "exit $?: $(tail -1 "$OUT/logs/gpu_tests.log")" | tee -a "$SUMMARY"
grep -E "^FAILED|^ERROR" "$OUT/logs/gpu_tests.log" | head -30 | tee -a "$SUMMARY"

if [ "$FULL" = 1 ]; then
  step "all other tests on the GPU (compiled Triton kernels)"
  timeout 1200 $PY -m pytest -q -n 4 -m "not gpu" tests -p no:cacheprovider > "$OUT/logs/tests.log" 2>&1
  echo "exit $?: $(tail -1 "$OUT/logs/tests.log")" | tee -a "$SUMMARY"
fi

if [ "$SANITIZE" = 1 ] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool fastlayers check"
    timeout 300 compute-sanitizer --tool "$tool" --error-exitcode 9 $PY -m fastlayers.cli check \
      > "$OUT/logs/sanitize-$tool.txt" 2>&1
    echo "exit $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/logs/sanitize-$tool.txt" | tail -1)" | tee -a "$SUMMARY"
  done
fi

step "benchmarks"
if [ "$FULL" = 1 ]; then BENCH="" ; else BENCH="--quick --no-compile-baselines"; fi
timeout $([ "$FULL" = 1 ] && echo 1800 || echo 200) $PY -m fastlayers.cli bench $BENCH --out "$OUT/results" \
  > "$OUT/logs/bench.txt" 2>&1
echo "exit $?" | tee -a "$SUMMARY"
grep -E "^\| " "$OUT/logs/bench.txt" | grep -E "fastlayers \|" | head -60 >> "$SUMMARY"

step "done"
tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
cat "$SUMMARY"
