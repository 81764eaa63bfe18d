#!/usr/bin/env bash
# A/B device run for a change of the bounded kernel's launch shape: the full device_run.sh on
# HEAD (every head dim, gtests, bench, ncu), then, while time is left, a minimal (hdim64) build
# with the previous defaults given as -D knobs and the same AttentionFwdBench, in the same session.
#   BASE_FLAGS  the knobs that restore the previous configuration
#   AB_BUDGET_S skip the baseline when the first part took longer than this (seconds)
set -u
OUT=${OUT:-/tmp/fwd_out}
mkdir -p "$OUT"
t0=$(date +%s)
MINIMAL=${MINIMAL:-0} NCU=${NCU:-1} bash bench/results/fwd_perf/device_run.sh
echo "HEAD part: $(( $(date +%s) - t0 )) s"
if [ $(( $(date +%s) - t0 )) -lt "${AB_BUDGET_S:-330}" ]; then
  cmake -S . -B /tmp/b0 -G Ninja -DBINFORMER_BUILD_PYTHON=OFF -DBINFORMER_BUILD_TESTS=ON \
    -DBINFORMER_CUDA_ARCHS=90a -DBINFORMER_CUDA_MINIMAL=ON \
    -DBINFORMER_CUTLASS_INCLUDE=/tmp/site/cutlass_library/source/include \
    "-DCMAKE_CUDA_FLAGS=${BASE_FLAGS:-}" > "$OUT/build_base.log" 2>&1
  cmake --build /tmp/b0 -j16 --target binformer_cuda_tests >> "$OUT/build_base.log" 2>&1 || { tail -30 "$OUT/build_base.log"; exit 1; }
  echo "baseline ($BASE_FLAGS) built at $(( $(date +%s) - t0 )) s"
  /tmp/b0/binformer_cuda_tests --gtest_also_run_disabled_tests --gtest_filter='*AttentionFwdBench*' > "$OUT/bench_base.txt" 2>&1
  grep "attention_fwd " "$OUT/bench_base.txt"
fi
echo "total: $(( $(date +%s) - t0 )) s"
