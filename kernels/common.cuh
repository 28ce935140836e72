// Shared device helpers. Included textually by every kernel module; the build inlines it
// into the embedded source so that NVRTC needs no include path for it.
#pragma once

// Dynamic shared memory of a kernel. A host emulation of the kernels (tests/emu) defines
// its own version before including a kernel source.
#ifndef THOR_DYNAMIC_SMEM
#define THOR_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

// A static shared array: `THOR_SHARED(float, tile, [T][T + 1])` declares
// `__shared__ float tile[T][T + 1]`. The host emulation defines its own version, which
// poisons the array at the start of every thread block as it does dynamic shared memory.
#ifndef THOR_SHARED
#define THOR_SHARED(type, name, dims) __shared__ type name dims
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

// 16-bit inputs as raw bits: the kernels need no cuda_fp16.h / cuda_bf16.h (so NVRTC needs
// no include path), only the conversions and tensor-core products below.
struct thor_f16 {
    unsigned short bits;
};
struct thor_bf16 {
    unsigned short bits;
};

#ifndef THOR_EMULATE
__device__ __forceinline__ float thor_half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float thor_bf16_to_float(unsigned short h) {
    return __uint_as_float(((unsigned)h) << 16);
}
// Round to TF32 (nearest, ties away from zero), as the tensor cores expect their operands.
__device__ __forceinline__ float thor_to_tf32(float v) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return __uint_as_float(r);
}
// d = a * b + c on the tensor cores, one warp: m16n8k8 (tf32) and m16n8k16 (f16, bf16),
// row-major A, column-major B, f32 accumulators; fragment layouts as in the PTX ISA.
__device__ __forceinline__ void thor_mma_tf32(float* d, const unsigned* a, const unsigned* b,
                                              const float* c) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void thor_mma_f16(float* d, const unsigned* a, const unsigned* b,
                                             const float* c) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void thor_mma_bf16(float* d, const unsigned* a, const unsigned* b,
                                              const float* c) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
#endif
