#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler parts (nvcc, NVVM, CRT, runtime, CCCL, NVRTC) from
# PyPI into a Python venv outside the repository, once. Every part is pinned: a loose pin
# pulls newer parts whose PTX a CUDA 13.0 driver (580) refuses.
#
#   scripts/install-cuda.sh            # into $THOR_CUDA_VENV (default ~/.cache/thor-kernels/cuda-13.0)
#
# Prints the venv path. Source scripts/cuda-env.sh afterwards to use it.
set -euo pipefail
venv="${THOR_CUDA_VENV:-$HOME/.cache/thor-kernels/cuda-13.0}"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
)
exec "$(dirname "$0")/pinned-venv.sh" "$venv" "${pins[@]}"
