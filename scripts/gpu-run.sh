#!/usr/bin/env bash
# Runs the GPU bundle (built by scripts/gpu-bundle.sh) on a machine with a GPU and no Rust:
#   run.sh OUTDIR [--no-bench]
# Every test binary with THOR_REQUIRE_GPU=1 (GPU tests fail instead of skipping), the GPU
# benches in a short mode, the kernel example on the GPU, the Python bindings' tests where
# torch sees a GPU, then the GPU tests again under compute-sanitizer memcheck and racecheck
# (smaller batches, 4 minutes at most each). Logs go to OUTDIR; a summary table is printed last
# and written to OUTDIR/summary.txt.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: run.sh OUTDIR [--no-bench]}"
mkdir -p "$out"
bench=1
[ "${2:-}" = "--no-bench" ] && bench=0
export THOR_REQUIRE_GPU=1
# The architectures the bundle's kernels were built for (the build check reads them).
[ -f "$here/ARCHS" ] && export THOR_CUDA_ARCHS="$(cat "$here/ARCHS")"
# NVRTC for the run-time compile path, from the machine's CUDA toolkit when it has one.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export PATH="$PATH:/usr/local/cuda/bin"
# NCCL for the multi-GPU path's one-rank tests: the system's, or the one a PyTorch install
# brought (nvidia-nccl wheel: only libnccl.so.2, linked here as libnccl.so, the name the
# library loads); without it those tests say SKIPPED.
nccl_lib=$(python3 -c 'import glob, site; print(next(iter(glob.glob(site.getsitepackages()[0] + "/nvidia/nccl/lib/libnccl.so.2")), ""))' 2>/dev/null)
if [ -n "$nccl_lib" ]; then
  mkdir -p "$out/nccl" && ln -sf "$nccl_lib" "$out/nccl/libnccl.so"
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$out/nccl"
fi
summary="$out/summary.txt"
printf '%-34s %-6s %8s  %s\n' step status seconds notes > "$summary"

step() { # name log notes-command... ; runs the rest of the line
  local name="$1" log="$2"; shift 2
  local t0=$SECONDS
  "$@" > "$log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -ne 0 ] && status="FAIL($rc)"
  local notes
  notes=$(grep -hE '^test result|ERROR SUMMARY|RACECHECK SUMMARY|SKIPPED| passed| failed' "$log" | sort | uniq -c | sed 's/^ *//' | tr '\n' ';' | cut -c1-160)
  printf '%-34s %-6s %8d  %s\n' "$name" "$status" $((SECONDS - t0)) "$notes" >> "$summary"
}

{ nvidia-smi; echo; cat "$here/COMMIT"; } > "$out/device.txt" 2>&1
for t in "$here"/tests/*; do
  n=$(basename "$t")
  step "test $n" "$out/test-$n.log" "$t" --test-threads=1
done
if [ "$bench" = 1 ]; then
  export CRITERION_HOME="$out/criterion"
  step "bench gpu/ (short)" "$out/bench.log" "$here/benches/ops" --bench gpu/ --warm-up-time 0.5 --measurement-time 2 --noplot
  grep -E '^gpu/|time:' "$out/bench.log" | paste - - | awk '{$1=$1};1' > "$out/bench-table.txt"
fi
if python3 -c "import torch, pytest; assert torch.cuda.is_available()" 2>/dev/null; then
  export THOR_KERNELS_LIB="$here/python/libthor_kernels_capi.so" PYTHONPATH="$here/python"
  step "pytest bindings (torch, cuda)" "$out/pytest.log" python3 -m pytest -q "$here/python/tests" -p no:cacheprovider
  step "pytest cuda under memcheck" "$out/pytest-memcheck.log" \
    timeout 240 compute-sanitizer --tool memcheck --error-exitcode 99 python3 -m pytest -q "$here/python/tests" -k cuda -p no:cacheprovider
else
  echo "pytest: skipped (no python3 with torch, pytest and CUDA)" >> "$summary"
fi
step "example resnet50_ops cuda" "$out/example.log" "$here/examples/resnet50_ops" --backend cuda --batch 8
for prec in f32 tf32 bf16; do
  step "example resnet50_step $prec" "$out/step-$prec.log" "$here/examples/resnet50_step" --backend cuda --precision "$prec"
done
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    THOR_SANITIZER_QUICK=1 step "sanitizer $tool gpu" "$out/sanitizer-$tool.log" \
      timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 99 "$here/tests/gpu" --test-threads=1
  done
else
  echo "compute-sanitizer not found" >> "$summary"
fi
cat "$summary"
[ -f "$out/bench-table.txt" ] && { echo; cat "$out/bench-table.txt"; }
! grep -q FAIL "$summary"
