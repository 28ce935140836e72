// Fused covariance accumulation into the block-diagonal layout, many factors per launch:
// for every factor f and every diagonal block j of it,
//   S_j <- beta_f * S_j + alpha_f * X_j^T X_j,
// X_j the j-th b-column slice of the factor's input X_f [N_f, d_f]: a row-major matrix (row
// stride ld), or the patch matrix of a convolution read from its 4-d input tensor (implicit
// im2col, see AccFactor: the patches are formed in registers, never in memory).
//
// Two kernels (the set's traces come after, from trace_set_f32):
//  1. acc_partial_*: one thread block per (factor, block, lower T x T tile, range of rows):
//     the tile's partial product over its rows, to a workspace slot. Only the lower tiles of
//     each block are computed; the row ranges split N so that small and large factors all
//     fill the device. Each slot also gets a flag: 1 when the diagonal of its partial is not
//     finite (a NaN or Inf in X always reaches the diagonal: C_ii = sum x_i^2).
//  2. acc_finalize_f32: one thread block per (factor, block, tile): sums the tile's slots in
//     a fixed order (deterministic), applies alpha and beta, writes the lower tile and its
//     mirror (bit for bit), identity in the padding. A factor with any flagged slot is left
//     untouched and reported in status[f] (1), so a diverging batch never corrupts the
//     running statistics; so is a factor whose partner (the other factor of its layer) was
//     flagged (status 2), so that a layer's A and G always describe the same batches.
//
// Per-factor state (nullable, kept by the trace rule of THOR's step, see rule.cu): a factor
// without statistics yet has them replaced (alpha 1 / N, beta 0) whatever its alpha and
// beta, so that an EMA starts from its first batch; a frozen factor (its layer froze) is
// neither read nor written, status 3. Without the state every factor holds statistics.
//
// Precision: F32 (SIMT FMA), TF32 tensor cores on f32 input, or f16 / bf16 input on tensor
// cores (mma.sync m16n8k8 / m16n8k16), always accumulating in f32.
#include "common.cuh"

#define ACC_HAS_STATS 1
#define ACC_FROZEN 2

// One factor of a grouped call (128 bytes, built by the host planner).
struct AccFactor {
    unsigned long long x;  // device address of X's elements (f32, f16 or bf16)
    long long ld;          // kind 0: row stride of X, elements
    long long rows;        // N
    int d;                 // columns of X = factor dimension
    int first_block;       // the factor's first block in the output set
    int slot_first;        // the factor's first workspace slot
    int slot_count;        // its number of slots
    float alpha;
    float beta;
    int partner;           // a factor that succeeds or fails with this one (A and G of a layer), or -1
    int kind;              // ACC_MATRIX or ACC_PATCHES
    int ones;              // kind 1: the last column is ones (a bias)
    float first_alpha;     // alpha of a factor's first statistics (1 / N, or 1 / batch)
    // Kind 1 (implicit im2col): X is the patch matrix of a convolution over the 4-d tensor
    // at x, row (n, oh, ow), column (ci, ki, kj), kj fastest; 0 in the zero padding.
    long long sn, sc, sh, sw;  // element strides of the tensor's [n, c, h, w]
    int h, w;                  // input height and width
    int wo, hw;                // output width, output positions per sample (ho * wo)
    short kh, kw, sy, sx, py, px, dy, dx;  // kernel, stride, padding, dilation
};

#define ACC_MATRIX 0
#define ACC_PATCHES 1

// The host builds this table word by word (cuda::accumulate::AccumulatePlan::factor_table).
// NVRTC has no offsetof; the host emulation of the kernels (every test run) checks the
// field offsets.
static_assert(sizeof(AccFactor) == 128, "AccFactor is 128 bytes");
#ifdef THOR_EMULATE
#include <cstddef>
static_assert(offsetof(AccFactor, ld) == 8 && offsetof(AccFactor, d) == 24, "AccFactor layout");
static_assert(offsetof(AccFactor, alpha) == 40 && offsetof(AccFactor, partner) == 48, "AccFactor layout");
static_assert(offsetof(AccFactor, kind) == 52 && offsetof(AccFactor, ones) == 56, "AccFactor layout");
static_assert(offsetof(AccFactor, first_alpha) == 60 && offsetof(AccFactor, sn) == 64, "AccFactor layout");
static_assert(offsetof(AccFactor, h) == 96 && offsetof(AccFactor, wo) == 104, "AccFactor layout");
static_assert(offsetof(AccFactor, kh) == 112 && offsetof(AccFactor, dx) == 126, "AccFactor layout");
#endif

// Work item of the partial kernel (8 ints): factor, block j within the factor, tile row and
// column offsets within the block (elements), rows [n0, n1), workspace slot.
// Work item of the finalize kernel (8 ints): factor, block j, tile row, tile column, first
// slot, number of slots, 1 when this item reports the factor's status.

#define ACC_BK 16  // rows per stage (F32) / 32-bit words per stage (tensor cores)

__device__ __forceinline__ bool acc_finite(float v) {
    return fabsf(v) <= 3.402823466e38f;  // false for NaN and Inf
}

template <typename T>
__device__ __forceinline__ float acc_load(const T* p);
template <>
__device__ __forceinline__ float acc_load<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float acc_load<thor_f16>(const thor_f16* p) {
    return thor_half_to_float(p->bits);
}
template <>
__device__ __forceinline__ float acc_load<thor_bf16>(const thor_bf16* p) {
    return thor_bf16_to_float(p->bits);
}

