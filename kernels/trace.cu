// Traces of every block and of every factor of a FactorSet, in one launch.
//
// One thread block per factor, 8 warps; warp w takes the factor's blocks w, w + 8, ...,
// each lane summing every 32nd diagonal entry, then a butterfly sum. Per-factor sums are
// combined in a fixed order, so results are deterministic run to run.
#include "common.cuh"

#define TRACE_WARPS 8

// desc: 3 ints per factor: first block, number of blocks, dimension d.
// block_traces[k]: trace of block k, padding included.
// factor_traces[f]: sum of factor f's real diagonal entries (padding excluded).
template <typename T>
__device__ void trace_set(const T* __restrict__ blocks, int b, const int* __restrict__ desc,
                          float* __restrict__ block_traces, float* __restrict__ factor_traces) {
    THOR_SHARED(float, partial, [TRACE_WARPS]);
    const int f = blockIdx.x;
    const int first = desc[3 * f], nblk = desc[3 * f + 1], d = desc[3 * f + 2];
    const int warp = threadIdx.x / THOR_WARP, lane = threadIdx.x % THOR_WARP;
    float real_sum = 0.f;
    for (int k = warp; k < nblk; k += TRACE_WARPS) {
        const T* blk = blocks + (long long)(first + k) * b * b;
        float all = 0.f, real = 0.f;
        for (int i = lane; i < b; i += THOR_WARP) {
            const float v = (float)blk[(long long)i * b + i];
            all += v;
            if (k * b + i < d) real += v;
        }
        all = thor_warp_sum(all);
        real = thor_warp_sum(real);
        if (lane == 0) block_traces[first + k] = all;
        real_sum += real;
    }
    if (lane == 0) partial[warp] = real_sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int w = 0; w < TRACE_WARPS; ++w) s += partial[w];
        factor_traces[f] = s;
    }
}

extern "C" __global__ void __launch_bounds__(TRACE_WARPS * THOR_WARP)
trace_set_f32(const float* blocks, int b, const int* desc, float* block_traces,
              float* factor_traces) {
    trace_set<float>(blocks, b, desc, block_traces, factor_traces);
}
