// A host emulation of the CUDA execution model, for testing the kernels in `kernels/` on
// machines without a GPU. Each translation unit includes this header, then one kernel
// source, then registers that source's kernels with THOR_EMU_REGISTER.
//
// Every CUDA thread of a thread block is a cooperatively scheduled fiber on one host thread.
// A fiber runs until it reaches a barrier (__syncthreads, or a warp-collective operation);
// when every live thread of the block (or of the warp) has arrived, they are released. The
// order in which fibers run between barriers is chosen per launch (forward, reverse, or a
// seeded shuffle), so a missing barrier shows up as a wrong answer under some order.
// A barrier that not every live thread reaches (divergent __syncthreads, a shuffle in
// divergent code) is reported as an error instead of hanging.
//
// What it does not model: memory races inside one barrier interval beyond the orders above,
// out-of-bounds accesses (the tests guard their buffers), timing, and the exact rounding of
// tensor-core accumulation (emulated in f32, in k order).
#pragma once

#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
// CUDA's vector types, with their alignment (a vector load from a misaligned address is a
// fault on the GPU; the kernels that use them assert their offsets' alignment).
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

#define THOR_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared arrays are function-local statics (one thread block runs at a time), filled
// with NaN by the first thread of each thread block that reaches the declaration, as a
// thread block finds dynamic shared memory: a read before a write sees poison, never the
// previous block's data.
#define __shared__ static
#define THOR_SHARED(type, name, dims) \
    static type name dims;            \
    thor_emu::fresh_shared(name, sizeof(name))
#define THOR_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(thor_emu::dynamic_smem())

namespace thor_emu {
void* dynamic_smem();
// Poisons a static shared array once per thread block (the first caller in each block).
void fresh_shared(void* p, size_t bytes);
void sync_block();
void sync_warp();
int lane();
int warp();
// Per-warp scratch of 32 slots of 8 bytes, for exchanges between lanes.
unsigned char* warp_slots();
unsigned char* warp_scratch(size_t bytes);
void fail(const char* what);

template <typename T>
T exchange(T v, int src) {
    static_assert(sizeof(T) <= 8, "8-byte shuffles at most");
    unsigned char* s = warp_slots();
    std::memcpy(s + 8 * lane(), &v, sizeof(T));
    sync_warp();
    T r;
    std::memcpy(&r, s + 8 * (src & 31), sizeof(T));
    sync_warp();
    return r;
}
}  // namespace thor_emu

inline void __syncthreads() { thor_emu::sync_block(); }
namespace thor_emu {
int sync_block_or(int pred);
}
inline int __syncthreads_or(int pred) { return thor_emu::sync_block_or(pred); }
inline void __syncwarp(unsigned = 0xffffffffu) { thor_emu::sync_warp(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int m) {
    return thor_emu::exchange(v, thor_emu::lane() ^ m);
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
    return thor_emu::exchange(v, src);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta) {
    const int l = thor_emu::lane();
    const int src = l + (int)delta < 32 ? l + (int)delta : l;
    return thor_emu::exchange(v, src);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned char* s = thor_emu::warp_slots();
    s[8 * thor_emu::lane()] = pred ? 1 : 0;
    thor_emu::sync_warp();
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= (unsigned)(s[8 * i] == 1) << i;
    thor_emu::sync_warp();
    return r;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }

inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline int __float_as_int(float v) {
    int i;
    std::memcpy(&i, &v, 4);
    return i;
}
inline float __uint_as_float(unsigned v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline unsigned __float_as_uint(float v) {
    unsigned i;
    std::memcpy(&i, &v, 4);
    return i;
}
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
using std::fabs;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
using std::sqrt;

template <typename T>
T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
    unsigned old = *p;
    *p = old | v;
    return old;
}
inline int atomicOr(int* p, int v) {
    int old = *p;
    *p = old | v;
    return old;
}

// Conversions the kernels take from PTX on the device (see kernels/common.cuh).
inline float thor_half_to_float(unsigned short h) {
    const unsigned s = (unsigned)(h >> 15) << 31;
    const int e = (h >> 10) & 0x1f;
    unsigned m = h & 0x3ff;
    unsigned bits;
    if (e == 0x1f) {
        bits = s | 0x7f800000u | (m << 13);
    } else if (e == 0) {
        if (m == 0) {
            bits = s;
        } else {
            // Subnormal: value m * 2^-24.
            const float v = std::ldexp((float)m, -24);
            return s ? -v : v;
        }
    } else {
        bits = s | ((unsigned)(e - 15 + 127) << 23) | (m << 13);
    }
    return __uint_as_float(bits);
}
inline float thor_bf16_to_float(unsigned short h) { return __uint_as_float((unsigned)h << 16); }
// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits.
inline float thor_to_tf32(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7f800000u) == 0x7f800000u) return v;
    u += 0x1000u;
    u &= 0xffffe000u;
    return __uint_as_float(u);
}

