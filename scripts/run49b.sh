#!/usr/bin/env bash
# Device run 49b (session 8): compute-sanitizer on the final kernels (a minimal sm_90a gtest binary
# built off the device and carried in .carry/) and the gbench A/B of the Q packing against a
# minimal build with -DBINFORMER_FWD_Q_PACK_LANES, built here while the sanitizer runs.
set -uo pipefail
export OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/nvidia_cutlass*.whl && export PYTHONPATH=/tmp/site
T=.carry/binformer_cuda_tests
chmod +x $T
( cmake -S . -B /tmp/build-base -G Ninja -DBINFORMER_BUILD_PYTHON=OFF -DBINFORMER_BUILD_TESTS=ON -DBINFORMER_CUDA_ARCHS=90a \
    -DBINFORMER_CUDA_MINIMAL=ON "-DCMAKE_CUDA_FLAGS=-DBINFORMER_FWD_Q_PACK_LANES" > $OUT/build_base.log 2>&1 &&
  cmake --build /tmp/build-base -j 12 --target binformer_cuda_tests >> $OUT/build_base.log 2>&1; echo "base build rc=$?" >> $OUT/build_base.log ) &
base=$!
F='PackSign.ManyShapesAllDtypesExact:Cases/AttentionFwdSm90*.MatchesFloat64Reference/*_1?:Cases/AttentionFwd.MatchesFloat64Reference/*_1?'
for tool in memcheck racecheck; do
  timeout 90 compute-sanitizer --tool $tool --error-exitcode 3 $T --gtest_brief=1 --gtest_filter="$F" > $OUT/sanitize_$tool.log 2>&1
  echo "$tool rc=$?"; tail -4 $OUT/sanitize_$tool.log
done
wait $base; tail -1 $OUT/build_base.log
for i in 1; do
  for b in $T /tmp/build-base/binformer_cuda_tests; do
    timeout 60 $b --gtest_also_run_disabled_tests --gtest_filter='*AttentionFwdBench*' > $OUT/gbench_${i}_$(basename $(dirname $b)).log 2>&1
  done
done
ex() { grep -E " us" "$1" | sed -E 's/attention_fwd (.{22}).*: +([0-9.]+) us.*/\1 \2/'; }
for i in 1; do paste <(ex $OUT/gbench_${i}_.carry.log) <(ex $OUT/gbench_${i}_build-base.log | sed -E 's/.* //'); done
