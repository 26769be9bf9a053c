#include "common.cuh"

// Row normalisations, one block per row.
//
// add_layer_norm_f32(x, residual, gamma, beta, rows, width, eps)
//   grid  = (rows)  (any x ≥ 1 works: blocks stride over rows)
//   block = (256)
//   shared: 8 floats static, no dynamic
//   x, residual: [rows, width]; gamma, beta: [width]; residual nullable.
//   In place: x = LayerNorm(x + residual), as `Device::add_layer_norm`.
//
// rms_norm_f32(x, gamma, out, rows, width, eps)
//   grid  = (rows)  (any x ≥ 1 works)
//   block = (256)
//   shared: 8 floats static, no dynamic
//   out = x · (1 / sqrt(mean(x²) + eps)) · gamma, as `Device::rms_norm`
//   (which sums the squares in f64; f32 partial sums over 256 threads stay
//   within the stated tolerance).
//
// add_rms_norm_f32(h, delta, gamma, out, rows, width, eps)
//   grid, block and shared as rms_norm_f32
//   h += delta (delta nullable: then h is only read), then out = the RMSNorm
//   of h: a decoder layer's residual add and the next norm in one pass.
//   out must not be h.

#define NORM_THREADS 256
// Rows up to 2048 wide stay in registers between passes.
#define NORM_PER_THREAD 8

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    add_layer_norm_f32(float* x, const float* residual, const float* gamma, const float* beta, u32 rows, u32 width,
                       float eps) {
    __shared__ float scratch[NORM_THREADS / AITL_WARP];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        float* row = x + (u64)r * width;
        const float* res = residual != nullptr ? residual + (u64)r * width : nullptr;
        auto load = [&](u32 i) { return res != nullptr ? row[i] + res[i] : row[i]; };
        aitl_layer_norm_row<NORM_THREADS, NORM_PER_THREAD>(load, width, gamma, beta, eps, row, scratch);
    }
}

// One row's RMSNorm: `load(i)` gives element i of the row (once, in index
// order per thread), and `loaded` is where it then lies, for the second
// pass of rows too wide for registers.
template <class Load>
AITL_DEV void rms_norm_row(Load load, const float* loaded, u32 width, const float* gamma, float eps, float* dst,
                           float* scratch) {
    const u32 tid = threadIdx.x;
    if (width <= NORM_THREADS * NORM_PER_THREAD) {
        float v[NORM_PER_THREAD];
        float squares = 0.0f;
#pragma unroll
        for (int j = 0; j < NORM_PER_THREAD; j++) {
            const u32 i = tid + (u32)(j * NORM_THREADS);
            v[j] = i < width ? load(i) : 0.0f;
            squares = fmaf(v[j], v[j], squares);
        }
        const float scale = 1.0f / sqrtf(aitl_block_sum<NORM_THREADS>(squares, scratch) / (float)width + eps);
#pragma unroll
        for (int j = 0; j < NORM_PER_THREAD; j++) {
            const u32 i = tid + (u32)(j * NORM_THREADS);
            if (i < width) {
                dst[i] = v[j] * scale * gamma[i];
            }
        }
    } else {
        float squares = 0.0f;
        for (u32 i = tid; i < width; i += NORM_THREADS) {
            const float v = load(i);
            squares = fmaf(v, v, squares);
        }
        const float scale = 1.0f / sqrtf(aitl_block_sum<NORM_THREADS>(squares, scratch) / (float)width + eps);
        for (u32 i = tid; i < width; i += NORM_THREADS) {
            dst[i] = loaded[i] * scale * gamma[i];
        }
    }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    rms_norm_f32(const float* x, const float* gamma, float* out, u32 rows, u32 width, float eps) {
    __shared__ float scratch[NORM_THREADS / AITL_WARP];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = x + (u64)r * width;
        rms_norm_row([&](u32 i) { return row[i]; }, row, width, gamma, eps, out + (u64)r * width, scratch);
    }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    add_rms_norm_f32(float* h, const float* delta, const float* gamma, float* out, u32 rows, u32 width, float eps) {
    __shared__ float scratch[NORM_THREADS / AITL_WARP];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        float* row = h + (u64)r * width;
        const float* add = delta != nullptr ? delta + (u64)r * width : nullptr;
        auto load = [&](u32 i) {
            if (add == nullptr) {
                return row[i];
            }
            const float v = row[i] + add[i];
            row[i] = v;
            return v;
        };
        rms_norm_row(load, row, width, gamma, eps, out + (u64)r * width, scratch);
    }
}
