// Batched damped Cholesky inversion: for every b x b block j,
//   X_j = (S_j + l_j I)^-1  through  S + l I = L L^T,  L^-1,  L^-T L^-1,
// one thread block per matrix, the matrix resident in shared memory as a packed lower
// triangle (b(b+1)/2 floats: 33 KB at b = 128, 129 KB at b = 256, so b = 256 also stays on
// chip on sm_80 / sm_90 with the large-shared-memory opt-in).
//
// Reads the lower triangle of each input block only. Writes the full symmetric inverse:
// each lower entry is computed once and stored to both (r, c) and (c, r), bit for bit.
//
// info[j]: 0 on success, the LAPACK-style 1-based pivot that was not positive and finite
// (non-SPD, NaN or Inf input), -1 when the mask skipped the block, -2 when the block's
// damping was negative or not finite. A block that fails keeps its output as it was.
// With max_retries > 0 a failed block is refactored with damping max(l, floor) * factor, up
// to max_retries times; damping_used[j] receives the damping of the last attempt.
#include "common.cuh"

#define INFO_SKIPPED (-1)
#define INFO_BAD_DAMPING (-2)

__device__ __forceinline__ int tri(int i) { return (i * (i + 1)) >> 1; }

__device__ __forceinline__ bool positive_finite(float v) {
    return v > 0.f && v < __int_as_float(0x7f800000);
}

// Right-looking Cholesky of the packed lower triangle `a` in place. `col` holds the scaled
// column of the current step. Returns 0, or the 1-based pivot that failed (the same value on
// every thread: each reads the pivot from shared memory after the same barrier).
template <int B, int T>
__device__ int chol_packed(float* a, float* col) {
    constexpr int W = T / THOR_WARP;
    const int warp = threadIdx.x / THOR_WARP, lane = threadIdx.x % THOR_WARP;
    for (int j = 0; j < B; ++j) {
        const float d = a[tri(j) + j];
        if (!positive_finite(d)) return j + 1;
        const float ljj = sqrtf(d);
        for (int i = j + 1 + threadIdx.x; i < B; i += T) {
            const float v = a[tri(i) + j] / ljj;
            a[tri(i) + j] = v;
            col[i] = v;
        }
        __syncthreads();
        if (threadIdx.x == 0) a[tri(j) + j] = ljj;
        // Trailing update of the lower triangle: warp per row, lanes along the row.
        for (int i = j + 1 + warp; i < B; i += W) {
            const float li = col[i];
            float* row = a + tri(i);
            for (int k = j + 1 + lane; k <= i; k += THOR_WARP) row[k] -= li * col[k];
        }
        __syncthreads();
    }
    return 0;
}

// In-place inverse of the packed lower-triangular L (LAPACK trti2 order, last column
// first): column j of L^-1 is -(1 / l_jj) * T^-1 * L(j+1:, j), T^-1 the already inverted
// trailing block.
template <int B, int T>
__device__ void trtri_packed(float* a, float* col) {
    constexpr int W = T / THOR_WARP;
    const int warp = threadIdx.x / THOR_WARP, lane = threadIdx.x % THOR_WARP;
    for (int j = B - 1; j >= 0; --j) {
        const float inv = 1.f / a[tri(j) + j];
        for (int i = j + 1 + threadIdx.x; i < B; i += T) col[i] = a[tri(i) + j];
        __syncthreads();
        for (int i = j + 1 + warp; i < B; i += W) {
            const float* row = a + tri(i);
            float s = 0.f;
            for (int k = j + 1 + lane; k <= i; k += THOR_WARP) s += row[k] * col[k];
            s = thor_warp_sum(s);
            if (lane == 0) a[tri(i) + j] = -inv * s;
        }
        if (threadIdx.x == 0) a[tri(j) + j] = inv;
        __syncthreads();
    }
}

// X = L^-T L^-1 from the packed L^-1: X(r, c) = sum_{k >= r} Linv(k, r) Linv(k, c), r >= c,
// stored to out(r, c) and out(c, r). Warp per row r, lanes along c (conflict-free reads of
// Linv(k, c), broadcast of Linv(k, r), coalesced stores of row r).
template <int B, int T>
__device__ void lauum_store(const float* a, float* out) {
    constexpr int W = T / THOR_WARP;
    const int warp = threadIdx.x / THOR_WARP, lane = threadIdx.x % THOR_WARP;
    for (int r = warp; r < B; r += W) {
        for (int c = lane; c <= r; c += THOR_WARP) {
            float s = 0.f;
            for (int k = r; k < B; ++k) s += a[tri(k) + r] * a[tri(k) + c];
            out[(long long)r * B + c] = s;
            out[(long long)c * B + r] = s;
        }
    }
}

template <int B, int T>
__device__ void invert_chol(const float* in, float* out, int nblocks, const float* damping,
                            float damping_all, const unsigned char* mask, int max_retries,
                            float retry_factor, float retry_floor, int* info,
                            float* damping_used) {
    THOR_DYNAMIC_SMEM(float, thor_smem);
    float* a = thor_smem;               // B(B+1)/2 packed lower triangle
    float* col = thor_smem + tri(B);    // B
    const int blk = blockIdx.x;
    if (blk >= nblocks) return;
    if (mask != nullptr && mask[blk] == 0) {
        if (threadIdx.x == 0) info[blk] = INFO_SKIPPED;
        return;
    }
    float lam = damping != nullptr ? damping[blk] : damping_all;
    if (!(lam >= 0.f && lam < __int_as_float(0x7f800000))) {
        if (threadIdx.x == 0) info[blk] = INFO_BAD_DAMPING;
        return;
    }
    const float* src = in + (long long)blk * B * B;
    int fail = 0;
    for (int attempt = 0;; ++attempt) {
        for (int idx = threadIdx.x; idx < B * B; idx += T) {
            const int i = idx / B, k = idx - i * B;
            if (k <= i) a[tri(i) + k] = src[idx] + (i == k ? lam : 0.f);
        }
        __syncthreads();
        fail = chol_packed<B, T>(a, col);
        if (fail == 0 || attempt >= max_retries) break;
        lam = fmaxf(lam, retry_floor) * retry_factor;
        __syncthreads();  // everyone is done with `a` before it is reloaded
    }
    if (threadIdx.x == 0) {
        info[blk] = fail;
        if (damping_used != nullptr) damping_used[blk] = lam;
    }
    if (fail != 0) return;
    trtri_packed<B, T>(a, col);
    lauum_store<B, T>(a, out + (long long)blk * B * B);
}

#define THOR_INVERT_KERNEL(B, T)                                                            \
    extern "C" __global__ void __launch_bounds__(T) invert_chol_b##B##_f32(                 \
        const float* in, float* out, int nblocks, const float* damping, float damping_all,  \
        const unsigned char* mask, int max_retries, float retry_factor, float retry_floor, \
        int* info, float* damping_used) {                                                   \
        invert_chol<B, T>(in, out, nblocks, damping, damping_all, mask, max_retries,        \
                          retry_factor, retry_floor, info, damping_used);                   \
    }

// Threads per matrix: 2 warps at b = 32 up to 16 warps at b = 256 (src/cuda/tuning.rs).
THOR_INVERT_KERNEL(32, 64)
THOR_INVERT_KERNEL(64, 128)
THOR_INVERT_KERNEL(128, 256)
THOR_INVERT_KERNEL(256, 512)
