// Shared device helpers. Included textually by every kernel module; the build inlines it
// into the embedded source so that NVRTC needs no include path for it.
#pragma once

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
