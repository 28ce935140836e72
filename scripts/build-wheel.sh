#!/usr/bin/env bash
# Builds the Python wheel (the package thor_kernels with the library inside) into dist/:
#
#   scripts/build-wheel.sh            # then: pip install dist/thor_kernels-*.whl
#
# The kernels are compiled with the pinned nvcc (installed once, outside the repository)
# and embedded; the wheel loads CUDA at run time, so the same wheel serves CPU-only and
# CUDA machines. Equivalent by hand: `pip wheel ./python -w dist --no-deps` (without nvcc
# on PATH the kernels are compiled at first use by NVRTC instead). THOR_PYTHON picks the
# Python whose pip builds it (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda.sh >/dev/null
# shellcheck source=cuda-env.sh
source scripts/cuda-env.sh
py="${THOR_PYTHON:-python3}"
rm -f dist/thor_kernels-*.whl
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps ./python -w dist
ls dist/thor_kernels-*.whl
