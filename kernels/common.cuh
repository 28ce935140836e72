// Shared device helpers. Included textually by every kernel module; the build inlines it
// into the embedded source so that NVRTC needs no include path for it.
#pragma once

// Dynamic shared memory of a kernel. A host emulation of the kernels (tests/emu) defines
// its own version before including a kernel source.
#ifndef THOR_DYNAMIC_SMEM
#define THOR_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

#define THOR_WARP 32
#define THOR_FULL_MASK 0xffffffffu

// Sum over the 32 lanes of a warp, the same on every lane; fixed butterfly order, so the
// result is deterministic.
template <typename T>
__device__ __forceinline__ T thor_warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(THOR_FULL_MASK, v, o);
    return v;
}
