#!/usr/bin/env bash
# One prepared GPU run, no package registry: build the CUDA extension (copied into the package),
# run the GPU test subset, probe the contrastive kernels, run the full benchmark, write
# benchmarks/results/<gpu>-<date>/ (at most DEADLINE = 570 s).
#
# Needs on the machine: a CUDA GPU; python3 with a CUDA build of torch (>= 2.5) and triton; nvcc
# for the `cuda` backend (without it the build warns and the triton/torch backends still run);
# pytest, pytest-benchmark, matplotlib, einops. Missing pure-Python packages can travel as wheels
# in .whl/ (installed with --no-index into a temporary folder).
#
# Usage (from anywhere):  bash benchmarks/gpu_runner.sh [extra wmkernels-bench arguments]
# Environment knobs: PYTHON (python3), MAX_JOBS (16, parallel compiles), BUILD_TIMEOUT (240 s, in
#   the background while the Triton steps run; 0: no build), WMKERNELS_CUDA_ARCHS (80,90: the sm_
#   targets built), TEST_TIMEOUT (100 s per test step: Triton, then the cuda backend once built),
#   TESTS (test files; default the GPU-relevant ones), TEST_WORKERS (8, with pytest-xdist),
#   PYTEST_ARGS (more pytest arguments), EXTRA (a command run after the Triton tests, while the
#   build may still run; EXTRA_TIMEOUT 60 s), PROBE (batch sizes for benchmarks/probe_contrastive_gpu.py,
#   65536; 0: skip), PROBE_TIMEOUT (130 s), BENCH_TIMEOUT (240 s), DEADLINE (570 s: every step's
#   timeout is cut so that the steps after it keep their share and the whole run ends within it,
#   inside a 10-minute device call), RESULTS (default benchmarks/results/<gpu>-<date>), WHEELS
#   (.whl), OUT (if set, a tarball of the results and the logs is copied there).
# Peers are picked up when importable: carry Inf-CL as a wheel (pip download --no-deps inf_cl).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
unset TRITON_INTERPRET                     # real Triton kernels on the GPU
export PYTHONUNBUFFERED=1 WMKERNELS_NO_JIT=1  # never spend the lease on a CPU-only JIT build

