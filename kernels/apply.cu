// The preconditioner apply for every layer of a model in one launch:
//   dW_l = scale_l * blockdiag(G_l^-1) * grad_l * blockdiag(A_l^-1),
// grad_l [out, in] row-major (f32 or bf16), the inverse blocks b x b from the inversion
// (symmetric: G's are read by columns), the result f32, out of place or in place.
//
// One thread block per (layer, row block i, column block j, chunk of R rows of block i):
//   T   = Ginv_i[rows r0 .. r0 + R, :] * grad_ij     (R x b, kept in shared memory)
//   out = scale * T * Ainv_j                          (R x b, written to global)
// Both products are SIMT f32 with TM x TN outputs per thread, operands streamed through
// shared memory BK rows at a time. Edges where out or in is not a multiple of b are handled
// by masking: each inverse block is used cropped to its real rows and columns (its padding
// is the identity, so this equals the padded product), grad is never copied or padded.
// A layer without a G (or A) side applies only the side it has.
//
// In place (out == grad) needs R == b, so that one thread block reads all of grad_ij before
// it writes any of it: true for b <= 128; the host refuses in place at b = 256.
#include "common.cuh"

// One layer (64 bytes, built by the host).
struct ApplyLayer {
    unsigned long long grad;  // [out_dim, in_dim] row-major, f32 or bf16
    unsigned long long out;   // [out_dim, in_dim] row-major f32
    unsigned long long ginv;  // the layer's G inverse blocks (ceil(out_dim / b) of b x b), or 0
    unsigned long long ainv;  // the layer's A inverse blocks (ceil(in_dim / b)), or 0
    int out_dim;
    int in_dim;
    float scale;
    int pad[5];
};

#define APPLY_BK 16

template <typename In>
__device__ __forceinline__ float apply_load(const In* p);
template <>
__device__ __forceinline__ float apply_load<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float apply_load<thor_bf16>(const thor_bf16* p) {
    return thor_bf16_to_float(p->bits);
}

// A thread's TN operand values of row k of a B-wide chunk: the tile kernels (CF false) own
// columns tx TN .. tx TN + TN - 1, read one word at a time (lanes TN words apart: 4-way bank
// conflicts at TN = 8, 2-way at b = 64); the conflict-free kernels (CF true) own two runs of
// TN / 2, at tx TN / 2 and B / 2 + tx TN / 2, each one vector load (8 lanes of a phase read
// 128 contiguous bytes).
template <int B, int TN, bool CF>
__device__ __forceinline__ int apply_col(int tx, int q) {
    if (!CF) return tx * TN + q;
    constexpr int H = TN / 2;
    return q < H ? tx * H + q : B / 2 + tx * H + q - H;
}

template <int B, int TN, bool CF>
__device__ __forceinline__ void apply_row(const float* row, int tx, float* bv) {
#ifdef THOR_EMULATE
    if (CF && reinterpret_cast<unsigned long long>(row + tx * (TN / 2)) % (TN * 2) != 0)
        thor_emu::fail("apply: a misaligned vector load from shared memory");
#endif
    if constexpr (CF && TN == 8) {
        const float4 lo = *reinterpret_cast<const float4*>(row + tx * 4);
        const float4 hi = *reinterpret_cast<const float4*>(row + B / 2 + tx * 4);
        bv[0] = lo.x, bv[1] = lo.y, bv[2] = lo.z, bv[3] = lo.w;
        bv[4] = hi.x, bv[5] = hi.y, bv[6] = hi.z, bv[7] = hi.w;
    } else if constexpr (CF && TN == 4) {
        const float2 lo = *reinterpret_cast<const float2*>(row + tx * 2);
        const float2 hi = *reinterpret_cast<const float2*>(row + B / 2 + tx * 2);
        bv[0] = lo.x, bv[1] = lo.y, bv[2] = hi.x, bv[3] = hi.y;
    } else {
#pragma unroll
        for (int q = 0; q < TN; ++q) bv[q] = row[apply_col<B, TN, CF>(tx, q)];
    }
}

