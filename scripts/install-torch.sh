#!/usr/bin/env bash
# Installs the Python side's test and example requirements (pinned torch, pytest, tqdm,
# matplotlib) from PyPI into a venv outside the repository, once; prints its python.
#
#   scripts/install-torch.sh          # into $THOR_TORCH_VENV (default ~/.cache/thor-kernels/torch)
#
# The CPU tests need no GPU; PyPI's Linux torch wheel brings its CUDA libraries along
# (about 5 GB installed), which the CUDA tests use where there is a GPU.
set -euo pipefail
venv="${THOR_TORCH_VENV:-$HOME/.cache/thor-kernels/torch}"
pins=(torch==2.15.0 pytest==9.2.0 tqdm==4.70.1 matplotlib==3.11.2)
echo "$("$(dirname "$0")/pinned-venv.sh" "$venv" "${pins[@]}")/bin/python"
