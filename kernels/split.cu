// Block-diagonal split of a dense factor into padded b x b blocks, and the merge back.
//
// Both are pure copies: one thread block moves one 32 x 32 tile, 32 x 8 threads, each warp
// reading and writing 128 contiguous bytes per row. Bandwidth-bound by design.
#include "common.cuh"

#define SPLIT_TILE 32
#define SPLIT_ROWS 8

// blocks[j][r][c] = dense[j*b + r][j*b + c] inside the factor, identity in the padding.
// Grid: x = nb * (b / 32)^2 tiles, flattened; block: 32 x 8.
template <typename T>
__device__ void split_blocks(const T* __restrict__ dense, long long ld, int d, int b,
                             T* __restrict__ blocks) {
    const int tiles = b / SPLIT_TILE;
    const long long t = blockIdx.x;
    const long long j = t / (tiles * tiles);
    const int tile = (int)(t % (tiles * tiles));
    const int r0 = (tile / tiles) * SPLIT_TILE;
    const int c = (tile % tiles) * SPLIT_TILE + threadIdx.x;
    const long long gc = j * b + c;
    T* out = blocks + j * (long long)b * b;
    for (int rr = threadIdx.y; rr < SPLIT_TILE; rr += SPLIT_ROWS) {
        const int r = r0 + rr;
        const long long gr = j * b + r;
        T v;
        if (gr < d && gc < d) {
            v = dense[gr * ld + gc];
        } else {
            v = (r == c) ? T(1) : T(0);
        }
        out[(long long)r * b + c] = v;
    }
}

// dense[r][c] = block entry when r and c fall in the same diagonal block, 0 otherwise.
// Grid: x = ceil(d/32)^2 tiles of the dense matrix, flattened; block: 32 x 8.
template <typename T>
__device__ void merge_blocks(const T* __restrict__ blocks, int d, int b, T* __restrict__ dense,
                             long long ld) {
    const long long tiles = (d + SPLIT_TILE - 1) / SPLIT_TILE;
    const long long t = blockIdx.x;
    const long long r0 = (t / tiles) * SPLIT_TILE;
    const long long gc = (t % tiles) * SPLIT_TILE + threadIdx.x;
    if (gc >= d) return;
    for (int rr = threadIdx.y; rr < SPLIT_TILE; rr += SPLIT_ROWS) {
        const long long gr = r0 + rr;
        if (gr >= d) break;
        const long long j = gr / b;
        T v = T(0);
        if (gc / b == j) {
            v = blocks[j * (long long)b * b + (gr - j * b) * b + (gc - j * b)];
        }
        dense[gr * ld + gc] = v;
    }
}

extern "C" __global__ void __launch_bounds__(SPLIT_TILE * SPLIT_ROWS)
split_blocks_f32(const float* dense, long long ld, int d, int b, float* blocks) {
    split_blocks<float>(dense, ld, d, b, blocks);
}

extern "C" __global__ void __launch_bounds__(SPLIT_TILE * SPLIT_ROWS)
merge_blocks_f32(const float* blocks, int d, int b, float* dense, long long ld) {
    merge_blocks<float>(blocks, d, b, dense, ld);
}