if [ -d "${WHEELS:-.whl}" ] && ls "${WHEELS:-.whl}"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/wmkernels-site "${WHEELS:-.whl}"/*.whl && export PYTHONPATH=/tmp/wmkernels-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF' || { echo "gpu_runner: no usable CUDA torch here" >&2; exit 2; }
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("gpu_runner:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
EOF
RES=${RESULTS:-$("$PY" -c "from wmkernels.bench.__main__ import default_out; print(default_out('cuda', False))")}
mkdir -p "$RES"
echo "gpu_runner: results -> $RES"
status=0
t0=$SECONDS
cap() {  # cap WANT RESERVE: WANT seconds, cut so that RESERVE seconds remain before DEADLINE (at least 10)
  local left=$(( ${DEADLINE:-570} - (SECONDS - t0) - $2 ))
  [ "$left" -lt 10 ] && left=10
  echo $(( $1 < left ? $1 : left ))
}

# The nvcc/g++ build takes minutes of CPU and the Triton steps need only the GPU: the build runs in
# the background into its own folder while the probe and the Triton tests run, and its module is
# copied into the package before the C++-backend tests and the benchmark.
BLD=/tmp/wmkernels-build
echo "== build in the background (nvcc for ${WMKERNELS_CUDA_ARCHS:-80,90}; log: $RES/build.log)"
build_pid=""
if [ "${BUILD_TIMEOUT:-240}" = 0 ]; then
  echo "skipped (BUILD_TIMEOUT=0): the cpu and cuda backends are unavailable" >"$RES/build.log"
else
  rm -rf "$BLD"
  MAX_JOBS=${MAX_JOBS:-16} WMKERNELS_BUILD_EXT=1 timeout "$(cap "${BUILD_TIMEOUT:-240}" 100)" \
    "$PY" setup.py build_ext --build-lib "$BLD" --build-temp "$BLD/temp" >"$RES/build.log" 2>&1 &
  build_pid=$!
fi

if [ -z "${TESTS:-}" ]; then
  # test_gpu_build (ahead-of-time compiles, minutes of CPU) and test_bench run in CI already
  TESTS=$(ls tests/test_mse.py tests/test_masked.py tests/test_contrastive.py tests/test_triton_review.py tests/test_nonfinite.py tests/test_train.py 2>/dev/null | tr '\n' ' ')
fi
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n ${TEST_WORKERS:-8}"  # pytest-xdist when present
run_tests() {  # run_tests NAME WANT RESERVE -k-EXPRESSION
  local t=$SECONDS
  echo "== tests: $1 (not slow; log: $RES/tests-$1.log)"
  # niced: while the build runs it should get the cores first (run 4's build lost its window to
  # the test workers' Triton compiles)
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout "$(cap "$2" "$3")" nice -n 10 "$PY" -m pytest -m "not slow" -q -p no:cacheprovider \
    $XDIST -k "$4" ${PYTEST_ARGS:-} $TESTS >"$RES/tests-$1.log" 2>&1 || { echo "tests ($1) failed or timed out" >&2; status=1; }
  tail -n 12 "$RES/tests-$1.log"
  echo "   tests ($1) took $((SECONDS - t)) s"
}

echo "== contrastive kernel probe (log: $RES/probe.log)"
if [ "${PROBE:-65536}" != 0 ]; then
  # first: it compiles every tile candidate (the tests and the benchmark then find them in
  # Triton's cache) and its per-candidate times are what the open GPU target needs first
  # shellcheck disable=SC2086
  timeout "$(cap "${PROBE_TIMEOUT:-130}" 200)" "$PY" benchmarks/probe_contrastive_gpu.py ${PROBE:-65536} >"$RES/probe.log" 2>&1 \
    || { echo "probe failed or timed out" >&2; status=1; }
  tail -n 4 "$RES/probe.log"
fi

run_tests triton "${TEST_TIMEOUT:-100}" 150 triton

if [ -n "${EXTRA:-}" ]; then  # e.g. a one-off check script, while the build may still run
  echo "== extra: $EXTRA (log: $RES/extra.log)"
  timeout "$(cap "${EXTRA_TIMEOUT:-60}" 120)" nice -n 10 bash -c "$EXTRA" >"$RES/extra.log" 2>&1 || { echo "extra failed or timed out" >&2; status=1; }
  tail -n 20 "$RES/extra.log"
fi

if [ -n "$build_pid" ]; then
  wait "$build_pid" || { echo "build failed or timed out" >&2; status=1; }
  cp "$BLD"/wmkernels/_C*.so wmkernels/ 2>/dev/null || echo "no compiled module to copy" >&2
fi
tail -n 3 "$RES/build.log"
"$PY" -c "import wmkernels; [print(f'  {k:7s}', v.available, '-', v.reason) for k, v in wmkernels.available_backends().items()]" \
  2>&1 | tee "$RES/backends.txt"
echo "   build done at $((SECONDS - t0)) s"
if [ -n "$build_pid" ] && ls wmkernels/_C*.so >/dev/null 2>&1; then
  run_tests cuda "${TEST_TIMEOUT:-100}" 70 "cuda and not triton"
fi

echo "== benchmark (log: $RES/bench.log)"
t2=$SECONDS
timeout "$(cap "${BENCH_TIMEOUT:-240}" 0)" "$PY" -m wmkernels.bench --device cuda --out "$RES" "$@" \
  >"$RES/bench.log" 2>&1 || { echo "benchmark failed or timed out (partial results kept)" >&2; status=1; }
grep -E "^\[|failed|Error" "$RES/bench.log" | tail -n 20
echo "   benchmark took $((SECONDS - t2)) s; total $((SECONDS - t0)) s"
[ -f "$RES/results.md" ] && sed -n '/^## Summary/,/^## /p' "$RES/results.md"

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" "$RES" && cp "$RES"/results.md "$RES"/*.log "$OUT"/ 2>/dev/null
fi
exit $status
