// Layout copies between activations, so no forward pass needs the host.
//
// copy_columns_f32(x, out, rows, width, start, out_width)
//   out[r, c] = x[r, start + c] for c < out_width: one column group of a
//   fused projection (Q, K, V side by side) as its own [rows, out_width]
//   matrix.
//   grid  = (ceil(out_width / 256), any y >= 1: blocks stride over rows),
//   block = 256, no shared memory.
//   x is [rows, width] row-major, start + out_width <= width.
#include "common.cuh"

extern "C" __global__ void copy_columns_f32(const float* x, float* out, u32 rows, u32 width, u32 start,
                                            u32 out_width) {
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= out_width) {
        return;
    }
    for (u32 r = blockIdx.y; r < rows; r += gridDim.y) {
        out[(u64)r * out_width + c] = x[(u64)r * width + start + c];
    }
}