// Implicit im2col, for a kind-1 factor. Every thread of a partial kernel reads the same
// column of its tile at every stage (the tile width divides the thread count), so a
// column's part of the address is decoded once per thread (AccCol), and a row's once per
// row (AccRow, shared by the two operands). Rows and sizes are below 2^30 (the planner's
// limits), so the 32-bit arithmetic does not overflow.
struct AccCol {
    long long off;  // ci * sc
    int dh, dw;     // ki * dy - py, kj * dx - px
    int what;       // ACC_COL_READ, ACC_COL_ONES or ACC_COL_NONE (past the block: 0)
};
#define ACC_COL_READ 0
#define ACC_COL_ONES 1
#define ACC_COL_NONE 2

__device__ __forceinline__ AccCol acc_col(const AccFactor& f, int col, bool in_block) {
    AccCol c;
    c.off = 0;
    c.dh = c.dw = 0;
    c.what = !in_block ? ACC_COL_NONE : (col >= f.d - f.ones ? ACC_COL_ONES : ACC_COL_READ);
    if (c.what == ACC_COL_READ) {
        const int kk = f.kh * f.kw, ci = col / kk, k = col - ci * kk;
        const int ki = k / f.kw, kj = k - ki * f.kw;
        c.off = (long long)ci * f.sc;
        c.dh = ki * f.dy - f.py;
        c.dw = kj * f.dx - f.px;
    }
    return c;
}

struct AccRow {
    long long off;  // n * sn
    int h0, w0;     // oh * sy, ow * sx
};

// q = a / d, r = a % d for 0 <= a < 2^30, 1 <= d < 2^30, through the double reciprocal
// `inv` of d (a few instructions where an integer division takes about 25): a * inv is
// within 2^-22 of a / d, so the truncated quotient is off by at most one, and one
// correction step fixes it (q * d stays below 2^31).
__device__ __forceinline__ void acc_divmod(int a, int d, double inv, int& q, int& r) {
    q = (int)((double)a * inv);
    r = a - q * d;
    if (r < 0) {
        --q;
        r += d;
    } else if (r >= d) {
        ++q;
        r -= d;
    }
}

// The reciprocals acc_row divides by, once per thread block.
struct AccInv {
    double hw, wo;
};

__device__ __forceinline__ AccInv acc_inv(const AccFactor& f) {
    AccInv v;
    v.hw = 1.0 / (double)f.hw;
    v.wo = 1.0 / (double)f.wo;
    return v;
}

__device__ __forceinline__ AccRow acc_row(const AccFactor& f, const AccInv& inv, int row) {
    int n, p, oh, ow;
    acc_divmod(row, f.hw, inv.hw, n, p);
    acc_divmod(p, f.wo, inv.wo, oh, ow);
    AccRow r;
    r.off = (long long)n * f.sn;
    r.h0 = oh * f.sy;
    r.w0 = ow * f.sx;
    return r;
}

// The offset of element (row, col) in the tensor, or -1 in the zero padding (a read column).
__device__ __forceinline__ long long acc_offset(const AccFactor& f, const AccRow& r, const AccCol& c) {
    const int hh = r.h0 + c.dh, ww = r.w0 + c.dw;
    if (hh < 0 || hh >= f.h || ww < 0 || ww >= f.w) return -1;
    return r.off + c.off + (long long)hh * f.sh + (long long)ww * f.sw;
}

// What a partial kernel's thread needs to gather its tile column of a kind-1 factor: the
// column decoded for both operands (tile rows tr and tc of block column col0, this thread's
// column c) and the reciprocals rows are divided by. Zeros for a matrix factor.
struct AccPatchCtx {
    AccCol a, b;
    AccInv inv;
};

__device__ __forceinline__ AccPatchCtx acc_patch_ctx(const AccFactor& f, bool patches, int col0,
                                                     int tr, int tc, int c, int w) {
    AccPatchCtx pc = {};
    if (patches) {
        pc.a = acc_col(f, col0 + tr + c, tr + c < w);
        pc.b = acc_col(f, col0 + tc + c, tc + c < w);
        pc.inv = acc_inv(f);
    }
    return pc;
}

// Element (row, col) as f32: 1 in the ones column, 0 in the padding and past the block.
template <typename In>
__device__ __forceinline__ float acc_gather(const AccFactor& f, const In* x, const AccRow& r,
                                            const AccCol& c) {
    if (c.what != ACC_COL_READ) return c.what == ACC_COL_ONES ? 1.f : 0.f;
    const long long o = acc_offset(f, r, c);
    return o < 0 ? 0.f : acc_load<In>(x + o);
}

