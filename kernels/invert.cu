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

// Whether block `blk` is to be inverted, with its damping in `lam`: false (and, once, info
// written) for a block past the batch, skipped by the mask, or with bad damping. The same on
// every thread of the block, so the caller returns uniformly.
__device__ __forceinline__ bool invert_begin(int blk, int nblocks, const float* damping,
                                             float damping_all, const unsigned char* mask,
                                             int* info, float* lam) {
    if (blk >= nblocks) return false;
    if (mask != nullptr && mask[blk] == 0) {
        if (threadIdx.x == 0) info[blk] = INFO_SKIPPED;
        return false;
    }
    *lam = damping != nullptr ? damping[blk] : damping_all;
    if (!(*lam >= 0.f && *lam < __int_as_float(0x7f800000))) {
        if (threadIdx.x == 0) info[blk] = INFO_BAD_DAMPING;
        return false;
    }
    return true;
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
    float lam;
    if (!invert_begin(blk, nblocks, damping, damping_all, mask, info, &lam)) return;
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

// ---------------------------------------------------------------------------------------
// Pieces shared by the register kernels below (a P x P grid of threads; thread (ty, tx)
// holds the R x R elements (ty + P a, tx + P q) of a b x b matrix, R = B / P).

// Stages block `src` (lower triangle, mirrored) plus `lam` on the diagonal into the
// registers `v`, through `L` (B rows of B + 1 floats). Ends with a barrier: L is free.
template <int B, int P>
__device__ __forceinline__ void stage_damped(const float* src, float* L, float (&v)[B / P][B / P],
                                             float lam) {
    constexpr int R = B / P, NT = P * P, LD = B + 1;
    const int tid = threadIdx.x, tx = tid % P, ty = tid / P;
    for (int idx = tid; idx < B * B; idx += NT) L[(idx / B) * LD + idx % B] = src[idx];
    __syncthreads();
#pragma unroll
    for (int a = 0; a < R; ++a)
#pragma unroll
        for (int q = 0; q < R; ++q) {
            const int i = ty + P * a, j = tx + P * q;
            v[a][q] = i >= j ? L[i * LD + j] : L[j * LD + i];
            if (i == j) v[a][q] += lam;
        }
    __syncthreads();  // L is written next
}

// X = Z Z^T stored to `dst` (lower entries computed once, stored to (r, c) and (c, r)),
// with Z = L^-T upper triangular in `L`, zeros below its diagonal included: Z(r, k) at
// L[r * LD + k], or at L[k * LD + r] when ZT (L holding L^-1 = Z^T itself).
// X(r, c) = sum_{k >= max(r, c)} Z(r, k) Z(c, k), lower groups (q <= a) only.
template <int B, int P, bool ZT>
__device__ __forceinline__ void gram_store(float* L, float* dst) {
    constexpr int R = B / P, NT = P * P, LD = B + 1;
    const int tid = threadIdx.x, tx = tid % P, ty = tid / P;
    float v[R][R];
#pragma unroll
    for (int a = 0; a < R; ++a)
#pragma unroll
        for (int q = 0; q < R; ++q) v[a][q] = 0.f;
#pragma unroll
    for (int kq = 0; kq < R; ++kq) {
        for (int kr = 0; kr < P; ++kr) {
            const int k = kq * P + kr;
            float yr[R], yc[R];
#pragma unroll
            for (int a = 0; a <= kq; ++a)
                yr[a] = ZT ? L[k * LD + ty + P * a] : L[(ty + P * a) * LD + k];
#pragma unroll
            for (int q = 0; q <= kq; ++q)
                yc[q] = ZT ? L[k * LD + tx + P * q] : L[(tx + P * q) * LD + k];
#pragma unroll
            for (int a = 0; a <= kq; ++a)
#pragma unroll
                for (int q = 0; q <= a; ++q) v[a][q] = fmaf(yr[a], yc[q], v[a][q]);
        }
    }
    __syncthreads();  // every read of Z is done
#pragma unroll
    for (int a = 0; a < R; ++a)
#pragma unroll
        for (int q = 0; q <= a; ++q) L[(ty + P * a) * LD + tx + P * q] = v[a][q];
    __syncthreads();
    for (int idx = tid; idx < B * B; idx += NT) {
        const int r = idx / B, c = idx % B;
        dst[idx] = r >= c ? L[r * LD + c] : L[c * LD + r];
    }
}

// ---------------------------------------------------------------------------------------
// v2 for b <= 128: the same route (right-looking Cholesky, L^-1, L^-T L^-1) with the working
// matrix in registers. Thread (ty, tx) of a P x P grid holds the R x R elements
// (ty + P a, tx + P q), a cyclic distribution, so the shrinking trailing matrix stays spread
// over every thread. Steps k = kq P + kr run with kq unrolled: the register index of the
// step's row or column group (kq) is a compile-time constant, and the groups that are
// finished (or still zero) are skipped at compile time.
//
// Phase 1 (Cholesky): step k, the owners of column k publish it (double buffered: one
// barrier per step); every thread reads the pivot, scales its own rows and columns of it,
// and applies the rank-1 update to its active groups; the owners store L(:, k) to shared
// memory. Phase 2 (Z = L^-T by backward elimination on I): step k, last first, the owners
// of row k scale it by 1 / L_kk and publish it; every thread subtracts L(k, i) times it
// from its rows i < k. Phase 3: X = L^-T L^-1 = Z Z^T from Z in shared memory, then the
// lower triangle is stored to (r, c) and (c, r).
template <int B, int P>
__device__ void invert_chol_reg(const float* in, float* out, int nblocks, const float* damping,
                                float damping_all, const unsigned char* mask, int max_retries,
                                float retry_factor, float retry_floor, int* info,
                                float* damping_used) {
    constexpr int R = B / P, NT = P * P, LD = B + 1;
    THOR_DYNAMIC_SMEM(float, thor_smem);
    float* L = thor_smem;          // B x LD: L, then L^-1, then X
    float* buf = L + B * LD;       // 2 x B: the step's published column or row
    const int blk = blockIdx.x;
    float lam;
    if (!invert_begin(blk, nblocks, damping, damping_all, mask, info, &lam)) return;
    const int tid = threadIdx.x, tx = tid % P, ty = tid / P;
    const float* src = in + (long long)blk * B * B;
    float v[R][R];
    int fail = 0;
    for (int attempt = 0;; ++attempt) {
        stage_damped<B, P>(src, L, v, lam);
        fail = 0;
#pragma unroll
        for (int kq = 0; kq < R; ++kq) {
            for (int kr = 0; kr < P; ++kr) {
                const int k = kq * P + kr;
                float* cb = buf + (k & 1) * B;
                if (tx == kr) {
#pragma unroll
                    for (int a = kq; a < R; ++a) cb[ty + P * a] = v[a][kq];
                }
                __syncthreads();
                const float d = cb[k];
                if (!positive_finite(d)) {  // the same on every thread
                    fail = k + 1;
                    break;
                }
                const float ljj = sqrtf(d), inv = 1.f / ljj;
                float li[R], lj[R];
#pragma unroll
                for (int a = kq; a < R; ++a) {
                    const int i = ty + P * a;
                    li[a] = i > k ? cb[i] * inv : 0.f;
                }
#pragma unroll
                for (int q = kq; q < R; ++q) {
                    const int j = tx + P * q;
                    lj[q] = j > k ? cb[j] * inv : 0.f;
                }
                if (tx == kr) {
#pragma unroll
                    for (int a = kq; a < R; ++a) {
                        const int i = ty + P * a;
                        if (i >= k) L[i * LD + k] = i == k ? ljj : li[a];
                    }
                }
#pragma unroll
                for (int a = kq; a < R; ++a)
#pragma unroll
                    for (int q = kq; q < R; ++q) v[a][q] = fmaf(-li[a], lj[q], v[a][q]);
            }
            if (fail != 0) break;
        }
        if (fail == 0 || attempt >= max_retries) break;
        lam = fmaxf(lam, retry_floor) * retry_factor;
        __syncthreads();  // every thread is past the step loop before L is reloaded
    }
    if (tid == 0) {
        info[blk] = fail;
        if (damping_used != nullptr) damping_used[blk] = lam;
    }
    if (fail != 0) return;
    __syncthreads();  // L complete

    // Phase 2: Z = L^-T in registers (upper triangular), by backward elimination on I:
    // step k (last first) scales row k of Z by 1 / L_kk and subtracts L(k, i) times it from
    // the rows i < k. This solves L^T Z = I, i.e. Z^T L = I: L^-1 = Z^T as LAPACK's trti2
    // computes it (a left inverse), which keeps the final residual at the Cholesky route's.
#pragma unroll
    for (int a = 0; a < R; ++a)
#pragma unroll
        for (int q = 0; q < R; ++q) v[a][q] = (ty + P * a == tx + P * q) ? 1.f : 0.f;
#pragma unroll
    for (int kq = R - 1; kq >= 0; --kq) {
        for (int kr = P - 1; kr >= 0; --kr) {
            const int k = kq * P + kr;
            float* rb = buf + (k & 1) * B;
            const float inv = 1.f / L[k * LD + k];
            if (ty == kr) {  // row k (group kq) is final once scaled; columns j >= k only
#pragma unroll
                for (int q = kq; q < R; ++q) {
                    v[kq][q] *= inv;
                    rb[tx + P * q] = v[kq][q];
                }
            }
            __syncthreads();
            float c[R];
#pragma unroll
            for (int a = 0; a <= kq; ++a) {
                const int i = ty + P * a;
                c[a] = i < k ? L[k * LD + i] : 0.f;
            }
#pragma unroll
            for (int q = kq; q < R; ++q) {
                const float z = rb[tx + P * q];
#pragma unroll
                for (int a = 0; a <= kq; ++a) v[a][q] = fmaf(-c[a], z, v[a][q]);
            }
        }
    }
    __syncthreads();  // every read of L is done
#pragma unroll
    for (int a = 0; a < R; ++a)
#pragma unroll
        for (int q = 0; q < R; ++q) L[(ty + P * a) * LD + tx + P * q] = v[a][q];
    __syncthreads();

    gram_store<B, P, false>(L, out + (long long)blk * B * B);
}

// The rank-P update of groups qlo <= q < qhi (rows a >= q: lower groups only) of the
// registers `v` by the panel of columns k0 ... k0 + P - 1 of L: v(i, j) -= sum_t L(i, k0 + t)
// L(j, k0 + t), t ascending. Called with constant group bounds, so `v` stays in registers.
template <int B, int P>
__device__ __forceinline__ void rank_update(float (&v)[B / P][B / P], const float* L, int k0,
                                            int qlo, int qhi = B / P) {
    constexpr int R = B / P, LD = B + 1;
    const int tx = threadIdx.x % P, ty = threadIdx.x / P;
#pragma unroll
    for (int t = 0; t < P; ++t) {
        float li[R], lj[R];
#pragma unroll
        for (int a = qlo; a < R; ++a) li[a] = L[(ty + P * a) * LD + k0 + t];
#pragma unroll
        for (int q = qlo; q < qhi; ++q) lj[q] = L[(tx + P * q) * LD + k0 + t];
#pragma unroll
        for (int a = qlo; a < R; ++a)
#pragma unroll
            for (int q = qlo; q < qhi && q <= a; ++q) v[a][q] = fmaf(-li[a], lj[q], v[a][q]);
    }
}

// ---------------------------------------------------------------------------------------
// Blocked variant for b <= 128: the same P x P grid and cyclic register layout, with the
// factorization and the triangular inverse done a panel of P columns at a time, so that a
// whole matrix takes about 3 B / P + 2 B / P block-wide barriers instead of 2 B.
//
// Phase 1 (right-looking blocked Cholesky), panel p (columns k0 = P p ... k0 + P - 1):
// every thread publishes its lower entries of the panel to shared memory; one warp factors
// the panel's P x P diagonal block in registers (lane r holds row r, the pivots and
// columns passed by shuffles) while the other warps apply the previous panel's rank-P
// update to the groups right of this panel; every other row of the panel is then solved
// against the diagonal block by one thread each; the next panel's group takes this panel's
// update in registers. The arithmetic of every entry of L is the standard kernel's, in the
// same order, so the factor, the failing pivot and the retries are bit for bit the same.
//
// Phase 2 (left inverse X = L^-1, X L = I, in LAPACK trtri's order, multiplying by the
// inverted diagonal block where trtri solves with it): the diagonal
// blocks are inverted one row per thread (X(r, c) = -(sum_{k > c} X(r, k) L(k, c)) / l_cc,
// last column first, as trti2), then block columns J from the last but one to the first:
// X(I, J) = -(sum_{J < K <= I} X(I, K) L(K, J)) X(J, J) for every I > J at once.
// Phase 3: X^T X as the register kernel's last phase.
//
// Shared memory: L (B x (B + 1)), the products of one block column ((R - 1) P x P), the
// reciprocal pivots (B) and a status word.
template <int B, int P>
__device__ void invert_chol_blocked(const float* in, float* out, int nblocks,
                                    const float* damping, float damping_all,
                                    const unsigned char* mask, int max_retries,
                                    float retry_factor, float retry_floor, int* info,
                                    float* damping_used) {
    static_assert(P <= THOR_WARP && B % P == 0, "one warp factors a diagonal block");
    constexpr int R = B / P, NT = P * P, LD = B + 1;
    static_assert(NT >= B, "one thread per row");
    THOR_DYNAMIC_SMEM(float, thor_smem);
    float* L = thor_smem;                 // B x LD: A, L, then X = L^-1, then the result
    float* S = L + B * LD;                // (R - 1) x P x P: one block column's products
    float* rd = S + (R - 1) * P * P;      // B: 1 / l_jj
    int* status = reinterpret_cast<int*>(rd + B);
    const int blk = blockIdx.x;
    float lam;
    if (!invert_begin(blk, nblocks, damping, damping_all, mask, info, &lam)) return;
    const int tid = threadIdx.x, tx = tid % P, ty = tid / P, lane = tid % THOR_WARP;
    const float* src = in + (long long)blk * B * B;
    float v[R][R];
    int fail = 0;
    for (int attempt = 0;; ++attempt) {
        stage_damped<B, P>(src, L, v, lam);
        fail = 0;
#pragma unroll
        for (int p = 0; p < R; ++p) {
            const int k0 = P * p;
            // Publish the panel: column group p, lower entries.
#pragma unroll
            for (int a = p; a < R; ++a) {
                const int i = ty + P * a, j = tx + k0;
                if (i >= j) L[i * LD + j] = v[a][p];
            }
            __syncthreads();
            // Warp 0 factors the diagonal block; lane r < P holds its row k0 + r.
            if (tid < THOR_WARP) {
                float x[P];
#pragma unroll
                for (int c = 0; c < P; ++c)
                    x[c] = lane < P && c <= lane ? L[(k0 + lane) * LD + k0 + c] : 0.f;
                int f = 0;
#pragma unroll
                for (int j = 0; j < P; ++j) {
                    const float d = __shfl_sync(THOR_FULL_MASK, x[j], j);
                    if (!positive_finite(d)) {  // the same on every lane
                        f = k0 + j + 1;
                        break;
                    }
                    const float ljj = sqrtf(d), inv = 1.f / ljj;
                    if (lane == j) x[j] = ljj;
                    if (lane > j) x[j] *= inv;
#pragma unroll
                    for (int c = j + 1; c < P; ++c) {
                        const float lc = __shfl_sync(THOR_FULL_MASK, x[j], c);
                        if (lane >= c) x[c] = fmaf(-x[j], lc, x[c]);
                    }
                    if (lane == 0) rd[k0 + j] = inv;
                }
                if (f == 0 && lane < P) {
#pragma unroll
                    for (int c = 0; c < P; ++c)
                        if (c <= lane) L[(k0 + lane) * LD + k0 + c] = x[c];
                }
                if (lane == 0) *status = f;
            }
            // Meanwhile (and then on warp 0 too): the previous panel's update of the
            // groups right of this panel, put off so that it overlaps the factorization.
            if (p >= 1) rank_update<B, P>(v, L, k0 - P, p + 1);
            __syncthreads();
            fail = *status;
            if (fail != 0) break;  // the same on every thread
            // The rows below the diagonal block: L(i, j) = (a_ij - sum_{t < j} L(i, t)
            // L(j, t)) / l_jj, one thread per row.
            if (tid < B - k0 - P) {
                const int i = k0 + P + tid;
                float x[P];
#pragma unroll
                for (int c = 0; c < P; ++c) x[c] = L[i * LD + k0 + c];
#pragma unroll
                for (int j = 0; j < P; ++j) {
#pragma unroll
                    for (int t = 0; t < j; ++t)
                        x[j] = fmaf(-x[t], L[(k0 + j) * LD + k0 + t], x[j]);
                    x[j] *= rd[k0 + j];
                }
#pragma unroll
                for (int c = 0; c < P; ++c) L[i * LD + k0 + c] = x[c];
            }
            __syncthreads();
            // This panel's update of the next panel's group, all the next factorization
            // needs; the other groups take it during that factorization.
            if (p + 1 < R) rank_update<B, P>(v, L, k0, p + 1, p + 2);
        }
        if (fail == 0 || attempt >= max_retries) break;
        lam = fmaxf(lam, retry_floor) * retry_factor;
        __syncthreads();  // every thread has read the status before L is reloaded
    }
    if (tid == 0) {
        info[blk] = fail;
        if (damping_used != nullptr) damping_used[blk] = lam;
    }
    if (fail != 0) return;

    // Phase 2a: the diagonal blocks' left inverses, one row per thread, zeros above the
    // diagonal stored too (phase 3 reads them).
    {
        const int base = tid - tid % P, r = tid % P;
        float x[P];
        if (tid < B) {
#pragma unroll
            for (int c = P - 1; c >= 0; --c) {
                float s = c == r ? 1.f : 0.f;
#pragma unroll
                for (int k = P - 1; k > c; --k)
                    if (k <= r) s = fmaf(-x[k], L[(base + k) * LD + base + c], s);
                x[c] = c <= r ? s * rd[base + c] : 0.f;
            }
        }
        __syncthreads();  // every read of the diagonal blocks is done
        if (tid < B) {
#pragma unroll
            for (int c = 0; c < P; ++c) L[tid * LD + base + c] = x[c];
        }
        __syncthreads();
    }
    // Phase 2b: block columns J = R - 2 ... 0, every block row I > J at once. S(I) =
    // sum_{J < K <= I} X(I, K) L(K, J) (X(I, I) lower triangular: k <= P I + ty), then
    // X(I, J) = -S(I) X(J, J) (X(J, J) lower triangular: m >= tx) over L(I, J).
#pragma unroll
    for (int J = R - 2; J >= 0; --J) {
        float acc[R];
#pragma unroll
        for (int I = J + 1; I < R; ++I) acc[I] = 0.f;
        for (int k = P * (J + 1); k < B; ++k) {
            const float lk = L[k * LD + P * J + tx];  // read once for every I
#pragma unroll
            for (int I = J + 1; I < R; ++I)
                if (k <= P * I + ty) acc[I] = fmaf(L[(P * I + ty) * LD + k], lk, acc[I]);
        }
#pragma unroll
        for (int I = J + 1; I < R; ++I) S[(I - J - 1) * NT + ty * P + tx] = acc[I];
        __syncthreads();
#pragma unroll
        for (int I = J + 1; I < R; ++I) {
            const float* si = S + (I - J - 1) * NT + ty * P;
            float s = 0.f;
            for (int m = tx; m < P; ++m) s = fmaf(si[m], L[(P * J + m) * LD + P * J + tx], s);
            L[(P * I + ty) * LD + P * J + tx] = -s;
        }
        __syncthreads();
    }
    // Phase 3: X^T X = Z Z^T with Z = X^T.
    gram_store<B, P, true>(L, out + (long long)blk * B * B);
}

#define THOR_INVERT_REG_KERNEL(B, P)                                                        \
    extern "C" __global__ void __launch_bounds__(P * P, 1) invert_chol_b##B##_f32(          \
        const float* in, float* out, int nblocks, const float* damping, float damping_all,  \
        const unsigned char* mask, int max_retries, float retry_factor, float retry_floor, \
        int* info, float* damping_used) {                                                   \
        invert_chol_reg<B, P>(in, out, nblocks, damping, damping_all, mask, max_retries,    \
                              retry_factor, retry_floor, info, damping_used);               \
    }

