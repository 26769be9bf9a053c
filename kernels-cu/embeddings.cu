#include "common.cuh"

// Embedding lookups.
//
// embed_layer_norm_f32(ids, table, ids1, table1, ids2, table2, gamma, beta, out, tokens, width, eps)
//   grid  = (tokens)  (any x ≥ 1 works: blocks stride over rows)
//   block = (256)
//   shared: 8 floats static, no dynamic
//   table* are [vocab*, width]; ids* are [tokens] and already validated by
//   the host. (ids1, table1) and (ids2, table2) are each nullable as a pair.
//   out[t] = LayerNorm(table[ids[t]] + table1[ids1[t]] + table2[ids2[t]]),
//   summed in that order, as `Device::embed` then `add_layer_norm` do.
//
// gather_rows_f32(x, rows, out, count, width)
//   grid  = (count)   (any x ≥ 1 works)
//   block = (256)
//   shared: none
//   out[i] = x[rows[i]] for [_, width] matrices: embedding lookups, CLS and
//   last-row gathers, row slices.

#define EMBED_THREADS 256
// Rows up to 2048 wide stay in registers between the LayerNorm passes.
#define EMBED_PER_THREAD 8

extern "C" __global__ void __launch_bounds__(EMBED_THREADS)
    embed_layer_norm_f32(const u32* ids, const float* table, const u32* ids1, const float* table1, const u32* ids2,
                         const float* table2, const float* gamma, const float* beta, float* out, u32 tokens, u32 width,
                         float eps) {
    __shared__ float scratch[EMBED_THREADS / AITL_WARP];
    for (u32 t = blockIdx.x; t < tokens; t += gridDim.x) {
        const float* row = table + (u64)ids[t] * width;
        const float* row1 = table1 != nullptr ? table1 + (u64)ids1[t] * width : nullptr;
        const float* row2 = table2 != nullptr ? table2 + (u64)ids2[t] * width : nullptr;
        auto load = [&](u32 i) {
            float v = row[i];
            if (row1 != nullptr) {
                v += row1[i];
            }
            if (row2 != nullptr) {
                v += row2[i];
            }
            return v;
        };
        aitl_layer_norm_row<EMBED_THREADS, EMBED_PER_THREAD>(load, width, gamma, beta, eps, out + (u64)t * width,
                                                             scratch);
    }
}

extern "C" __global__ void __launch_bounds__(EMBED_THREADS)
    gather_rows_f32(const float* x, const u32* rows, float* out, u32 count, u32 width) {
    for (u32 r = blockIdx.x; r < count; r += gridDim.x) {
        const float* src = x + (u64)rows[r] * width;
        float* dst = out + (u64)r * width;
        for (u32 i = threadIdx.x; i < width; i += EMBED_THREADS) {
            dst[i] = src[i];
        }
    }
}