// ---------------------------------------------------------------------------------------
// Partial products, SIMT f32. Tile T x T, TM x TN outputs per thread.
template <typename In, int T, int TM, int TN>
__device__ void acc_partial_simt(const AccFactor* __restrict__ factors,
                                 const int* __restrict__ items, int b,
                                 float* __restrict__ ws, int* __restrict__ flags) {
    constexpr int TX = T / TN, TY = T / TM, NT = TX * TY;
    constexpr int PER = ACC_BK * T / NT;  // elements per thread per operand per stage
    static_assert(NT % T == 0, "each thread keeps one tile column across stages");
    // Two stages: the next stage's global loads are in flight (registers) while this one
    // is computed, then stored to the other buffer; one barrier per stage.
    THOR_SHARED(__align__(16) float, As, [2][ACC_BK][T]);
    THOR_SHARED(__align__(16) float, Bs, [2][ACC_BK][T]);
    const int* it = items + 8 * (long long)blockIdx.x;
    const AccFactor f = factors[it[0]];
    const int j = it[1], tr = it[2], tc = it[3], n0 = it[4], n1 = it[5], slot = it[6];
    const int w = min(b, f.d - j * b);  // real columns of this block
    const In* x = reinterpret_cast<const In*>(f.x);
    const long long col0 = (long long)j * b;
    const bool diag = tr == tc;
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int k = 0; k < TN; ++k) acc[i][k] = 0.f;
    float pa[PER], pb[PER];
    // This thread's tile column, the same at every stage (the thread count is a multiple
    // of T), decoded once for a patch factor.
    const bool patches = f.kind == ACC_PATCHES;
    const AccPatchCtx pc = acc_patch_ctx(f, patches, (int)col0, tr, tc, tid % T, w);
    const AccCol &col_a = pc.a, &col_b = pc.b;
    const AccInv& inv = pc.inv;
    auto fetch = [&](int n) {
#pragma unroll
        for (int e = 0; e < PER; ++e) {
            const int idx = tid + e * NT, k = idx / T, c = idx % T;
            const int row = n + k;
            float va = 0.f, vb = 0.f;
            if (row < n1 && patches) {
                const AccRow r = acc_row(f, inv, row);
                va = acc_gather<In>(f, x, r, col_a);
                if (!diag) vb = acc_gather<In>(f, x, r, col_b);
            } else if (row < n1) {
                const In* xr = x + (long long)row * f.ld + col0;
                if (tr + c < w) va = acc_load<In>(xr + tr + c);
                if (!diag && tc + c < w) vb = acc_load<In>(xr + tc + c);
            }
            pa[e] = va;
            pb[e] = diag ? va : vb;
        }
    };
    auto stash = [&](int st) {
#pragma unroll
        for (int e = 0; e < PER; ++e) {
            const int idx = tid + e * NT, k = idx / T, c = idx % T;
            As[st][k][c] = pa[e];
            Bs[st][k][c] = pb[e];
        }
    };
    fetch(n0);
    stash(0);
    __syncthreads();
    int st = 0;
    for (int n = n0; n < n1; n += ACC_BK, st ^= 1) {
        const bool more = n + ACC_BK < n1;
        if (more) fetch(n + ACC_BK);
#pragma unroll 4
        for (int k = 0; k < ACC_BK; ++k) {
            float a[TM], bv[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = As[st][k][ty * TM + i];
#pragma unroll
            for (int q = 0; q < TN; ++q) bv[q] = Bs[st][k][tx * TN + q];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int q = 0; q < TN; ++q) acc[i][q] = fmaf(a[i], bv[q], acc[i][q]);
        }
        if (more) stash(st ^ 1);
        __syncthreads();
    }
    float* out = ws + (long long)slot * T * T;
    bool mine_bad = false;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int q = 0; q < TN; ++q) {
            const int r = ty * TM + i, c = tx * TN + q;
            out[r * T + c] = acc[i][q];
            if (diag && r == c && !acc_finite(acc[i][q])) mine_bad = true;
        }
    const int bad = __syncthreads_or(mine_bad);
    if (tid == 0) flags[slot] = bad;
}

// ---------------------------------------------------------------------------------------
// Partial products on tensor cores. Tile T x T by 2 x 2 warps, each (T/2) x (T/2) as
// MT x NT mma tiles of 16 x 8. Shared memory holds the two column slices transposed,
// As[col][word], one 32-bit word per tf32 value or per pair of 16-bit values along k, so
// that both mma operands read consecutive k from one row (see the fragment layouts of
// mma.sync in the PTX ISA).
#define ACC_MMA_PAD 4

template <typename In>
__device__ __forceinline__ unsigned acc_word(const In* xr0, const In* xr1, bool ok0, bool ok1);

// TF32: one value per word, rounded to nearest (ties away) as cvt.rna.tf32.f32 does.
template <>
__device__ __forceinline__ unsigned acc_word<float>(const float* xr0, const float*, bool ok0, bool) {
    return __float_as_uint(ok0 ? thor_to_tf32(*xr0) : 0.f);
}
template <>
__device__ __forceinline__ unsigned acc_word<thor_f16>(const thor_f16* xr0, const thor_f16* xr1,
                                                       bool ok0, bool ok1) {
    const unsigned lo = ok0 ? xr0->bits : 0u, hi = ok1 ? xr1->bits : 0u;
    return lo | (hi << 16);
}
template <>
__device__ __forceinline__ unsigned acc_word<thor_bf16>(const thor_bf16* xr0, const thor_bf16* xr1,
                                                        bool ok0, bool ok1) {
    const unsigned lo = ok0 ? xr0->bits : 0u, hi = ok1 ? xr1->bits : 0u;
    return lo | (hi << 16);
}

// The same word for a kind-1 factor: rows row0 and row0 + 1 of column col.
template <typename In>
__device__ __forceinline__ unsigned short acc_bits(const In* p) {
    return p->bits;
}
template <typename In>
__device__ __forceinline__ unsigned short acc_one_bits();
template <>
__device__ __forceinline__ unsigned short acc_one_bits<thor_f16>() { return 0x3C00; }
template <>
__device__ __forceinline__ unsigned short acc_one_bits<thor_bf16>() { return 0x3F80; }

