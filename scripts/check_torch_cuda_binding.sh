#!/usr/bin/env bash
# Syntax check of the torch binding's CUDA impls (cpp/torch/cuda/*.cpp) where no CUDA torch is
# installed (CI, the build machines): they are compiled only by the device build otherwise, so a
# slip there would first show on the GPU machine. Uses the installed (CPU) torch's headers; the
# one generated header a CPU wheel lacks (c10/cuda/impl/cuda_cmake_macros.h) is stubbed.
set -euo pipefail
cd "$(dirname "$0")/.."
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo "#pragma once" > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
# The toolkit's own include folder, as nvcc reports it (nvcc may be a wrapper script on PATH).
cuda_inc=$(nvcc --dryrun -x cu -c /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1 | xargs)
torch_inc=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
for f in cpp/torch/cuda/*.cpp; do
  # (C++17 as CMakeLists.txt; recent torch headers warn about C++20 extensions there)
  # shellcheck disable=SC2086
  g++ -std=c++17 -fsyntax-only -Wno-c++20-extensions -DBINFORMER_WITH_CUDA=1 -I"$stub" $torch_inc -I"$cuda_inc" \
      -Icpp/include -Icuda/include "$f"
  echo "syntax ok: $f"
done
