// THOR's factor step across ranks on the device (src/cuda/dist.rs): the kernels between the
// collectives. Each rank accumulates its local products (alpha 1, beta 0) into a buffer of
// its own; `dist_pack_f32` packs them as lower triangles, rank by rank, for a reduce-scatter
// that delivers each block's sum to its owner; `dist_meta_f32` writes what every rank needs
// to decide (per factor: a non-finite flag and the samples; per block, from its owner: the
// traces of the old statistics and of the new sum; the damping and the step count), summed
// by an all-reduce; `dist_resolve_f32` turns the sums into the statuses and traces the trace
// rule reads, the same on every rank; `dist_ema_f32` applies the EMA to the owned blocks;
// after the rule, `dist_own_mask_f32` keeps the updated blocks this rank owns for the
// inversion; `dist_pack_f32` packs the owned inverses with their info words for an
// all-gather, and `dist_unpack_f32` writes the updated blocks' inverses everywhere.
//
// Tables (uploaded once, src/cuda/dist.rs):
//   blocks_tab, 4 ints per block k of the set: factor, valid rows (the rest is padding),
//     owner, position in its owner's list.
//   factors_tab, 3 ints per factor: first block, block count, partner factor (-1: none).
//   meta, doubles: flags[nf] samples[nf] tr_old[nb] tr_sum[nb] damping steps plan, the last
//     three the values every rank checks (plan: the block ownership's fingerprint).
// Statuses as the accumulation's: 0 updated, 1 not finite, 2 partner not finite, 3 frozen.
#include "common.cuh"

#define DIST_HAS_STATS 1  // as ACC_HAS_STATS in accumulate.cu
#define DIST_FROZEN 2     // as ACC_FROZEN

// Double products and sums exactly as written (never fused): every rank, and the CPU step,
// compute the same traces from the same sums.
#ifndef THOR_EMULATE
__device__ __forceinline__ double dist_dmul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double dist_dadd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float dist_fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float dist_fadd(float a, float b) { return __fadd_rn(a, b); }
#else
inline double dist_dmul(double a, double b) { return a * b; }
inline double dist_dadd(double a, double b) { return a + b; }
inline float dist_fmul(float a, float b) { return a * b; }
inline float dist_fadd(float a, float b) { return a + b; }
#endif

// Element t of a packed lower triangle is (r, c): t = r (r + 1) / 2 + c, c <= r. The
// threads of a block walk the triangle flat (every thread busy on every row).
__device__ __forceinline__ void dist_tri_rc(int t, int* r, int* c) {
    int q = (int)((sqrtf(8.f * (float)t + 1.f) - 1.f) * 0.5f);
    while (q * (q + 1) / 2 > t) --q;
    while ((q + 1) * (q + 2) / 2 <= t) ++q;
    *r = q;
    *c = t - q * (q + 1) / 2;
}

// Segment i of `out` (`stride` floats apart, stride >= b (b + 1) / 2) holds the lower
// triangle of block list[i] of `blocks`, row by row ((0,0), (1,0), (1,1), (2,0), ...); a
// negative list[i] is padding: zeros. When stride > b (b + 1) / 2, the element after the
// triangle holds info[list[i]] as a float (0 for padding, or when `info` is null). Grid: one thread block per
// segment.
extern "C" __global__ void __launch_bounds__(256)
dist_pack_f32(const float* __restrict__ blocks, int b, const int* __restrict__ list,
              const int* __restrict__ info, int stride, float* __restrict__ out) {
    const int k = list[blockIdx.x];
    float* o = out + (long long)blockIdx.x * stride;
    const int tri = b * (b + 1) / 2;
    if (k < 0) {
        for (int t = threadIdx.x; t < stride; t += blockDim.x) o[t] = 0.f;
        return;
    }
    const float* s = blocks + (long long)k * b * b;
    for (int t = threadIdx.x; t < tri; t += blockDim.x) {
        int r, c;
        dist_tri_rc(t, &r, &c);
        o[t] = s[r * b + c];
    }
    if (threadIdx.x == 0 && stride > tri) o[tri] = info != nullptr ? (float)info[k] : 0.f;
}