template <typename In>
__device__ __forceinline__ unsigned short acc_gather_bits(const AccFactor& f, const In* x,
                                                          const AccRow& r, const AccCol& c) {
    if (c.what != ACC_COL_READ) return c.what == ACC_COL_ONES ? acc_one_bits<In>() : (unsigned short)0;
    const long long o = acc_offset(f, r, c);
    return o < 0 ? (unsigned short)0 : acc_bits<In>(x + o);
}

// The word of rows (row0, row0 + 1) of a column (rows past the range read as 0): as
// acc_word, from the tensor.
template <typename In>
__device__ __forceinline__ unsigned acc_gather_word(const AccFactor& f, const In* x, const AccRow& r0,
                                                    const AccRow& r1, const AccCol& c, bool ok0,
                                                    bool ok1) {
    const unsigned lo = ok0 ? acc_gather_bits<In>(f, x, r0, c) : 0u;
    const unsigned hi = ok1 ? acc_gather_bits<In>(f, x, r1, c) : 0u;
    return lo | (hi << 16);
}
template <>
__device__ __forceinline__ unsigned acc_gather_word<float>(const AccFactor& f, const float* x,
                                                           const AccRow& r0, const AccRow&,
                                                           const AccCol& c, bool ok0, bool) {
    return __float_as_uint(ok0 ? thor_to_tf32(acc_gather<float>(f, x, r0, c)) : 0.f);
}

template <typename In>
__device__ __forceinline__ void acc_mma(float* d, const unsigned* a, const unsigned* b);
template <>
__device__ __forceinline__ void acc_mma<float>(float* d, const unsigned* a, const unsigned* b) {
    thor_mma_tf32(d, a, b, d);
}
template <>
__device__ __forceinline__ void acc_mma<thor_f16>(float* d, const unsigned* a, const unsigned* b) {
    thor_mma_f16(d, a, b, d);
}
template <>
__device__ __forceinline__ void acc_mma<thor_bf16>(float* d, const unsigned* a, const unsigned* b) {
    thor_mma_bf16(d, a, b, d);
}

template <typename In, int T>
__device__ void acc_partial_mma(const AccFactor* __restrict__ factors,
                                const int* __restrict__ items, int b,
                                float* __restrict__ ws, int* __restrict__ flags) {
    constexpr int KPW = sizeof(In) == 4 ? 1 : 2;  // k values per 32-bit word
    constexpr int KSTEP = 8;                       // words per mma (k8 tf32, k16 16-bit)
    constexpr int LDW = ACC_BK + ACC_MMA_PAD;
    constexpr int WT = T / 2;                      // warp tile
    constexpr int MT = WT / 16, NT = WT / 8;
    constexpr int PER = ACC_BK * T / 128;  // words per thread per operand per stage
    static_assert(128 % T == 0, "each thread keeps one tile column across stages");
    // Two stages, as in the SIMT kernel.
    THOR_SHARED(__align__(16) unsigned, As, [2][T][LDW]);
    THOR_SHARED(__align__(16) unsigned, Bs, [2][T][LDW]);
    const int* it = items + 8 * (long long)blockIdx.x;
    const AccFactor f = factors[it[0]];
    const int j = it[1], tr = it[2], tc = it[3], n0 = it[4], n1 = it[5], slot = it[6];
    const int w = min(b, f.d - j * b);
    const In* x = reinterpret_cast<const In*>(f.x);
    const long long col0 = (long long)j * b;
    const bool diag = tr == tc;
    const int tid = threadIdx.x, warp = tid / THOR_WARP, lane = tid % THOR_WARP;
    const int g = lane >> 2, t = lane & 3;
    const int wm = (warp >> 1) * WT, wn = (warp & 1) * WT;
    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int q = 0; q < NT; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][q][e] = 0.f;
    unsigned pa[PER], pb[PER];
    // This thread's tile column, the same at every stage (the thread count is a multiple
    // of T), decoded once for a patch factor.
    const bool patches = f.kind == ACC_PATCHES;
    const AccPatchCtx pc = acc_patch_ctx(f, patches, (int)col0, tr, tc, tid % T, w);
    const AccCol &col_a = pc.a, &col_b = pc.b;
    const AccInv& inv = pc.inv;
    auto fetch = [&](int n) {
#pragma unroll
        for (int e = 0; e < PER; ++e) {
            const int idx = tid + e * 128, kw = idx / T, c = idx % T;
            const int row0 = n + kw * KPW, row1 = row0 + 1;
            const bool r0 = row0 < n1, r1 = KPW == 2 && row1 < n1;
            const bool ca = tr + c < w, cb = tc + c < w;
            if (patches) {
                // Rows past the range are not decoded (their words are 0).
                const AccRow ra = acc_row(f, inv, r0 ? row0 : n0);
                const AccRow rb = acc_row(f, inv, r1 ? row1 : n0);
                const unsigned va = acc_gather_word<In>(f, x, ra, rb, col_a, r0, r1);
                pa[e] = va;
                pb[e] = diag ? va : acc_gather_word<In>(f, x, ra, rb, col_b, r0, r1);
                continue;
            }
            const In* xa = x + (long long)row0 * f.ld + col0;
            const In* xb = xa + (KPW == 2 ? f.ld : 0);
            const unsigned va = acc_word<In>(xa + tr + c, xb + tr + c, r0 && ca, r1 && ca);
            pa[e] = va;
            pb[e] = diag ? va : acc_word<In>(xa + tc + c, xb + tc + c, r0 && cb, r1 && cb);
        }
    };
    auto stash = [&](int st) {
#pragma unroll
        for (int e = 0; e < PER; ++e) {
            const int idx = tid + e * 128, kw = idx / T, c = idx % T;
            As[st][c][kw] = pa[e];
            Bs[st][c][kw] = pb[e];
        }
    };
    fetch(n0);
    stash(0);
    __syncthreads();
    int st = 0;
    for (int n = n0; n < n1; n += ACC_BK * KPW, st ^= 1) {
        const bool more = n + ACC_BK * KPW < n1;
        if (more) fetch(n + ACC_BK * KPW);
#pragma unroll
        for (int kk = 0; kk < ACC_BK; kk += KSTEP) {
            unsigned af[MT][4], bf[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int m0 = wm + 16 * i;
                af[i][0] = As[st][m0 + g][kk + t];
                af[i][1] = As[st][m0 + g + 8][kk + t];
                af[i][2] = As[st][m0 + g][kk + t + 4];
                af[i][3] = As[st][m0 + g + 8][kk + t + 4];
            }
#pragma unroll
            for (int q = 0; q < NT; ++q) {
                const int c0 = wn + 8 * q;
                bf[q][0] = Bs[st][c0 + g][kk + t];
                bf[q][1] = Bs[st][c0 + g][kk + t + 4];
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int q = 0; q < NT; ++q) acc_mma<In>(acc[i][q], af[i], bf[q]);
        }
        if (more) stash(st ^ 1);
        __syncthreads();
    }
    float* out = ws + (long long)slot * T * T;
    bool mine_bad = false;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int q = 0; q < NT; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = wm + 16 * i + g + (e >= 2 ? 8 : 0);
                const int c = wn + 8 * q + 2 * t + (e & 1);
                out[r * T + c] = acc[i][q][e];
                if (diag && r == c && !acc_finite(acc[i][q][e])) mine_bad = true;
            }
    const int bad = __syncthreads_or(mine_bad);
    if (tid == 0) flags[slot] = bad;
}