template <typename In, int B, int R, int TM, int TN, int NT, bool CF = false>
__device__ void apply_tile(const ApplyLayer* __restrict__ layers, const int* __restrict__ items) {
    constexpr int TX = B / TN, TY = R / TM;
    static_assert(TX * TY == NT, "thread count");
    static_assert(!CF || TN == 4 || TN == 8, "vector loads of TN / 2");
    // Row pitch of T: B + 4 (tile kernels; rows 8 apart share a bank at B = 128: 2-way
    // conflicts in phase 2's T reads), B + 1 (conflict-free kernels). Both keep the operand
    // chunks after T 16-byte aligned (R (B + 1) is a multiple of 4 at every R, B).
    constexpr int LDT = CF ? B + 1 : B + 4;
    THOR_DYNAMIC_SMEM(float, apply_smem);
    constexpr int PA = APPLY_BK * R / NT, PB = APPLY_BK * B / NT;  // per thread per chunk
    float* T = apply_smem;                    // R x LDT
    float* As = T + R * LDT;                  // 2 x APPLY_BK x R   (Ginv chunks, transposed)
    float* Bs = As + 2 * APPLY_BK * R;        // 2 x APPLY_BK x B   (grad or Ainv chunks)
    const int* it = items + 4 * (long long)blockIdx.x;
    const ApplyLayer L = layers[it[0]];
    const int i = it[1], j = it[2], r0 = it[3];
    const int wi = min(B, L.out_dim - i * B);  // real rows of block i
    const int wj = min(B, L.in_dim - j * B);   // real columns of block j
    const int rows = min(R, wi - r0);          // rows of this chunk
    const In* grad = reinterpret_cast<const In*>(L.grad);
    float* out = reinterpret_cast<float*>(L.out);
    const float* ginv = reinterpret_cast<const float*>(L.ginv);
    const float* ainv = reinterpret_cast<const float*>(L.ainv);
    const long long ld = L.in_dim;
    const long long grow0 = (long long)i * B, gcol0 = (long long)j * B;
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
    float acc[TM][TN];

    // Phase 1: T = Ginv_i[r0 .., :wi] * grad[i block, j block]  (or T = grad rows).
    if (ginv == nullptr) {
        for (int idx = tid; idx < R * B; idx += NT) {
            const int r = idx / B, c = idx % B;
            float v = 0.f;
            if (r < rows && c < wj) v = apply_load<In>(grad + (grow0 + r0 + r) * ld + gcol0 + c);
            T[r * LDT + c] = v;
        }
    } else {
        const float* g = ginv + (long long)i * B * B;
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
            for (int q = 0; q < TN; ++q) acc[a][q] = 0.f;
        // Double-buffered chunks: the next chunk's global loads are in registers while
        // this one is multiplied; one barrier per chunk.
        float pa[PA], pb[PB];
        auto fetch = [&](int k0) {
            // Ginv is symmetric (the inversion mirrors it bit for bit): its column k0 + k is
            // read as row k0 + k, coalesced, and stored transposed without bank conflicts.
#pragma unroll
            for (int e = 0; e < PA; ++e) {
                const int idx = tid + e * NT, k = idx / R, r = idx % R;
                pa[e] = (r < rows && k0 + k < wi) ? g[(long long)(k0 + k) * B + r0 + r] : 0.f;
            }
#pragma unroll
            for (int e = 0; e < PB; ++e) {
                const int idx = tid + e * NT, k = idx / B, c = idx % B;
                pb[e] = (k0 + k < wi && c < wj)
                            ? apply_load<In>(grad + (grow0 + k0 + k) * ld + gcol0 + c)
                            : 0.f;
            }
        };
        auto stash = [&](int st) {
#pragma unroll
            for (int e = 0; e < PA; ++e) As[st * APPLY_BK * R + tid + e * NT] = pa[e];
#pragma unroll
            for (int e = 0; e < PB; ++e) Bs[st * APPLY_BK * B + tid + e * NT] = pb[e];
        };
        fetch(0);
        stash(0);
        __syncthreads();
        int st = 0;
        for (int k0 = 0; k0 < wi; k0 += APPLY_BK, st ^= 1) {
            const bool more = k0 + APPLY_BK < wi;
            if (more) fetch(k0 + APPLY_BK);
            const float* as = As + st * APPLY_BK * R;
            const float* bs = Bs + st * APPLY_BK * B;
#pragma unroll 4
            for (int k = 0; k < APPLY_BK; ++k) {
                float av[TM], bv[TN];
#pragma unroll
                for (int a = 0; a < TM; ++a) av[a] = as[k * R + ty * TM + a];
                apply_row<B, TN, CF>(bs + k * B, tx, bv);
#pragma unroll
                for (int a = 0; a < TM; ++a)
#pragma unroll
                    for (int q = 0; q < TN; ++q) acc[a][q] = fmaf(av[a], bv[q], acc[a][q]);
            }
            if (more) stash(st ^ 1);
            __syncthreads();
        }
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
            for (int q = 0; q < TN; ++q)
                T[(ty * TM + a) * LDT + apply_col<B, TN, CF>(tx, q)] = acc[a][q];
    }
    __syncthreads();  // T complete; every read of grad by this block is done

    // Phase 2: out = scale * T[:, :wj] * Ainv_j[:wj, :wj]  (or scale * T).
    if (ainv == nullptr) {
        for (int idx = tid; idx < R * B; idx += NT) {
            const int r = idx / B, c = idx % B;
            if (r < rows && c < wj) out[(grow0 + r0 + r) * ld + gcol0 + c] = L.scale * T[r * LDT + c];
        }
        return;
    }
    const float* am = ainv + (long long)j * B * B;
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int q = 0; q < TN; ++q) acc[a][q] = 0.f;
    float pb2[PB];
    auto fetch2 = [&](int k0) {
#pragma unroll
        for (int e = 0; e < PB; ++e) {
            const int idx = tid + e * NT, k = idx / B, c = idx % B;
            pb2[e] = (k0 + k < wj && c < wj) ? am[(long long)(k0 + k) * B + c] : 0.f;
        }
    };
    auto stash2 = [&](int st) {
#pragma unroll
        for (int e = 0; e < PB; ++e) Bs[st * APPLY_BK * B + tid + e * NT] = pb2[e];
    };
    fetch2(0);
    stash2(0);
    __syncthreads();
    int st2 = 0;
    for (int k0 = 0; k0 < wj; k0 += APPLY_BK, st2 ^= 1) {
        const bool more = k0 + APPLY_BK < wj;
        if (more) fetch2(k0 + APPLY_BK);
        const float* bs = Bs + st2 * APPLY_BK * B;
#pragma unroll 4
        for (int k = 0; k < APPLY_BK; ++k) {
            float av[TM], bv[TN];
#pragma unroll
            for (int a = 0; a < TM; ++a) av[a] = T[(ty * TM + a) * LDT + k0 + k];
            apply_row<B, TN, CF>(bs + k * B, tx, bv);
#pragma unroll
            for (int a = 0; a < TM; ++a)
#pragma unroll
                for (int q = 0; q < TN; ++q) acc[a][q] = fmaf(av[a], bv[q], acc[a][q]);
        }
        if (more) stash2(st2 ^ 1);
        __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < TM; ++a) {
        const int r = ty * TM + a;
        if (r >= rows) continue;
#pragma unroll
        for (int q = 0; q < TN; ++q) {
            const int c = apply_col<B, TN, CF>(tx, q);
            if (c < wj) out[(grow0 + r0 + r) * ld + gcol0 + c] = L.scale * acc[a][q];
        }
    }
}

