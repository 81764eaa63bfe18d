#!/usr/bin/env bash
# Device run 49 (session 8): the one-thread-a-row K pre-pass and Q packing, with their A/B arms.
set -uo pipefail
export OUT=${OUT:-/tmp/out}
bash scripts/gpu_cycle.sh build > $OUT/c_build.log 2>&1 || { tail -40 $OUT/c_build.log; exit 1; }
grep -E "binformer .*cuda" $OUT/c_build.log
# the Q-packing baseline (minimal hdim64 build with the 8-lanes packing) builds while the tests run
( cmake -S . -B /tmp/build-base -G Ninja -DBINFORMER_BUILD_PYTHON=OFF -DBINFORMER_BUILD_TESTS=ON \
    -DBINFORMER_CUDA_ARCHS=90a -DBINFORMER_CUDA_MINIMAL=ON "-DCMAKE_CUDA_FLAGS=-DBINFORMER_FWD_Q_PACK_LANES" > $OUT/build_base.log 2>&1 &&
  cmake --build /tmp/build-base -j 8 --target binformer_cuda_tests >> $OUT/build_base.log 2>&1; echo "base build rc=$?" >> $OUT/build_base.log ) &
base=$!
(PYTEST_WORKERS=6 bash scripts/gpu_cycle.sh pytest > $OUT/c_pytest.log 2>&1) &
pyt=$!
bash scripts/gpu_cycle.sh gtest > $OUT/c_gtest.log 2>&1
wait $pyt; wait $base
grep -hE "gtest rc|pytest rc|passed|failed|FAILED" $OUT/c_gtest.log $OUT/c_pytest.log | head -12; tail -1 $OUT/build_base.log
BENCH_ARGS="--skip-pack-gemm --ab-env BINFORMER_FWD_PACK_LANES=1" bash scripts/gpu_cycle.sh bench > $OUT/c_bench.log 2>&1
grep -E "^ *[a-z0-9_]+ binformer=" $OUT/bench.log | sed -E 's/binformer_dense_bias=[^a-z]*binformer_pv_int8=[^a-z]*//; s/cudnn_dense_bias=[ 0-9.]*//; s/flex=[ 0-9.]*sage=[ 0-9.na/]*//' | cut -c1-300
for b in build-tests/binformer_cuda_tests /tmp/build-base/binformer_cuda_tests; do
  timeout 120 $b --gtest_also_run_disabled_tests --gtest_filter='*AttentionFwdBench*' > $OUT/gbench_$(basename $(dirname $b)).log 2>&1
done
paste <(grep -E " us" $OUT/gbench_build-tests.log | cut -c1-70) <(grep -E " us" $OUT/gbench_build-base.log | cut -c1-70)