// ---------------------------------------------------------------------------------------
// Finalize: sum the slots, alpha / beta, mirror, identity padding. 256 threads.
template <int T>
__device__ void acc_finalize(const AccFactor* __restrict__ factors, const int* __restrict__ items,
                             int b, const float* __restrict__ ws, const int* __restrict__ flags,
                             const unsigned char* __restrict__ fstate,
                             float* __restrict__ blocks, int* __restrict__ status) {
    THOR_SHARED(float, tile, [T][T + 1]);
    const int* it = items + 8 * (long long)blockIdx.x;
    const AccFactor f = factors[it[0]];
    const int j = it[1], tr = it[2], tc = it[3], s0 = it[4], ns = it[5], reports = it[6];
    const int tid = threadIdx.x;
    const unsigned char st = fstate != nullptr ? fstate[it[0]] : (unsigned char)ACC_HAS_STATS;
    if (st & ACC_FROZEN) {  // the same for the whole block: no barrier is skipped by some
        if (reports && tid == 0) status[it[0]] = 3;
        return;
    }
    int mine = 0, theirs = 0;
    for (int s = tid; s < f.slot_count; s += blockDim.x) mine |= flags[f.slot_first + s];
    if (f.partner >= 0) {
        const int p0 = factors[f.partner].slot_first, pn = factors[f.partner].slot_count;
        for (int s = tid; s < pn; s += blockDim.x) theirs |= flags[p0 + s];
    }
    const int own = __syncthreads_or(mine != 0);
    const int partner = __syncthreads_or(theirs != 0);
    if (reports && tid == 0) status[it[0]] = own ? 1 : (partner ? 2 : 0);
    if (own || partner) return;  // the factor keeps its previous statistics
    // The first accepted statistics replace the initial ones.
    const bool first = !(st & ACC_HAS_STATS);
    const float alpha = first ? f.first_alpha : f.alpha;
    const float beta = first ? 0.f : f.beta;
    const int w = min(b, f.d - j * b);
    float* S = blocks + (long long)(f.first_block + j) * b * b;
    const bool diag = tr == tc;
    for (int idx = tid; idx < T * T; idx += blockDim.x) {
        const int r = idx / T, c = idx % T;
        const int R = tr + r, C = tc + c;
        if (diag && c > r) continue;
        float v;
        if (R < w && C < w) {
            float sum = 0.f;
            for (int s = 0; s < ns; ++s) sum += ws[(long long)(s0 + s) * T * T + idx];
            v = alpha * sum;
            if (beta != 0.f) v = fmaf(beta, S[(long long)R * b + C], v);
        } else {
            v = R == C ? 1.f : 0.f;
        }
        tile[r][c] = v;
    }
    __syncthreads();
    // Lower part, rows of the tile; then the mirror, rows of the transposed tile.
    for (int idx = tid; idx < T * T; idx += blockDim.x) {
        const int r = idx / T, c = idx % T;
        if (diag && c > r) continue;
        S[(long long)(tr + r) * b + tc + c] = tile[r][c];
    }
    for (int idx = tid; idx < T * T; idx += blockDim.x) {
        const int c = idx / T, r = idx % T;  // writes S(tc + c, tr + r) = tile(r, c)
        if (diag && c >= r) continue;
        S[(long long)(tc + c) * b + tr + r] = tile[r][c];
    }
}

