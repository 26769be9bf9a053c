#include "common.cuh"

// Elementwise ops: matmul epilogues, adds and dtype conversions.
//
// Every kernel here is a grid-stride loop:
//   grid  = (any x ≥ 1; ceil(elements / 256) covers it in one pass, a
//            capped grid loops)
//   block = (256)  (any multiple of 32 works)
//   shared: none
//
// bias_act_f32(x, bias, rows, cols, act)
//   x: [rows, cols] in place; bias: [cols], nullable.
//   x[r, c] = act(x[r, c] + bias[c]); act 0 identity, 1 exact GELU
//   0.5·x·(1 + erf(x/√2)), 2 tanh, 3 sigmoid; other values act as identity.
// add_f32(x, y, n)                   x += y
// f32_to_bf16(x, out, n)             round to nearest even, NaN stays NaN
// bf16_to_f32(x, out, n)             exact
// f32_to_f16(x, out, n)              round to nearest even, overflow to ±inf
// f16_to_f32(x, out, n)              exact, subnormals included

#define ACT_IDENTITY 0u
#define ACT_GELU 1u
#define ACT_TANH 2u
#define ACT_SIGMOID 3u

// Indices in 64 bits: rows · cols may pass 2³² for a large batch.
#define GRID_STRIDE(i, count) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (count); i += (u64)blockDim.x * gridDim.x)

AITL_DEV float activate(float v, u32 act) {
    switch (act) {
        case ACT_GELU:
            return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
        case ACT_TANH:
            return tanhf(v);
        case ACT_SIGMOID:
            return 1.0f / (1.0f + expf(-v));
        default:
            return v;
    }
}

extern "C" __global__ void bias_act_f32(float* x, const float* bias, u32 rows, u32 cols, u32 act) {
    GRID_STRIDE(i, (u64)rows * cols) {
        float v = x[i];
        if (bias != nullptr) {
            v += bias[i % cols];
        }
        x[i] = activate(v, act);
    }
}

extern "C" __global__ void add_f32(float* x, const float* y, u32 n) {
    GRID_STRIDE(i, (u64)n) { x[i] += y[i]; }
}

extern "C" __global__ void f32_to_bf16(const float* x, u16* out, u32 n) {
    GRID_STRIDE(i, (u64)n) { out[i] = aitl_f32_to_bf16(x[i]); }
}

extern "C" __global__ void bf16_to_f32(const u16* x, float* out, u32 n) {
    GRID_STRIDE(i, (u64)n) { out[i] = aitl_bf16_to_f32(x[i]); }
}

extern "C" __global__ void f32_to_f16(const float* x, u16* out, u32 n) {
    GRID_STRIDE(i, (u64)n) { out[i] = aitl_f32_to_f16(x[i]); }
}

extern "C" __global__ void f16_to_f32(const u16* x, float* out, u32 n) {
    GRID_STRIDE(i, (u64)n) { out[i] = aitl_f16_to_f32(x[i]); }
}