// Warp-collective tensor-core products, fragment layouts as PTX mma.sync documents them
// (g = lane / 4, t = lane % 4). Emulated from the gathered fragments of the 32 lanes.
namespace thor_emu {
struct MmaLanes {
    unsigned a[32][4];
    unsigned b[32][2];
    float c[32][4];
};
void mma_m16n8k8_tf32(float* d, const unsigned* a, const unsigned* b, const float* c);
void mma_m16n8k16_f16(float* d, const unsigned* a, const unsigned* b, const float* c);
void mma_m16n8k16_bf16(float* d, const unsigned* a, const unsigned* b, const float* c);
}  // namespace thor_emu

inline void thor_mma_tf32(float* d, const unsigned* a, const unsigned* b, const float* c) {
    thor_emu::mma_m16n8k8_tf32(d, a, b, c);
}
inline void thor_mma_f16(float* d, const unsigned* a, const unsigned* b, const float* c) {
    thor_emu::mma_m16n8k16_f16(d, a, b, c);
}
inline void thor_mma_bf16(float* d, const unsigned* a, const unsigned* b, const float* c) {
    thor_emu::mma_m16n8k16_bf16(d, a, b, c);
}

// cp.async and ldmatrix (kernels/common.cuh documents them). A copy lands at the issuing
// thread's wait for its group (its destination holds NaN poison until then; a thread that
// ends with copies not waited for is an error); ldmatrix is a warp collective that checks
// every row address is 16-byte aligned.
namespace thor_emu {
void cp_async16(void* dst, const void* src);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(unsigned* r, const void* row, bool trans);
}  // namespace thor_emu

inline void thor_cp_async16(void* smem, const void* gmem) { thor_emu::cp_async16(smem, gmem); }
inline void thor_cp_async_commit() { thor_emu::cp_async_commit(); }
template <int N>
inline void thor_cp_async_wait() {
    thor_emu::cp_async_wait(N);
}
inline void thor_ldmatrix_x4(unsigned* r, const void* row) { thor_emu::ldmatrix_x4(r, row, false); }
inline void thor_ldmatrix_x4_trans(unsigned* r, const void* row) { thor_emu::ldmatrix_x4(r, row, true); }

// Registration: each kernel gets a trampoline that unpacks a cuLaunchKernel-style argument
// array (one pointer per argument) into a typed call.
namespace thor_emu {
using Trampoline = void (*)(void* fn, void** args);
void register_kernel(const char* name, void* fn, Trampoline t);

template <typename... A, size_t... I>
void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <typename... A>
void trampoline_for(void* fn, void** args) {
    auto f = reinterpret_cast<void (*)(A...)>(fn);
    call_with(f, args, std::index_sequence_for<A...>{});
}
template <typename... A>
Trampoline make_trampoline(void (*)(A...)) {
    return &trampoline_for<A...>;
}
struct Registrar {
    template <typename F>
    Registrar(const char* name, F* f) {
        register_kernel(name, reinterpret_cast<void*>(f), make_trampoline(f));
    }
};
}  // namespace thor_emu

#define THOR_EMU_REGISTER(k) static thor_emu::Registrar thor_emu_reg_##k(#k, &k);
