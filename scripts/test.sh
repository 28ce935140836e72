#!/usr/bin/env bash
# The test suite, from a fresh machine: installs the pinned CUDA compiler (once, cached
# outside the repository), builds the kernels with nvcc and checks the NVRTC path too,
# then runs every test. GPU tests skip, saying why, where there is no GPU.
#
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda.sh >/dev/null
# shellcheck source=cuda-env.sh
source scripts/cuda-env.sh
export THOR_REQUIRE_NVCC=1 THOR_REQUIRE_NVRTC=1 THOR_REQUIRE_CAPI=1
# The C-ABI test links a C program against the shared library, which `cargo test` alone
# does not build.
cargo build -p thor-kernels-capi
cargo test --workspace --all-targets "$@"
# Doc examples are not part of --all-targets.
cargo test --workspace --doc "$@"
# The Python package: wheel built and installed into the pinned torch venv, then pytest.
scripts/test-python.sh
