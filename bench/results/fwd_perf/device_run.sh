#!/usr/bin/env bash
# One device run for the forward kernel: build, correctness (gtest AttentionFwd*), timing (the
# AttentionFwdBench peer shapes, whole op = K pre-pass + kernel), and optionally ncu of the
# N=4096 d=64 shape. Run from a snapshot of the repository on the GPU machine, e.g.
#   cd /work/main && rm -rf .carry/fwdsnap && mkdir -p .carry/fwdsnap && git archive HEAD | tar -x -C .carry/fwdsnap \
#     && cp -r .whl .carry/fwdsnap/          (then the device tool with carry [".carry/fwdsnap"]:)
#   cd .carry/fwdsnap && MINIMAL=0 NCU=1 bash bench/results/fwd_perf/device_run.sh
# Writes everything under $OUT (gtest.txt, bench.txt, ncu_*.txt, build.log).
# (The run of 19:41 UTC used the filter 'AttentionFwd*', which misses the 155 Cases/AttentionFwd.* tests.)
#   MINIMAL=1   hdim64 instantiations only (~1 min build); 0: every head dim (the final check)
#   NCU=1       also profile the bounded kernel and the K pre-pass at (4,16,4096,64)
#   EXTRA_CMAKE e.g. "-DCMAKE_CUDA_FLAGS=-DBINFORMER_FWD_BOUNDED=0" (the online kernels only)
set -u
OUT=${OUT:-/tmp/fwd_out}
mkdir -p "$OUT"
MINIMAL=${MINIMAL:-1}
NCU=${NCU:-0}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/nvidia_cutlass-*.whl
minimal_flag=OFF
[ "$MINIMAL" = 1 ] && minimal_flag=ON
start=$(date +%s)
cmake -S . -B /tmp/b -G Ninja -DBINFORMER_BUILD_PYTHON=OFF -DBINFORMER_BUILD_TESTS=ON \
  -DBINFORMER_CUDA_ARCHS=90a -DBINFORMER_CUDA_MINIMAL=$minimal_flag \
  -DBINFORMER_CUTLASS_INCLUDE=/tmp/site/cutlass_library/source/include ${EXTRA_CMAKE:-} > "$OUT/build.log" 2>&1
cmake --build /tmp/b -j16 --target binformer_cuda_tests >> "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s (minimal=$MINIMAL)" | tee -a "$OUT/build.log"
grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c | head -20
T=/tmp/b/binformer_cuda_tests
$T --gtest_filter='*AttentionFwd*' > "$OUT/gtest.txt" 2>&1  # (Cases/AttentionFwd.* and the plain suites)
grep -E "FAILED|PASSED|SKIPPED \]|tests from" "$OUT/gtest.txt" | tail -25
$T --gtest_also_run_disabled_tests --gtest_filter='*AttentionFwdBench*' > "$OUT/bench.txt" 2>&1
grep "attention_fwd " "$OUT/bench.txt"
if [ "$NCU" = 1 ] && command -v ncu > /dev/null; then
  export BINFORMER_FWD_BENCH_ONLY="N=4096 d=64"  # (matches the causal / rel-pos / int8 rows too: first = plain)
  ncu --clock-control none --set full -k regex:attention_fwd_bounded --launch-skip 3 --launch-count 1 \
    -o "$OUT/ncu_fwd_4096" $T --gtest_also_run_disabled_tests --gtest_filter='*AttentionFwdBench*' > /dev/null 2>&1
  ncu --import "$OUT/ncu_fwd_4096.ncu-rep" --print-summary none > "$OUT/ncu_fwd_4096.txt" 2>&1
  ncu --import "$OUT/ncu_fwd_4096.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_fwd_4096_sass.csv" 2>&1
  grep -E "Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Ipc A|Executed Instructions  " \
    "$OUT/ncu_fwd_4096.txt" | head -12
  ncu --clock-control none --section SpeedOfLight -k regex:fwd_pack_keys --launch-skip 3 --launch-count 1 \
    $T --gtest_also_run_disabled_tests --gtest_filter='*AttentionFwdBench*' > "$OUT/ncu_pack_4096.txt" 2>&1
  grep -E "Duration|DRAM Throughput" "$OUT/ncu_pack_4096.txt" | head -4
fi
