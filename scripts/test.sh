#!/usr/bin/env bash
# Runs every test: GoogleTest for the torch-free kernels, pytest for the ops.
# On a machine with a GPU the CUDA gtest binary is built and run too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
CUDA=OFF
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then CUDA=ON; fi
cmake -S . -B build-tests -G Ninja -DBINFORMER_BUILD_PYTHON=OFF -DBINFORMER_BUILD_TESTS=ON \
      -DBINFORMER_CUDA=$CUDA -DPython_EXECUTABLE="$(command -v $PY)" >/dev/null
targets=binformer_cpu_tests
[ "$CUDA" = ON ] && targets="$targets binformer_cuda_tests"
cmake --build build-tests -j "$JOBS" --target $targets
for isa in auto scalar; do
  echo "== gtest (CPU, BINFORMER_CPU_ISA=$isa)"
  BINFORMER_CPU_ISA=$isa ./build-tests/binformer_cpu_tests --gtest_brief=1
done
if [ "$CUDA" = ON ]; then
  echo "== gtest (CUDA)"
  ./build-tests/binformer_cuda_tests --gtest_brief=1
fi
echo "== pytest"
# Run from tests/ so that `import binformer` is the installed package, not python/.
cd tests && $PY -m pytest -q -p no:cacheprovider python "$@"
