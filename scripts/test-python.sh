#!/usr/bin/env bash
# The PyTorch bindings' tests: builds the shared library, then runs pytest on python/ with a
# Python that has torch (THOR_PYTHON, default python3). CUDA cases run where torch sees a GPU.
#   scripts/test-python.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${THOR_PYTHON:-python3}"
if ! "$py" -c "import torch, pytest" 2>/dev/null; then
  echo "$py has no torch or pytest: set THOR_PYTHON to a Python with both" >&2
  exit 2
fi
cargo build --release -p thor-kernels-capi
cd python
exec "$py" -m pytest -q "$@"
