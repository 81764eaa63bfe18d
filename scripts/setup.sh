#!/usr/bin/env bash
# Installs what a fresh machine lacks and builds binformer against the installed torch.
# CPU machines: the CPU torch wheel. GPU machines keep the torch they have.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! [ -f /usr/include/gtest/gtest.h ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev >/dev/null
fi
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0          # this machine's local CPU wheel
fi
$PY -m pip install -q numpy pytest scikit-build-core pybind11 ninja matplotlib scikit-learn
$PY -c "import cutlass_library" 2>/dev/null || $PY -m pip install -q --no-deps nvidia-cutlass
$PY -m pip install -q --no-build-isolation --no-deps .
