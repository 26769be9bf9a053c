#include "common.cuh"

// ggml's block formats expanded to f32 or bf16, value by value, bit for bit
// `quant::dequantize_row` (products use __fmul_rn so no multiply-add is
// fused where the CPU rounds twice): a decoder's token embeddings (rows by
// id) and a prompt's weights as bf16 tiles for tensor-core products.
//
// dequantize_{f32,f16,bf16,q4_0,q4_1,q8_0,q4_k,q5_k,q6_k}(w, ids, out, out_bf16, count, k)
//   grid  = (ceil(k / 256), any y ≤ 65535: blocks stride over the rows),
//   block = (256): a thread per value
//   w: weight rows of k values (`QuantMatrix`'s layout)
//   ids: nullable [count] u32, the rows to expand (null: rows 0..count)
//   out: [count, k], f32 (out_bf16 = 0) or bf16 bits (1)

AITL_DEV u32 load_u16_at(const u8* p) { return *(const u16*)p; }

AITL_DEV float half_at(const u8* p) { return aitl_f16_to_f32((u16)load_u16_at(p)); }

AITL_DEV void k4_scale_min(u32 j, const u8* scales, u32* scale, u32* min) {
    if (j < 4) {
        *scale = scales[j] & 63u;
        *min = scales[j + 4] & 63u;
    } else {
        *scale = (scales[j + 4] & 0xfu) | ((scales[j - 4] >> 6) << 4);
        *min = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
    }
}

// Value i of a row. TYPE: 0 f32, 1 f16, 2 bf16, 3 Q4_0, 4 Q4_1, 5 Q8_0,
// 6 Q4_K, 7 Q5_K, 8 Q6_K.
template <int TYPE>
AITL_DEV float value_at(const u8* row, u32 i) {
    if (TYPE == 0) {
        return ((const float*)row)[i];
    }
    if (TYPE == 1) {
        return aitl_f16_to_f32(((const u16*)row)[i]);
    }
    if (TYPE == 2) {
        return aitl_bf16_to_f32(((const u16*)row)[i]);
    }
    if (TYPE == 3 || TYPE == 4) {
        const u8* block = row + (u64)(i / 32) * (TYPE == 3 ? 18 : 20);
        const u32 j = i % 32;
        const u8 byte = block[(TYPE == 3 ? 2 : 4) + j % 16];
        const u32 q = j < 16 ? byte & 0xfu : byte >> 4;
        // Q4_0 adds a minimum of 0 as the CPU does, so −0 becomes +0 there too.
        const float offset = TYPE == 3 ? 8.0f : 0.0f;
        const float min = TYPE == 3 ? 0.0f : half_at(block + 2);
        return __fmul_rn((float)q - offset, half_at(block)) + min;
    }
    if (TYPE == 5) {
        const u8* block = row + (u64)(i / 32) * 34;
        return __fmul_rn((float)(i8)block[2 + i % 32], half_at(block));
    }
    if (TYPE == 6 || TYPE == 7) {
        const u8* block = row + (u64)(i / 256) * (TYPE == 6 ? 144 : 176);
        const u32 j = i % 256;
        const u32 chunk = j / 64;
        const u32 half = (j % 64) / 32;
        const u32 l = j % 32;
        const u32 sub = chunk * 2 + half;
        u32 sc, m;
        k4_scale_min(sub, block + 4, &sc, &m);
        const u8 byte = block[(TYPE == 6 ? 16 : 48) + chunk * 32 + l];
        u32 q = half == 0 ? byte & 0xfu : byte >> 4;
        if (TYPE == 7) {
            q += ((block[16 + l] >> sub) & 1u) << 4;
        }
        const float scale = __fmul_rn(half_at(block), (float)sc);
        const float min = __fmul_rn(half_at(block + 2), (float)m);
        return __fmul_rn(scale, (float)q) - min;
    }
    const u8* block = row + (u64)(i / 256) * 210;
    const u32 j = i % 256;
    const u32 half = j / 128;
    const u32 quarter = (j % 128) / 32;
    const u32 l = j % 32;
    const u32 low = (block[half * 64 + l + (quarter & 1u) * 32] >> ((quarter >> 1) * 4)) & 0xfu;
    const u32 high = (block[128 + half * 32 + l] >> (2 * quarter)) & 3u;
    const i32 q = (i32)(low | (high << 4)) - 32;
    const i8 scale = (i8)block[192 + half * 8 + l / 16 + 2 * quarter];
    return __fmul_rn(__fmul_rn(half_at(block + 208), (float)scale), (float)q);
}

template <int TYPE>
AITL_DEV void dequantize(const u8* w, const u32* ids, void* out, u32 out_bf16, u32 count, u32 k, u64 row_bytes) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= k) {
        return;
    }
    for (u32 r = blockIdx.y; r < count; r += gridDim.y) {
        const u64 source = ids != nullptr ? ids[r] : r;
        const float v = value_at<TYPE>(w + source * row_bytes, i);
        if (out_bf16 != 0) {
            ((u16*)out)[(u64)r * k + i] = aitl_f32_to_bf16(v);
        } else {
            ((float*)out)[(u64)r * k + i] = v;
        }
    }
}

#define AITL_DEQUANTIZE(name, TYPE, bytes_per_row)                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                      \
        name(const u8* w, const u32* ids, void* out, u32 out_bf16, u32 count, u32 k) {                     \
        dequantize<TYPE>(w, ids, out, out_bf16, count, k, (bytes_per_row));                                 \
    }

AITL_DEQUANTIZE(dequantize_f32, 0, (u64)k * 4)
AITL_DEQUANTIZE(dequantize_f16, 1, (u64)k * 2)
AITL_DEQUANTIZE(dequantize_bf16, 2, (u64)k * 2)
AITL_DEQUANTIZE(dequantize_q4_0, 3, (u64)(k / 32) * 18)
AITL_DEQUANTIZE(dequantize_q4_1, 4, (u64)(k / 32) * 20)
AITL_DEQUANTIZE(dequantize_q8_0, 5, (u64)(k / 32) * 34)
AITL_DEQUANTIZE(dequantize_q4_k, 6, (u64)(k / 256) * 144)
AITL_DEQUANTIZE(dequantize_q5_k, 7, (u64)(k / 256) * 176)
AITL_DEQUANTIZE(dequantize_q6_k, 8, (u64)(k / 256) * 210)