#define THOR_INVERT_KERNEL(B, T)                                                            \
    extern "C" __global__ void __launch_bounds__(T) invert_chol_b##B##_f32(                 \
        const float* in, float* out, int nblocks, const float* damping, float damping_all,  \
        const unsigned char* mask, int max_retries, float retry_factor, float retry_floor, \
        int* info, float* damping_used) {                                                   \
        invert_chol<B, T>(in, out, nblocks, damping, damping_all, mask, max_retries,        \
                          retry_factor, retry_floor, info, damping_used);                   \
    }

// Threads per matrix (src/cuda/tuning.rs): an 8 x 8 grid at b = 32 and 64, 16 x 16 at
// b = 128 (registers); 16 warps at b = 256 (the packed shared-memory kernel, v1).
THOR_INVERT_REG_KERNEL(32, 8)
THOR_INVERT_REG_KERNEL(64, 8)
THOR_INVERT_REG_KERNEL(128, 16)
THOR_INVERT_KERNEL(256, 512)

// b = 128 at two thread blocks per SM (registers capped at 128 per thread): the same
// register kernel; the second block's steps fill the first one's barrier waits.
extern "C" __global__ void __launch_bounds__(256, 2) invert_chol_b128x2_f32(
    const float* in, float* out, int nblocks, const float* damping, float damping_all,
    const unsigned char* mask, int max_retries, float retry_factor, float retry_floor, int* info,
    float* damping_used) {
    invert_chol_reg<128, 16>(in, out, nblocks, damping, damping_all, mask, max_retries,
                             retry_factor, retry_floor, info, damping_used);
}

// The blocked variant (src/cuda/raw.rs InvertKernel::Blocked) at the register kernels'
// grids.
#define THOR_INVERT_BLOCKED_KERNEL(B, P)                                                    \
    extern "C" __global__ void __launch_bounds__(P * P, 1) invert_blocked_b##B##_f32(       \
        const float* in, float* out, int nblocks, const float* damping, float damping_all,  \
        const unsigned char* mask, int max_retries, float retry_factor, float retry_floor, \
        int* info, float* damping_used) {                                                   \
        invert_chol_blocked<B, P>(in, out, nblocks, damping, damping_all, mask,             \
                                  max_retries, retry_factor, retry_floor, info,             \
                                  damping_used);                                            \
    }

THOR_INVERT_BLOCKED_KERNEL(32, 8)
THOR_INVERT_BLOCKED_KERNEL(64, 8)
THOR_INVERT_BLOCKED_KERNEL(128, 16)
