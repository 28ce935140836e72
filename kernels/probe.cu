// Probes of the hardware primitives the next kernels build on (cp.async, ldmatrix): small
// kernels whose results are known exactly, run by the emulator tests (tests/emulated.rs)
// and by the GPU tests (tests/gpu/probe.rs) against the same expectation, so the emulator's
// model of a primitive is checked against the hardware wherever there is a GPU. No op of
// the library launches them.
#include "common.cuh"

#define PROBE_THREADS 64
#define PROBE_TILE (PROBE_THREADS * 4)  // floats per stage: 16 bytes per thread

// A two-stage cp.async pipeline: tile t + 1 is in flight while tile t is read. Thread i
// copies floats 4i .. 4i + 3 of a tile and, after the wait and a barrier, writes out the
// floats another thread copied: out[t * TILE + j] = in[t * TILE + (j + 5) % TILE]. With
// `wait` 0 the wait before the read is left out, with `wait` 2 the read is of the stage
// still in flight (tile t + 1): the emulator then reads poison, which shows it lands a copy
// no earlier than its wait; on a GPU both are races, so the GPU tests pass 1.
extern "C" __global__ void __launch_bounds__(PROBE_THREADS)
probe_cp_async_f32(const float* __restrict__ in, float* __restrict__ out, int tiles, int wait) {
    THOR_SHARED(__align__(16) float, stage, [2][PROBE_TILE]);
    const int i = threadIdx.x;
    if (tiles > 0) thor_cp_async16(&stage[0][4 * i], in + 4 * i);
    thor_cp_async_commit();
    for (int t = 0; t < tiles; ++t) {
        if (t + 1 < tiles) thor_cp_async16(&stage[(t + 1) & 1][4 * i], in + (long long)(t + 1) * PROBE_TILE + 4 * i);
        thor_cp_async_commit();
        if (wait) thor_cp_async_wait<1>();
        __syncthreads();
        for (int k = 0; k < 4; ++k) {
            const int j = 4 * i + k;
            out[(long long)t * PROBE_TILE + j] = stage[(wait == 2 ? t + 1 : t) & 1][(j + 5) % PROBE_TILE];
        }
        __syncthreads();
    }
    thor_cp_async_wait<0>();
}

// ldmatrix on a 16 x 16 tile of 16-bit elements (row-major, `tile`), staged in shared
// memory: lane l points at row (l % 8) + 8 ((l / 8) % 2), column 8 (l / 16), so the four
// matrices are the tile's quarters top-left, bottom-left, top-right, bottom-right (the
// m16n8k16 A fragment order). out[4 l + i] = register i of lane l. One warp.
extern "C" __global__ void __launch_bounds__(THOR_WARP)
probe_ldmatrix_b16(const unsigned short* __restrict__ tile, unsigned* __restrict__ out, int trans) {
    THOR_SHARED(__align__(16) unsigned short, s, [16 * 16]);
    const int l = threadIdx.x;
    for (int k = l; k < 16 * 16; k += THOR_WARP) s[k] = tile[k];
    __syncwarp();
    const unsigned short* row = &s[((l % 8) + 8 * ((l / 8) % 2)) * 16 + 8 * (l / 16)];
    unsigned r[4];
    if (trans)
        thor_ldmatrix_x4_trans(r, row);
    else
        thor_ldmatrix_x4(r, row);
    for (int i = 0; i < 4; ++i) out[4 * l + i] = r[i];
}
