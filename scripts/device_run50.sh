#!/usr/bin/env bash
# run 50: sanitizer + correctness of the persistent grid (carried minimal sm_90a binaries), gbench A/B
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
bash scripts/gpu_cycle.sh carried   # unpacks .carry/*.xz into /tmp, the untagged one into build-tests/
printf '#!/bin/sh\nBINFORMER_FWD_PERSISTENT=0 exec /tmp/binformer_cuda_tests "$@"\n' > /tmp/binformer_cuda_tests_nopers; chmod +x /tmp/binformer_cuda_tests_nopers
F='PackSign.ManyShapesAllDtypesExact:Cases/AttentionFwdSm90*.MatchesFloat64Reference/*_1?:Cases/AttentionFwd.MatchesFloat64Reference/*_1?'
for tool in memcheck racecheck; do
  timeout 200 compute-sanitizer --tool $tool --error-exitcode 3 ./build-tests/binformer_cuda_tests --gtest_filter="$F" > $OUT/sanitize_$tool.log 2>&1 &
done
for i in 0 1 2 3 4 5; do
  GTEST_TOTAL_SHARDS=6 GTEST_SHARD_INDEX=$i timeout 200 ./build-tests/binformer_cuda_tests --gtest_filter='*AttentionFwd*:*PackSign*:-*Bench*' --gtest_brief=1 > $OUT/gtest_fwd_$i.log 2>&1 &
done
wait
for tool in memcheck racecheck; do echo "== $tool"; grep -E "ERROR SUMMARY|PASSED|FAILED|tests ran" $OUT/sanitize_$tool.log | head -5; done
cat $OUT/gtest_fwd_?.log > $OUT/gtest_fwd.log; rm -f $OUT/gtest_fwd_?.log
echo "gtest fwd: $(grep -h '^\[  PASSED' $OUT/gtest_fwd.log | awk '{s+=$4} END {print s}') passed; failed lines:"; grep -E "^\[  FAILED|Failure" $OUT/gtest_fwd.log | head -20
GBENCH_ROUNDS=2 bash scripts/gpu_cycle.sh gbench_ab pack
