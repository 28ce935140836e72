# Source this file: points the build at the pinned nvcc and the run time at the pinned NVRTC.
#   source scripts/cuda-env.sh
# Uses $THOR_CUDA_VENV (default ~/.cache/thor-kernels/cuda-13.0), as installed by
# scripts/install-cuda.sh.
_thor_venv="${THOR_CUDA_VENV:-$HOME/.cache/thor-kernels/cuda-13.0}"
_thor_cu13="$(ls -d "$_thor_venv"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -n 1)"
if [ -z "$_thor_cu13" ]; then
  echo "cuda-env.sh: no pinned CUDA compiler under $_thor_venv (run scripts/install-cuda.sh)" >&2
  return 1 2>/dev/null || exit 1
fi
# The real binary, not a symlink: nvcc finds its siblings (cicc, ptxas) relative to itself.
export NVCC="$_thor_cu13/bin/nvcc"
export CUDA_HOME="$_thor_cu13"
export PATH="$_thor_cu13/bin:$PATH"
export LD_LIBRARY_PATH="$_thor_cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _thor_venv _thor_cu13