// A frozen factor's items return at once (uniformly per block, before any barrier): its
// slots and flags are stale, and the finalize never reads them.
__device__ __forceinline__ bool acc_frozen(const AccFactor*, const int* items,
                                           const unsigned char* fstate) {
    return fstate != nullptr && (fstate[items[8 * (long long)blockIdx.x]] & ACC_FROZEN);
}
#define ACC_SIMT(NAME, IN, T, TM, TN)                                                         \
    extern "C" __global__ void __launch_bounds__((T / TM) * (T / TN))                         \
        NAME(const AccFactor* factors, const int* items, int b, float* ws, int* flags,        \
             const unsigned char* fstate) {                                                   \
        if (acc_frozen(factors, items, fstate)) return;                                       \
        acc_partial_simt<IN, T, TM, TN>(factors, items, b, ws, flags);                        \
    }
#define ACC_MMA(NAME, IN, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                        \
        NAME(const AccFactor* factors, const int* items, int b, float* ws, int* flags,        \
             const unsigned char* fstate) {                                                   \
        if (acc_frozen(factors, items, fstate)) return;                                       \
        acc_partial_mma<IN, T>(factors, items, b, ws, flags);                                 \
    }

// T = 64 tiles for b >= 64 (128 threads, 8 x 4 outputs each), T = 32 for b = 32 (64 threads,
// 4 x 4). Tensor cores: 4 warps per tile at both sizes.
ACC_SIMT(acc_partial_t64_f32, float, 64, 8, 4)
ACC_SIMT(acc_partial_t32_f32, float, 32, 4, 4)
ACC_SIMT(acc_partial_t64_f16_simt, thor_f16, 64, 8, 4)
ACC_SIMT(acc_partial_t32_f16_simt, thor_f16, 32, 4, 4)
ACC_SIMT(acc_partial_t64_bf16_simt, thor_bf16, 64, 8, 4)
ACC_SIMT(acc_partial_t32_bf16_simt, thor_bf16, 32, 4, 4)
ACC_MMA(acc_partial_t64_tf32, float, 64)
ACC_MMA(acc_partial_t32_tf32, float, 32)
ACC_MMA(acc_partial_t64_f16, thor_f16, 64)
ACC_MMA(acc_partial_t32_f16, thor_f16, 32)
ACC_MMA(acc_partial_t64_bf16, thor_bf16, 64)
ACC_MMA(acc_partial_t32_bf16, thor_bf16, 32)

extern "C" __global__ void __launch_bounds__(256)
acc_finalize_t64_f32(const AccFactor* factors, const int* items, int b, const float* ws,
                     const int* flags, const unsigned char* fstate, float* blocks, int* status) {
    acc_finalize<64>(factors, items, b, ws, flags, fstate, blocks, status);
}
extern "C" __global__ void __launch_bounds__(256)
acc_finalize_t32_f32(const AccFactor* factors, const int* items, int b, const float* ws,
                     const int* flags, const unsigned char* fstate, float* blocks, int* status) {
    acc_finalize<32>(factors, items, b, ws, flags, fstate, blocks, status);
}

// ---------------------------------------------------------------------------------------
// Block kernels (the second variant of the partial products, b = 64 and 128): one thread
// block per (factor, diagonal block, range of rows) computes the block's whole lower part,
// so each column of X is read once (the tile kernels read a 128-wide block as three 64-wide
// tiles, four column slices). 6 warps, each one warp tile of (b / 2) x (b / 4) on the lower
// part: rows [0, b/2) x columns [0, b/2) by warps 0-1, rows [b/2, b) x all columns by 2-5.
//
// Shared memory holds STAGES stages of R rows of the block's b columns in X's own layout
// (row pitch b + 8 elements), filled by 16-byte cp.async for a matrix factor whose rows are
// 16-byte aligned, element by element otherwise (a convolution's patches, an unaligned
// input, the block's last partial chunk, rows past the range: 0). Both mma operands come
// from the one stage: A = X_j^T and B = X_j, both stored k-major, so 16-bit fragments are
// ldmatrix.trans loads (the row pitch is 16 bytes past a multiple of 128: the eight rows of
// each 8 x 8 matrix hit distinct banks), TF32 fragments scalar loads that the pitch (8 words
// past a multiple of 32) keeps free of bank conflicts. f32 input runs as TF32 (rounded
// once, ~3e-4) or as 3xTF32 (each value split in a TF32 high part and a TF32 remainder, the
// three larger of the four products summed: f32-level error on tensor cores).
//
// Outputs go to the same T x T workspace slots the finalize kernel sums (T = 64): the
// block's live tiles k (in the plan's order (0,0), (64,0), (64,64)) at slot0 + k * stride.
// Work item (8 ints): factor, block j, rows [n0, n1), slot0, stride, 0, 0.
#define ACCB_STAGES 4
#define ACCB_PAD 8
#define ACCB_THREADS 192

// One element of the stage as stored: f32, or the bits of a 16-bit value.
template <typename In>
struct AccbElem {
    typedef unsigned short type;
};
template <>
struct AccbElem<float> {
    typedef float type;
};

