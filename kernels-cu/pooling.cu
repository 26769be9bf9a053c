#include "common.cuh"

// Pooling of a ragged batch into one row per sequence, and row scaling.
//
// mean_pool_f32(x, cu_seqlens, out, seqs, width)
//   grid  = (ceil(width / 256), seqs)
//   block = (256)
//   shared: none
//   x: [tokens, width]; cu_seqlens: [seqs + 1] row offsets; out: [seqs, width].
//   out[s] = sum of rows of s / max(len, 1): an empty sequence gives zeros.
//   Each thread owns one column and sums the rows in order, as the CPU
//   backend does (so the result is the same to the bit).
//
// l2_normalize_f32(x, rows, width)
//   grid  = (rows)  (any x ≥ 1 works: blocks stride over rows)
//   block = (256)
//   shared: 8 floats static, no dynamic
//   In place: x[r] = x[r] / max(‖x[r]‖, 1e-12).

#define POOL_THREADS 256

extern "C" __global__ void __launch_bounds__(POOL_THREADS)
    mean_pool_f32(const float* x, const u32* cu_seqlens, float* out, u32 seqs, u32 width) {
    const u32 seq = blockIdx.y;
    const u32 col = blockIdx.x * POOL_THREADS + threadIdx.x;
    if (seq >= seqs || col >= width) {
        return;
    }
    const u32 begin = cu_seqlens[seq];
    const u32 end = cu_seqlens[seq + 1];
    float sum = 0.0f;
    for (u32 r = begin; r < end; r++) {
        sum += x[(u64)r * width + col];
    }
    out[(u64)seq * width + col] = sum / (float)aitl_max(end - begin, 1u);
}

extern "C" __global__ void __launch_bounds__(POOL_THREADS) l2_normalize_f32(float* x, u32 rows, u32 width) {
    __shared__ float scratch[POOL_THREADS / AITL_WARP];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        float* row = x + (u64)r * width;
        float squares = 0.0f;
        for (u32 i = threadIdx.x; i < width; i += POOL_THREADS) {
            squares = fmaf(row[i], row[i], squares);
        }
        // A division, not a reciprocal product, as the CPU backend does.
        const float norm = fmaxf(sqrtf(aitl_block_sum<POOL_THREADS>(squares, scratch)), 1e-12f);
        for (u32 i = threadIdx.x; i < width; i += POOL_THREADS) {
            row[i] = row[i] / norm;
        }
    }
}
