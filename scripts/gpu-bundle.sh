#!/usr/bin/env bash
# Builds release test, bench and example binaries with the kernels prebuilt by nvcc, and
# gathers them with scripts/gpu-run.sh into gpu-bundle/ (ignored by git, kept under 60 MiB),
# for a machine with a GPU and no Rust:
#
#   scripts/gpu-bundle.sh            # -> gpu-bundle/
#   (on the GPU machine) gpu-bundle/run.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda.sh >/dev/null
# shellcheck source=cuda-env.sh
source scripts/cuda-env.sh
export THOR_REQUIRE_NVCC=1
# SASS for the device machine's cards only (H100 / H200: sm_90; PTX of it is embedded too):
# every binary carries the kernels, and two architectures put the bundle over its limit.
export THOR_CUDA_ARCHS="${THOR_CUDA_ARCHS:-90}"
out=gpu-bundle
rm -rf "$out"
mkdir -p "$out/tests" "$out/benches" "$out/examples"

executables() { # cargo args... -> paths of the executables built
  cargo "$@" --message-format=json |
    python3 -c 'import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except ValueError: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable"):
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])'
}

echo "building tests ..." >&2
# Tests that touch the GPU or its driver and read nothing from the repository. The CPU-only
# tests (cpu, bad_input, reference, alloc, emulated), the C-ABI program and the dataset and
# training-example tests run in CI on every landing instead; leaving them out keeps the
# bundle under the device machine's 60 MiB.
gpu_tests=" unit gpu capi_gpu build_paths thor "
executables test --workspace --release --no-run --tests --lib | while read -r kind name exe; do
  case "$kind" in lib | rlib) name=unit ;; esac
  case "$gpu_tests" in *" $name "*) cp "$exe" "$out/tests/$name" ;; esac
done
echo "building benches ..." >&2
executables bench --no-run | while read -r kind name exe; do
  if [ "$kind" = bench ]; then cp "$exe" "$out/benches/$name"; fi
done
echo "building examples ..." >&2
executables build --release --example resnet50_ops --example resnet50_step | while read -r kind name exe; do
  if [ "$kind" = example ]; then cp "$exe" "$out/examples/$name"; fi
done
echo "building the shared library for the Python bindings ..." >&2
cargo build --release -p thor-kernels-capi 2>/dev/null
mkdir -p "$out/python/thor_kernels" "$out/python/tests"
cp target/release/libthor_kernels_capi.so "$out/python/"
cp python/thor_kernels/*.py "$out/python/thor_kernels/"
cp python/tests/*.py "$out/python/tests/"
strip --strip-all "$out"/tests/* "$out"/benches/* "$out"/examples/*
strip --strip-debug "$out"/python/*.so
cp scripts/gpu-run.sh "$out/run.sh"
chmod +x "$out/run.sh"
git rev-parse --short HEAD > "$out/COMMIT" 2>/dev/null || echo unknown > "$out/COMMIT"
echo "$THOR_CUDA_ARCHS" > "$out/ARCHS"
size=$(du -sm "$out" | cut -f1)
ls -la "$out"/tests "$out"/benches "$out"/examples >&2
if [ "$size" -ge 60 ]; then
  echo "gpu-bundle is ${size} MiB, over the 60 MiB limit" >&2
  exit 1
fi
echo "gpu-bundle: ${size} MiB, commit $(cat "$out/COMMIT")" >&2