template <typename In>
__device__ __forceinline__ typename AccbElem<In>::type accb_load(const In* p) {
    return p->bits;
}
template <>
__device__ __forceinline__ float accb_load<float>(const float* p) {
    return *p;
}
template <typename In>
__device__ __forceinline__ typename AccbElem<In>::type accb_gather(const AccFactor& f, const In* x,
                                                                   const AccRow& r, const AccCol& c) {
    return acc_gather_bits<In>(f, x, r, c);
}
template <>
__device__ __forceinline__ float accb_gather<float>(const AccFactor& f, const float* x,
                                                    const AccRow& r, const AccCol& c) {
    return acc_gather<float>(f, x, r, c);
}

// TF32 high part and remainder of v (3xTF32).
__device__ __forceinline__ void accb_split(float v, unsigned& hi, unsigned& lo) {
    const float h = thor_to_tf32(v);
    hi = __float_as_uint(h);
    lo = __float_as_uint(thor_to_tf32(v - h));
}

template <typename In, int B, bool SPLIT>
__device__ void acc_partial_block(const AccFactor* __restrict__ factors,
                                  const int* __restrict__ items, int b,
                                  float* __restrict__ ws, int* __restrict__ flags) {
    typedef typename AccbElem<In>::type E;
    constexpr int ES = sizeof(E);
    constexpr int R = ES == 4 ? 16 : 32;  // rows per stage: two mma k-steps
    constexpr int KS = ES == 4 ? 8 : 16;  // rows per mma
    constexpr int P = B + ACCB_PAD;       // row pitch, elements
    constexpr int PB = P * ES;            // row pitch, bytes
    constexpr int CH = 16 / ES;           // elements per 16-byte chunk
    constexpr int CPR = B / CH;           // chunks per row
    constexpr int CHUNKS = R * CPR;
    constexpr int STAGE = R * PB;
    constexpr int T = 64;
    constexpr int WM = B / 2, WN = B / 4, MT = WM / 16, NT = WN / 8;
    constexpr int NTILES = (B / T) * (B / T + 1) / 2;
    static_assert(PB % 128 == 16 || ES == 4, "16-bit rows 16 bytes past a multiple of 128");
    static_assert(P % 32 == 8 || ES == 2, "f32 rows 8 words past a multiple of 32");
    static_assert(NT % 2 == 0, "ldmatrix x4 loads two n8 tiles");
    THOR_SHARED(__align__(16) unsigned char, smem, [ACCB_STAGES * STAGE]);
    const int* it = items + 8 * (long long)blockIdx.x;
    const AccFactor f = factors[it[0]];
    const int j = it[1], n0 = it[2], n1 = it[3], slot0 = it[4], stride = it[5];
    const int w = min(B, f.d - j * B);  // real columns of this block
    const long long col0 = (long long)j * B;
    const In* x = reinterpret_cast<const In*>(f.x);
    const int tid = threadIdx.x, warp = tid / THOR_WARP, lane = tid % THOR_WARP;
    const int g = lane >> 2, t = lane & 3;
    const int wm = (warp < 2 ? 0 : 1) * WM, wn = (warp < 2 ? warp : warp - 2) * WN;
    const int tr = wm / T * T, tc = wn / T * T;
    const int tile = (tr / T) * (tr / T + 1) / 2 + tc / T;
    // A warp whose rows or columns are all padding has nothing the finalize reads.
    const bool active = wm < w && wn < w;
    const bool patches = f.kind == ACC_PATCHES;
    const bool fast = !patches && ((f.x | (unsigned long long)(f.ld * ES)) % 16 == 0);
    AccInv inv = {};
    // A patch factor's columns, decoded once per thread block (the divisions by the kernel
    // size), so that each element costs its row's decode (once per chunk) and a lookup.
    THOR_SHARED(AccCol, cols, [B]);
    if (patches) {
        inv = acc_inv(f);
        for (int c = tid; c < B; c += ACCB_THREADS) cols[c] = acc_col(f, (int)col0 + c, c < w);
        __syncthreads();  // uniform: `patches` is the same for the whole block
    }

    auto load = [&](int st, int n) {
        unsigned char* base = smem + st * STAGE;
        for (int c = tid; c < CHUNKS; c += ACCB_THREADS) {
            const int r = c / CPR, cc = c % CPR * CH, row = n + r;
            unsigned char* dst = base + r * PB + cc * ES;
            if (fast && row < n1 && cc + CH <= w) {
                thor_cp_async16(dst, x + (long long)row * f.ld + col0 + cc);
                continue;
            }
            E* e = reinterpret_cast<E*>(dst);
            if (row >= n1 || cc >= w) {
#pragma unroll
                for (int k = 0; k < CH; ++k) e[k] = E(0);
            } else if (patches) {
                const AccRow ar = acc_row(f, inv, row);
#pragma unroll
                for (int k = 0; k < CH; ++k) e[k] = accb_gather<In>(f, x, ar, cols[cc + k]);
            } else {
                const In* xr = x + (long long)row * f.ld + col0 + cc;
#pragma unroll
                for (int k = 0; k < CH; ++k) e[k] = cc + k < w ? accb_load<In>(xr + k) : E(0);
            }
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int q = 0; q < NT; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][q][e] = 0.f;

    auto compute = [&](int st) {
        const unsigned char* base = smem + st * STAGE;
#pragma unroll
        for (int kk = 0; kk < R; kk += KS) {
            if constexpr (ES == 2) {
                unsigned af[MT][4], bf[NT][2];
                const int l8 = lane & 7, mi = lane >> 3;
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    const int k = kk + (mi >> 1) * 8 + l8, m = wm + 16 * i + (mi & 1) * 8;
                    thor_ldmatrix_x4_trans(af[i], base + k * PB + m * ES);
                }
#pragma unroll
                for (int q = 0; q < NT; q += 2) {
                    const int k = kk + (mi & 1) * 8 + l8, nn = wn + 8 * q + (mi >> 1) * 8;
                    unsigned r4[4];
                    thor_ldmatrix_x4_trans(r4, base + k * PB + nn * ES);
                    bf[q][0] = r4[0];
                    bf[q][1] = r4[1];
                    bf[q + 1][0] = r4[2];
                    bf[q + 1][1] = r4[3];
                }
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int q = 0; q < NT; ++q) acc_mma<In>(acc[i][q], af[i], bf[q]);
            } else {
                const float* s = reinterpret_cast<const float*>(base);
                const float* s0 = s + (kk + t) * P;
                const float* s4 = s + (kk + t + 4) * P;
                unsigned ah[MT][4], al[MT][4], bh[NT][2], bl[NT][2];
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    const int m = wm + 16 * i + g;
                    const float v[4] = {s0[m], s0[m + 8], s4[m], s4[m + 8]};
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        if (SPLIT) {
                            accb_split(v[e], ah[i][e], al[i][e]);
                        } else {
                            ah[i][e] = __float_as_uint(thor_to_tf32(v[e]));
                        }
                    }
                }
#pragma unroll
                for (int q = 0; q < NT; ++q) {
                    const int nn = wn + 8 * q + g;
                    const float v[2] = {s0[nn], s4[nn]};
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        if (SPLIT) {
                            accb_split(v[e], bh[q][e], bl[q][e]);
                        } else {
                            bh[q][e] = __float_as_uint(thor_to_tf32(v[e]));
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int q = 0; q < NT; ++q) {
                        if (SPLIT) {  // the small products first
                            thor_mma_tf32(acc[i][q], al[i], bh[q], acc[i][q]);
                            thor_mma_tf32(acc[i][q], ah[i], bl[q], acc[i][q]);
                        }
                        thor_mma_tf32(acc[i][q], ah[i], bh[q], acc[i][q]);
                    }
            }
        }
    };

    // The pipeline: STAGES - 1 stages in flight; before computing stage i, wait for it and
    // pass a barrier (it is then visible to all, and every warp is done with stage i - 1,
    // whose buffer the next load refills). A commit per iteration, empty or not, keeps the
    // group count aligned with the stage count.
    const int nk = (n1 - n0 + R - 1) / R;
