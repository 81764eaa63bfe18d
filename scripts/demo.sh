#!/usr/bin/env bash
# Quickstart, command 1: set up (install + build) and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd bench && ${PYTHON:-python3} demo.py