#define APPLY_KERNEL(NAME, IN, B, R, TM, TN, NT)                                     \
    extern "C" __global__ void __launch_bounds__(NT)                                \
        NAME(const ApplyLayer* layers, const int* items) {                          \
        apply_tile<IN, B, R, TM, TN, NT>(layers, items);                            \
    }

// (b, rows per thread block, outputs per thread, threads): see src/cuda/tuning.rs.
APPLY_KERNEL(apply_b32_f32, float, 32, 32, 4, 4, 64)
APPLY_KERNEL(apply_b64_f32, float, 64, 64, 4, 4, 256)
APPLY_KERNEL(apply_b128_f32, float, 128, 128, 8, 8, 256)
APPLY_KERNEL(apply_b256_f32, float, 256, 64, 8, 8, 256)
APPLY_KERNEL(apply_b32_bf16, thor_bf16, 32, 32, 4, 4, 64)
APPLY_KERNEL(apply_b64_bf16, thor_bf16, 64, 64, 4, 4, 256)
APPLY_KERNEL(apply_b128_bf16, thor_bf16, 128, 128, 8, 8, 256)
APPLY_KERNEL(apply_b256_bf16, thor_bf16, 256, 64, 8, 8, 256)

// Conflict-free kernels (vector operand loads, T pitch B + 1) for b = 64 and 128, one
// thread block per SM at b = 128 as the standard kernel (capping registers at 128 for two
// spilled 176-248 bytes).
#define APPLY_CF_KERNEL(NAME, IN, B, R, TM, TN, NT, MINB)                            \
    extern "C" __global__ void __launch_bounds__(NT, MINB)                          \
        NAME(const ApplyLayer* layers, const int* items) {                          \
        apply_tile<IN, B, R, TM, TN, NT, true>(layers, items);                      \
    }
APPLY_CF_KERNEL(apply_b64_f32_cf, float, 64, 64, 4, 4, 256, 1)
APPLY_CF_KERNEL(apply_b128_f32_cf, float, 128, 128, 8, 8, 256, 1)
APPLY_CF_KERNEL(apply_b64_bf16_cf, thor_bf16, 64, 64, 4, 4, 256, 1)
APPLY_CF_KERNEL(apply_b128_bf16_cf, thor_bf16, 128, 128, 8, 8, 256, 1)
