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
// Asynchronous copies global -> shared (sm_80): 16 bytes per call, both addresses 16-byte
// aligned; `commit` closes the calls since the last one into a group; `wait<N>` waits until
// at most the N most recent groups are pending (then a __syncthreads makes the data visible
// to the other threads). The emulator (tests/emu) poisons the destination until the wait.
__device__ __forceinline__ void thor_cp_async16(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void thor_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void thor_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
// ldmatrix, one warp: four 8x8 matrices of 16-bit elements from shared memory; lane l gives
// the address of row l % 8 of matrix l / 8 (16-byte aligned) and receives in r[i] the
// elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i (the low half first),
// or with `_trans` the elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4): the mma
// fragment layouts of a row-major A and of a B stored row-major.
__device__ __forceinline__ void thor_ldmatrix_x4(unsigned* r, const void* row) {
    unsigned s = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void thor_ldmatrix_x4_trans(unsigned* r, const void* row) {
    unsigned s = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
#endif