#pragma unroll
    for (int s = 0; s < ACCB_STAGES - 1; ++s) {
        if (s < nk) load(s, n0 + s * R);
        thor_cp_async_commit();
    }
    for (int i = 0; i < nk; ++i) {
        thor_cp_async_wait<ACCB_STAGES - 2>();
        __syncthreads();
        const int nx = i + ACCB_STAGES - 1;
        if (nx < nk) load(nx % ACCB_STAGES, n0 + nx * R);
        thor_cp_async_commit();
        if (active) compute(i % ACCB_STAGES);
    }
    thor_cp_async_wait<0>();

    bool bad = false;
    if (active) {
        float* out = ws + (long long)(slot0 + tile * stride) * T * T;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int q = 0; q < NT; ++q)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = wm + 16 * i + g + (e >= 2 ? 8 : 0);
                    const int c = wn + 8 * q + 2 * t + (e & 1);
                    out[(r - tr) * T + (c - tc)] = acc[i][q][e];
                    if (r == c && !acc_finite(acc[i][q][e])) bad = true;
                }
    }
    // One flag per live tile (a tile is live when its first row is a real one).
#pragma unroll
    for (int k = 0; k < NTILES; ++k) {
        const int any = __syncthreads_or(bad && tile == k);
        const int ktr = k == 0 ? 0 : T;  // tiles (0,0), (64,0), (64,64)
        if (tid == 0 && ktr < w) flags[slot0 + k * stride] = any;
    }
}

#define ACC_BLOCK(NAME, IN, B, SPLIT)                                                        \
    extern "C" __global__ void __launch_bounds__(ACCB_THREADS)                                \
        NAME(const AccFactor* factors, const int* items, int b, float* ws, int* flags,        \
             const unsigned char* fstate) {                                                   \
        if (acc_frozen(factors, items, fstate)) return;                                       \
        acc_partial_block<IN, B, SPLIT>(factors, items, b, ws, flags);                        \
    }

ACC_BLOCK(acc_block_b128_tf32, float, 128, false)
ACC_BLOCK(acc_block_b64_tf32, float, 64, false)
ACC_BLOCK(acc_block_b128_f32x3, float, 128, true)
ACC_BLOCK(acc_block_b64_f32x3, float, 64, true)
ACC_BLOCK(acc_block_b128_f16, thor_f16, 128, false)
ACC_BLOCK(acc_block_b64_f16, thor_f16, 64, false)
ACC_BLOCK(acc_block_b128_bf16, thor_bf16, 128, false)
ACC_BLOCK(acc_block_b64_bf16, thor_bf16, 64, false)