// The inverse of dist_pack_f32 for the segments whose block is set in `mask` (every block
// when null): the full symmetric block (the upper triangle mirrored bit for bit) and, with
// `info` non-null, its info word. Grid: one thread block per segment.
extern "C" __global__ void __launch_bounds__(256)
dist_unpack_f32(const float* __restrict__ in, int b, const int* __restrict__ list, int stride,
                const unsigned char* __restrict__ mask, float* __restrict__ blocks,
                int* __restrict__ info) {
    const int k = list[blockIdx.x];
    if (k < 0 || (mask != nullptr && mask[k] == 0)) return;
    const float* p = in + (long long)blockIdx.x * stride;
    float* s = blocks + (long long)k * b * b;
    for (int t = threadIdx.x; t < b * (b + 1) / 2; t += blockDim.x) {
        int r, c;
        dist_tri_rc(t, &r, &c);
        const float v = p[t];
        s[r * b + c] = v;
        s[c * b + r] = v;
    }
    if (threadIdx.x == 0 && info != nullptr) info[k] = (int)p[b * (b + 1) / 2];
}

// This rank's part of the metadata (summed over the ranks by an all-reduce): per factor
// the flag status == 1 and the samples of its local input; per block this rank owns, the
// trace of its statistics and (unless its factor is frozen) of the received sum (segment
// `position` of `recv`, a packed lower triangle), in double, row by row; the other blocks
// 0; the damping (from `damping_at`), the steps run (`step`, the rule's counter) and the
// plan's fingerprint.
// Grid: a thread per block of the set (nb >= nf).
extern "C" __global__ void __launch_bounds__(256)
dist_meta_f32(const int* __restrict__ status, const double* __restrict__ samples, int nf,
              const int* __restrict__ blocks_tab, int nb, int rank, int b,
              const unsigned char* __restrict__ fstate, const float* __restrict__ stats,
              const float* __restrict__ recv, const float* __restrict__ damping_at,
              const unsigned long long* __restrict__ step, double plan,
              double* __restrict__ meta) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < nf) {
        meta[k] = status[k] == 1 ? 1.0 : 0.0;
        meta[nf + k] = samples[k];
    }
    if (k == 0) {
        meta[2 * nf + 2 * nb] = (double)*damping_at;
        meta[2 * nf + 2 * nb + 1] = (double)*step;
        meta[2 * nf + 2 * nb + 2] = plan;
    }
    if (k >= nb) return;
    const int* t = blocks_tab + 4 * k;
    double old = 0.0, sum = 0.0;
    if (t[2] == rank) {
        const float* s = stats + (long long)k * b * b;
        for (int r = 0; r < t[1]; ++r) old += (double)s[r * b + r];
        if (!(fstate[t[0]] & DIST_FROZEN)) {
            const float* p = recv + (long long)t[3] * (b * (b + 1) / 2);
            for (int r = 0; r < t[1]; ++r) sum += (double)p[r * (r + 1) / 2 + r];
        }
    }
    meta[2 * nf + k] = old;
    meta[2 * nf + nb + k] = sum;
}

// The EMA's scales of factor f from the summed samples: the first accepted statistics
// replace the initial ones.
__device__ __forceinline__ void dist_scales(const double* meta, int nf, int f,
                                            const unsigned char* fstate, float decay,
                                            float* alpha, float* beta) {
    const float n = (float)meta[nf + f];
    if (fstate[f] & DIST_HAS_STATS) {
        *alpha = (1.f - decay) / n;
        *beta = decay;
    } else {
        *alpha = 1.f / n;
        *beta = 0.f;
    }
}

