#!/usr/bin/env bash
# One build-test-benchmark cycle on the lent GPU machine (see bench/NOTES.md). Logs go to $OUT.
# Usage: bash scripts/gpu_cycle.sh [build] [gtest] [pytest] [sanitize] [bench] [bench_bwd] [gbench] [ab] [ncu] [train] [pack]
#   pack        last: bundles every file of $OUT but the JSON / PNG results and cycle.log into
#               $OUT/logs_<time>.tgz (the device tool returns at most 8 files; run 49 lost its
#               gpu_forward.json to that limit)
#   Steps that build (ab) need the carried CUTLASS wheel on PYTHONPATH, which this script sets:
#   run compile-time A/B builds through `ab`, not from a separate script (run 49's failed).
#   BENCH_TAG   suffix of the bench output files (A/B runs of the same step, e.g. with a runtime switch set)
#   gbench      the disabled *Bench gtests (GBENCH_FILTER), kernel times without torch
#   ab          a minimal build with the bench widths (hdim64, fp16 72 / 128) and BASE_FLAGS (the -D
#               knobs of the baseline), and its gbench
#   carried     test binaries built off the device (minimal sm_90a builds, -DBINFORMER_CUDA_BENCH_WIDTHS=ON
#               for every bench shape; `xz`-compressed to fit the 64 MiB carry: ~30 MB each) in
#               .carry/binformer_cuda_tests[_TAG].xz: unpacked first; without a
#               build step the untagged one is build-tests/binformer_cuda_tests (gtest / sanitize)
#   gbench_ab   the gbench of every carried binary, alternating for GBENCH_ROUNDS (2) rounds:
#               compile-time A/B without a device build, logs gbench_<TAG>_<round>.log, and the
#               table of medians against GBENCH_BASE (bench/gbench_table.py) in gbench_table.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=" $* "
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/cycle.log"; }
# Wheels carried in .whl (nvidia-cutlass for the headers, sageattention as a peer; fetch them here with
# `pip download --no-deps nvidia-cutlass sageattention -d .whl` and pass carry [".whl"]).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ command -v g++; g++ --version | head -1; python3 -c "import torch, re; print(sorted(set(l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l)))"; } > "$OUT/toolchain.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/nvidia_smi.csv" 2>&1
if ls .carry/binformer_cuda_tests*.xz >/dev/null 2>&1; then
  # (once per carried file: a later step of the same call keeps what an earlier one put in /tmp;
  # the checksums live outside the /tmp/binformer_cuda_tests* glob that lists the gbench arms)
  mkdir -p /tmp/carried_sums
  for f in .carry/binformer_cuda_tests*.xz; do
    name=$(basename "$f" .xz); sum=$(cksum < "$f")
    if [[ ! -x "/tmp/$name" || "$(cat "/tmp/carried_sums/$name" 2>/dev/null)" != "$sum" ]]; then
      xz -dc "$f" > "/tmp/$name" && chmod +x "/tmp/$name" && echo "$sum" > "/tmp/carried_sums/$name"
    fi
  done
  if [[ $steps != *" build "* && -f /tmp/binformer_cuda_tests ]]; then
    mkdir -p build-tests && cp /tmp/binformer_cuda_tests build-tests/binformer_cuda_tests
    log "carried test binary: build-tests/binformer_cuda_tests ($(ls /tmp/binformer_cuda_tests* | wc -l) carried)"
  fi