// From the summed metadata, the same on every rank: each factor's status (frozen 3, a
// non-finite input on any rank 1, its partner's 2, else 0), each block's trace after the EMA
// (plus its padding) and each factor's trace (as the single-rank step's accumulation
// writes them; a factor whose statistics stay keeps its old trace). When the ranks' damping,
// step count or block ownership differ (the sums are not `world` times this rank's), every factor reads as
// not finite, so that no layer changes, and `fault` is set (read by the host). One thread
// block.
extern "C" __global__ void __launch_bounds__(256)
dist_resolve_f32(const double* __restrict__ meta, int nf, int nb,
                 const int* __restrict__ factors_tab, const int* __restrict__ blocks_tab, int b,
                 const unsigned char* __restrict__ fstate, float decay, int world,
                 const float* __restrict__ damping_at, const unsigned long long* __restrict__ step,
                 double plan, int* __restrict__ status, float* __restrict__ block_traces,
                 float* __restrict__ factor_traces, int* __restrict__ fault) {
    const double* checks = meta + 2 * nf + 2 * nb;
    const bool agree = checks[0] == (double)*damping_at * world &&
                       checks[1] == (double)*step * world && checks[2] == plan * world;
    if (threadIdx.x == 0 && !agree) *fault = 1;
    for (int f = threadIdx.x; f < nf; f += blockDim.x) {
        status[f] = !agree ? 1 : (fstate[f] & DIST_FROZEN) ? 3 : meta[f] > 0.0 ? 1 : 0;
    }
    __syncthreads();
    // A partner's 1 is final: a status that turns from 0 to 2 here is never read as 1.
    for (int f = threadIdx.x; f < nf; f += blockDim.x) {
        const int p = factors_tab[3 * f + 2];
        if (status[f] == 0 && p >= 0 && status[p] == 1) status[f] = 2;
    }
    __syncthreads();
    const double* tr_old = meta + 2 * nf;
    const double* tr_sum = meta + 2 * nf + nb;
    for (int f = threadIdx.x; f < nf; f += blockDim.x) {
        float alpha, beta;
        dist_scales(meta, nf, f, fstate, decay, &alpha, &beta);
        const int first = factors_tab[3 * f], count = factors_tab[3 * f + 1];
        double total = 0.0;
        for (int k = first; k < first + count; ++k) {
            double t;
            if (status[f] == 0) {
                // As the EMA: with beta 0 the old statistics are not read.
                const double old = beta == 0.f ? 0.0 : dist_dmul((double)beta, tr_old[k]);
                t = dist_dadd(old, dist_dmul((double)alpha, tr_sum[k]));
            } else {
                t = tr_old[k];
            }
            block_traces[k] = (float)dist_dadd(t, (double)(b - blocks_tab[4 * k + 1]));
            total = dist_dadd(total, t);
        }
        factor_traces[f] = (float)total;
    }
}

// The EMA of the blocks this rank owns whose factor's status is 0: the lower triangle
// from the received sum (segment i of `recv` for block list[i]), the upper mirrored, rows
// and columns past the factor's dimension as the identity. Grid: one thread block per
// owned block (negative entries are padding).
extern "C" __global__ void __launch_bounds__(256)
dist_ema_f32(const float* __restrict__ recv, const int* __restrict__ list,
             const int* __restrict__ blocks_tab, const int* __restrict__ status,
             const unsigned char* __restrict__ fstate, const double* __restrict__ meta, int nf,
             float decay, int b, float* __restrict__ stats) {
    const int k = list[blockIdx.x];
    if (k < 0) return;
    const int f = blocks_tab[4 * k], w = blocks_tab[4 * k + 1];
    if (status[f] != 0) return;  // the same for the whole block: no barrier is skipped
    float alpha, beta;
    dist_scales(meta, nf, f, fstate, decay, &alpha, &beta);
    const float* p = recv + (long long)blockIdx.x * (b * (b + 1) / 2);
    float* s = stats + (long long)k * b * b;
    for (int t = threadIdx.x; t < b * (b + 1) / 2; t += blockDim.x) {
        int r, c;
        dist_tri_rc(t, &r, &c);
        // beta s + alpha sum, unfused, as the CPU step computes it.
        const float v = dist_fmul(alpha, p[t]);
        s[r * b + c] = beta != 0.f ? dist_fadd(dist_fmul(beta, s[r * b + c]), v) : v;
    }
    __syncthreads();
    // The mirror reads rows below w only; the padding rows (w and up) are written only here.
    for (int r = 0; r < b; ++r) {
        for (int c = threadIdx.x; c < b; c += blockDim.x) {
            if (c > r) {
                s[r * b + c] = c < w ? s[c * b + r] : 0.f;
            } else if (r >= w) {
                s[r * b + c] = c == r ? 1.f : 0.f;
            }
        }
    }
}

// After the rule: `own` = the rule's mask on the blocks this rank owns, 0 elsewhere (the
// inversion's mask). A thread per block.
extern "C" __global__ void __launch_bounds__(256)
dist_own_mask_f32(const unsigned char* __restrict__ mask, const int* __restrict__ blocks_tab,
                  int nb, int rank, unsigned char* __restrict__ own) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < nb) own[k] = blocks_tab[4 * k + 2] == rank ? mask[k] : 0;
}