fi
if [[ $steps == *" build "* ]]; then
  log "build: CUDA library + gtest (sm_90a, every instantiation)"
  if [ -f .carry/libbinformer_cuda.a ]; then log "(prebuilt library carried)"; fi
  cmake -S . -B build-tests -G Ninja -DBINFORMER_BUILD_PYTHON=OFF -DBINFORMER_BUILD_TESTS=ON \
        -DBINFORMER_CUDA_ARCHS=90a ${CMAKE_EXTRA:-} > "$OUT/build.log" 2>&1 &&
  cmake --build build-tests -j 16 >> "$OUT/build.log" 2>&1 || { log "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1; }
  log "build: torch binding against the built library"
  python3 -m pip install -q --no-build-isolation --no-deps . \
      -Ccmake.define.BINFORMER_PREBUILT_CUDA_LIB="$PWD/build-tests/libbinformer_cuda.a" \
      -Ccmake.define.BINFORMER_CUDA_ARCHS=90a -Cbuild-dir=build-wheel >> "$OUT/build.log" 2>&1 \
      || { log "WHEEL BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1; }
  python3 -c "import binformer, torch; print('binformer', binformer.__file__, 'cuda:', binformer.has_cuda())" 2>&1 | tee -a "$OUT/cycle.log"
fi
if [[ $steps == *" gtest "* ]]; then
  # 8 shards side by side (one process runs the suite in ~15 min; GTEST_FILTER narrows it)
  log "gtest CUDA (8 shards) ${GTEST_FILTER:-}"
  for i in 0 1 2 3 4 5 6 7; do
    GTEST_TOTAL_SHARDS=8 GTEST_SHARD_INDEX=$i timeout 400 ./build-tests/binformer_cuda_tests --gtest_brief=1 \
        > "$OUT/gtest_cuda_$i.log" 2>&1 &
  done
  rc=0; for job in $(jobs -p); do wait "$job" || rc=1; done
  cat "$OUT"/gtest_cuda_?.log > "$OUT/gtest_cuda.log"; rm -f "$OUT"/gtest_cuda_?.log
  log "gtest rc=$rc: $(grep -c '^\[  PASSED' "$OUT/gtest_cuda.log") shards passed, $(grep -h '^\[  PASSED' "$OUT/gtest_cuda.log" | awk '{s+=$4} END {print s}') tests; failed: $(grep -c '^\[  FAILED  \] [A-Z]' "$OUT/gtest_cuda.log")"
  grep -E "FAILED|Failure" "$OUT/gtest_cuda.log" | head -20
fi
if [[ $steps == *" sanitize "* ]]; then
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    log "compute-sanitizer $tool"
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 ./build-tests/binformer_cuda_tests \
        --gtest_filter="${SANITIZE_FILTER:-PackSign.ManyShapesAllDtypesExact:SignMatmul.ShapesAndDepths:Cases/AttentionFwd.MatchesFloat64Reference/*_1?:AttentionBwd.RelativePositionTable}" > "$OUT/sanitize_$tool.log" 2>&1; log "$tool rc=$?"
    tail -5 "$OUT/sanitize_$tool.log"
  done
fi
if [[ $steps == *" bench "* ]]; then
  log "bench forward"
  timeout 420 python3 bench/bench_gpu.py --out "$OUT/gpu_forward${BENCH_TAG:-}.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench${BENCH_TAG:-}.log" | tail -20
fi
if [[ $steps == *" bench_bwd "* ]]; then
  log "bench backward"
  timeout 300 python3 bench/bench_gpu_bwd.py --out "$OUT/gpu_backward${BENCH_TAG:-}.json" ${BENCH_BWD_ARGS:-} 2>&1 | tee "$OUT/bench_bwd${BENCH_TAG:-}.log" | tail -12
fi
if [[ $steps == *" gbench "* ]]; then
  log "gtest benches ${GBENCH_FILTER:-*AttentionFwdBench*}"
  timeout 300 ./build-tests/binformer_cuda_tests --gtest_also_run_disabled_tests \
      --gtest_filter="${GBENCH_FILTER:-*AttentionFwdBench*}" > "$OUT/gbench${BENCH_TAG:-}.log" 2>&1; log "gbench rc=$?"
  grep -E "^attention|^ *(fwd|bwd)|us" "$OUT/gbench${BENCH_TAG:-}.log" | head -40
fi
if [[ $steps == *" gbench_ab "* ]]; then
  for round in $(seq 1 ${GBENCH_ROUNDS:-2}); do
    for bin in /tmp/binformer_cuda_tests*; do
      [[ $bin == *.xz ]] && continue
      tag=$(basename "$bin"); tag=${tag#binformer_cuda_tests}; tag=${tag#_}; tag=${tag:-new}
      timeout 200 "$bin" --gtest_also_run_disabled_tests --gtest_filter="${GBENCH_FILTER:-*AttentionFwdBench*}" \
          > "$OUT/gbench_${tag}_$round.log" 2>&1; log "gbench $tag round $round rc=$?"
    done
  done
  # medians over the rounds per arm and shape, against GBENCH_BASE (default: the arm `main` if carried)
  python3 bench/gbench_table.py "$OUT" ${GBENCH_BASE:+--base "$GBENCH_BASE"} | tee "$OUT/gbench_table.txt"
fi
if [[ $steps == *" ab "* ]]; then
  log "baseline build (minimal + bench widths, CMAKE_CUDA_FLAGS=${BASE_FLAGS:-})"
  cmake -S . -B /tmp/build-base -G Ninja -DBINFORMER_BUILD_PYTHON=OFF -DBINFORMER_BUILD_TESTS=ON \
      -DBINFORMER_CUDA_ARCHS=90a -DBINFORMER_CUDA_MINIMAL=ON -DBINFORMER_CUDA_BENCH_WIDTHS=ON "-DCMAKE_CUDA_FLAGS=${BASE_FLAGS:-}" > "$OUT/build_base.log" 2>&1 &&
  cmake --build /tmp/build-base -j 16 --target binformer_cuda_tests >> "$OUT/build_base.log" 2>&1 || { log "BASE BUILD FAILED"; tail -30 "$OUT/build_base.log"; }
  timeout 300 /tmp/build-base/binformer_cuda_tests --gtest_also_run_disabled_tests \
      --gtest_filter="${GBENCH_FILTER:-*AttentionFwdBench*}" > "$OUT/gbench_base.log" 2>&1; log "gbench (baseline) rc=$?"
  grep -E "^attention|^ *(fwd|bwd)|us" "$OUT/gbench_base.log" | head -40
fi
if [[ $steps == *" ncu "* ]]; then
  # NCU_KERNEL / NCU_TARGET / NCU_ARGS / NCU_NAME pick another kernel or shape (e.g. the backward main pass:
  # NCU_KERNEL=regex:attention_bwd_tc NCU_TARGET=bench/ncu_target_bwd.py NCU_NAME=attention_bwd;
  # the forward on ViT-B with rel-pos: NCU_ARGS="vit_b16_224 relpos"). The report stays in /tmp.
  name=${NCU_NAME:-attention_fwd}
  log "ncu $name ${NCU_ARGS:-}"
  timeout 240 ncu --clock-control none --kernel-name "${NCU_KERNEL:-regex:attention_fwd}" --launch-skip ${NCU_SKIP:-2} \
      --launch-count 1 --set full --import-source yes -f -o "/tmp/ncu_$name" python3 "${NCU_TARGET:-bench/ncu_target.py}" \
      ${NCU_ARGS:-} > "$OUT/ncu_$name.log" 2>&1; log "ncu rc=$?"
  ncu --import "/tmp/ncu_$name.ncu-rep" --page details > "$OUT/ncu_${name}_details.txt" 2>&1
  grep -E "Duration|Throughput|Registers|Achieved Occupancy|Issue Slot|Warp Cycles|Stall" "$OUT/ncu_${name}_details.txt" | head -40
  # NCU_SOURCE=1: per-SASS-instruction counters (build with CMAKE_EXTRA=-DCMAKE_CUDA_FLAGS=-lineinfo).
  if [ -n "${NCU_SOURCE:-}" ]; then
    ncu --import "/tmp/ncu_$name.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip > "$OUT/ncu_${name}_sass.csv.gz"
  fi
  # Every raw metric of the report (pipe utilisation, stall reasons by name).
  ncu --import "/tmp/ncu_$name.ncu-rep" --page raw 2>&1 | gzip > "$OUT/ncu_${name}_raw.txt.gz"
fi
if [[ $steps == *" train "* ]]; then
  log "digits training on GPU"
  timeout 300 python3 examples/train_digits.py --out "$OUT/digits_training_gpu.json" 2>&1 | tail -8
fi
if [[ $steps == *" pytest "* ]]; then
  log "pytest (CUDA + CPU)"
  (cd tests && timeout 400 python3 -m pytest -q -x -p no:cacheprovider -n ${PYTEST_WORKERS:-8} python ${PYTEST_ARGS:-}) > "$OUT/pytest.log" 2>&1
  log "pytest rc=$?"; tail -25 "$OUT/pytest.log"
fi
if [[ $steps == *" pack "* ]]; then
  tgz="logs_$(date +%H%M%S).tgz"
  (cd "$OUT" && find . -maxdepth 3 -type f ! -name '*.json' ! -name '*.png' ! -name 'cycle.log' ! -name 'logs_*.tgz' \
      -print0 | tar czf "$tgz" --null -T - --remove-files) && log "packed the logs into $tgz"
fi
log "done"
