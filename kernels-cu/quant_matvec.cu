#include "common.cuh"

// Decoding's products with ggml's block-quantized weights, read in place
// (the layouts of `backend::quant`). As the CPU backend and llama.cpp do,
// activations are first quantized per block to 8 bits (Q8_1 for Q4_0,
// Q4_1 and Q8_0 weights; Q8_K for the K-quants), so each block product is
// an exact integer sum (dp4a) and only the float sum over blocks differs
// from `quant::vec_dot_portable`. F32, F16 and BF16 weights read f32
// activations as they are.
//
// quantize_q8_1_f32(x, q, d, s, blocks)
//   grid  = (ceil(blocks / 8)), block = (256): one warp per 32 values
//   x: [blocks · 32] f32 (rows of k, k a multiple of 32: blocks = rows · k/32)
//   q: [blocks · 32] i8; d, s: [blocks] f32, f16-rounded as ggml stores them
//   Bit for bit `quant::quantize_activations(Q4_0 | Q4_1 | Q8_0, row)`.
//
// quantize_q8_k_f32(x, q, d, bsums, blocks)
//   grid  = (ceil(blocks / 8)), block = (256): one warp per 256 values
//   q: [blocks · 256] i8; d: [blocks] f32; bsums: [blocks · 16] i16
//   Bit for bit `quant::quantize_activations(Q4_K | Q5_K | Q6_K, row)`.
//
// matvec_{f32,f16,bf16,q4_0,q4_1,q8_0,q4_k,q5_k,q6_k}(w, expert_bytes, groups, x, xq, xd, aux, row_scale,
//                                                       out, n, k, rows)
//   grid  = (ceil(n / 4), group count), block = (128): a warp per output column j
//   w: n weight rows of k values each (`QuantMatrix`'s layout), or with
//      `groups` a stack of such matrices, `expert_bytes` apart
//   groups: nullable. Null: activation rows share the matrix, 8 per group
//      (grid y = ceil(rows / 8)), so each weight block is read once for all
//      of a group's rows. Otherwise [grid y · 3] u32, per group the matrix
//      (expert), its first activation row and its row count (0..8; 0 is a
//      padding group that does nothing): mixture-of-experts, where each
//      group is some of one expert's tokens (`moe_plan_f32` builds them).
//   x: [rows, k] f32 (F32/F16/BF16 weights); xq, xd: the activations'
//      quants and scales (quantized types); aux: Q4_1's `s` (f32) or the
//      K-quants' `bsums` (i16), else unused
//   row_scale: nullable [rows]; multiplies each row's results (a routing
//      weight applied in the product's epilogue)
//   out: [rows, n] f32
//   grid y ≤ 65535.

#define MV_THREADS 128
#define MV_WARPS (MV_THREADS / AITL_WARP)
// Activation rows sharing one read of the weights.
#define MV_GROUP 8

// Little-endian loads of 2-byte-aligned data: Q4_0, Q8_0 and Q6_K blocks
// (18, 34 and 210 bytes) keep only that alignment.
AITL_DEV u32 load_u16(const u8* p) { return *(const u16*)p; }

AITL_DEV i32 load_u32_from_u16s(const u8* p) { return (i32)(load_u16(p) | (load_u16(p + 2) << 16)); }

AITL_DEV float f16_at(const u8* p) { return aitl_f16_to_f32((u16)load_u16(p)); }

AITL_DEV float round_f16(float x) { return aitl_f16_to_f32(aitl_f32_to_f16(x)); }

AITL_DEV float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(AITL_FULL_MASK, v, offset));
    }
    return v;
}

AITL_DEV i32 warp_sum_i32(i32 v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(AITL_FULL_MASK, v, offset);
    }
    return v;
}

extern "C" __global__ void __launch_bounds__(256)
    quantize_q8_1_f32(const float* x, i8* q, float* d, float* s, u32 blocks) {
    const u32 lane = threadIdx.x % AITL_WARP;
    const u32 block = blockIdx.x * (256 / AITL_WARP) + threadIdx.x / AITL_WARP;
    if (block >= blocks) {
        return;
    }
    const float v = x[(u64)block * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const float scale = amax / 127.0f;
    const float inverse = amax != 0.0f ? 127.0f / amax : 0.0f;
    const i32 quant = __float2int_rn(v * inverse);
    q[(u64)block * 32 + lane] = (i8)quant;
    const i32 sum = warp_sum_i32(quant);
    if (lane == 0) {
        d[block] = round_f16(scale);
        s[block] = round_f16((float)sum * scale);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    quantize_q8_k_f32(const float* x, i8* q, float* d, i16* bsums, u32 blocks) {
    const u32 lane = threadIdx.x % AITL_WARP;
    const u32 block = blockIdx.x * (256 / AITL_WARP) + threadIdx.x / AITL_WARP;
    if (block >= blocks) {
        return;
    }
    const float* values = x + (u64)block * 256 + lane * 8;
    float v[8];
    // The value of largest magnitude, with its sign; the first one on ties.
    float best = 0.0f;
    u32 at = 0xffffffffu;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        v[i] = values[i];
        if (fabsf(v[i]) > fabsf(best)) {
            best = v[i];
            at = lane * 8 + (u32)i;
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(AITL_FULL_MASK, best, offset);
        const u32 other_at = __shfl_xor_sync(AITL_FULL_MASK, at, offset);
        if (fabsf(other) > fabsf(best) || (fabsf(other) == fabsf(best) && other_at < at)) {
            best = other;
            at = other_at;
        }
    }
    i8* quants = q + (u64)block * 256 + lane * 8;
    i32 sum = 0;
    if (best == 0.0f) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            quants[i] = 0;
        }
    } else {
        const float inverse = -127.0f / best;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const i32 quant = aitl_min(__float2int_rn(inverse * v[i]), 127);
            quants[i] = (i8)quant;
            sum += quant;
        }
    }
    // Each 16 quants' sum: this lane's 8 and its odd neighbour's.
    const i32 neighbour = __shfl_down_sync(AITL_FULL_MASK, sum, 1);
    if (lane % 2 == 0) {
        bsums[(u64)block * 16 + lane / 2] = (i16)(sum + neighbour);
    }
    if (lane == 0) {
        d[block] = best == 0.0f ? 0.0f : 1.0f / (-127.0f / best);
    }
}

// One warp's column: `Dot` adds row `first + r`'s partial products over the
// lane's share of the weight row into acc[r] (r < count), then the warp
// sums them.
struct Activations {
    const float* x;
    const i8* xq;
    const float* xd;
    const void* aux;
    u32 k;
};

template <class Dot>
AITL_DEV void matvec(const u8* w, u64 expert_bytes, const u32* groups, const Activations& a, const float* row_scale,
                     float* out, u32 n, u32 rows, u64 row_bytes) {
    const u32 lane = threadIdx.x % AITL_WARP;
    const u32 j = blockIdx.x * MV_WARPS + threadIdx.x / AITL_WARP;
    u32 first = blockIdx.y * MV_GROUP;
    u32 count = first < rows ? aitl_min((u32)MV_GROUP, rows - first) : 0u;
    const u8* matrix = w;
    if (groups != nullptr) {
        const u32* group = groups + (u64)blockIdx.y * 3;
        matrix = w + (u64)group[0] * expert_bytes;
        first = group[1];
        count = aitl_min(group[2], (u32)MV_GROUP);
    }
    // Warp-uniform: a whole warp leaves together (no block barrier follows).
    if (j >= n || count == 0) {
        return;
    }
    float acc[MV_GROUP];
#pragma unroll
    for (int r = 0; r < MV_GROUP; r++) {
        acc[r] = 0.0f;
    }
    Dot::run(matrix + (u64)j * row_bytes, a, first, count, lane, acc);
#pragma unroll
    for (int r = 0; r < MV_GROUP; r++) {
        if ((u32)r < count) {
            const float total = aitl_warp_sum(acc[r]);
            if (lane == 0) {
                const u32 row = first + (u32)r;
                out[(u64)row * n + j] = row_scale != nullptr ? total * row_scale[row] : total;
            }
        }
    }
}

// ---- unquantized weights: f32 activations ------------------------------------

template <int KIND>  // 0 f32, 1 f16, 2 bf16
struct DotPlain {
    static AITL_DEV float weight(const u8* row, u32 i) {
        if (KIND == 0) {
            return ((const float*)row)[i];
        }
        const u16 h = ((const u16*)row)[i];
        return KIND == 1 ? aitl_f16_to_f32(h) : aitl_bf16_to_f32(h);
    }

    static AITL_DEV void run(const u8* row, const Activations& a, u32 first, u32 count, u32 lane, float* acc) {
        for (u32 i = lane; i < a.k; i += AITL_WARP) {
            const float wi = weight(row, i);
#pragma unroll
            for (int r = 0; r < MV_GROUP; r++) {
                if ((u32)r < count) {
                    acc[r] = fmaf(wi, a.x[(u64)(first + r) * a.k + i], acc[r]);
                }
            }
        }
    }
};

// ---- 32-value blocks: a lane per block -----------------------------------------

// TYPE: 0 Q4_0 (18 bytes: d, 16 bytes of nibbles), 1 Q4_1 (20: d, m,
// nibbles), 2 Q8_0 (34: d, 32 × i8). Nibble byte j holds value j (low) and
// value j + 16 (high).
template <int TYPE>
struct Dot32 {
    static constexpr u32 BYTES = TYPE == 0 ? 18 : TYPE == 1 ? 20 : 34;

    static AITL_DEV void run(const u8* row, const Activations& a, u32 first, u32 count, u32 lane, float* acc) {
        const u32 blocks = a.k / 32;
        for (u32 b = lane; b < blocks; b += AITL_WARP) {
            const u8* block = row + (u64)b * BYTES;
            const float dw = f16_at(block);
            // The weights' quants as 8 words of 4 bytes, values 0..31 in order.
            i32 wq[8];
            if (TYPE == 2) {
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    wq[i] = load_u32_from_u16s(block + 2 + 4 * i);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const u32 word = TYPE == 0 ? (u32)load_u32_from_u16s(block + 2 + 4 * i)
                                               : ((const u32*)(block + 4))[i];
                    wq[i] = (i32)(word & 0x0f0f0f0fu);
                    wq[4 + i] = (i32)((word >> 4) & 0x0f0f0f0fu);
                }
            }
#pragma unroll
            for (int r = 0; r < MV_GROUP; r++) {
                if ((u32)r < count) {
                    const u64 at = (u64)(first + r) * (a.k / 32) + b;
                    const i32* xq = (const i32*)(a.xq + at * 32);
                    i32 sumi = 0;
                    i32 sumx = 0;
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        const i32 xi = xq[i];
                        sumi = __dp4a(wq[i], xi, sumi);
                        if (TYPE == 0) {
                            sumx = __dp4a(0x01010101, xi, sumx);
                        }
                    }
                    if (TYPE == 0) {
                        // (q − 8)·x summed: the offset comes out of the sum.
                        sumi -= 8 * sumx;
                    }
                    float term = dw * a.xd[at] * (float)sumi;
                    if (TYPE == 1) {
                        term += f16_at(block + 2) * ((const float*)a.aux)[at];
                    }
                    acc[r] += term;
                }
            }
        }
    }
};

// ---- 256-value K-quant blocks: 16 lanes per block, 16 values each ---------------

// The 6-bit scale and min of sub-block j of a Q4_K/Q5_K block.
AITL_DEV void scale_min_k4(u32 j, const u8* scales, u32* scale, u32* min) {
    if (j < 4) {
        *scale = scales[j] & 63u;
        *min = scales[j + 4] & 63u;
    } else {
        *scale = (scales[j + 4] & 0xfu) | ((scales[j - 4] >> 6) << 4);
        *min = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
    }
}

// TYPE: 0 Q4_K (144 bytes: d, dmin, 12 bytes of scales, 128 of nibbles),
// 1 Q5_K (176: as Q4_K with 32 bytes of fifth bits before the nibbles),
// 2 Q6_K (210: 128 low nibbles, 64 two-bit highs, 16 × i8 scales, d).
// Lane t of a half-warp takes values 16t..16t+15 of its block, which share
// one scale (and one Q8_K partial sum, bsums[t]).
template <int TYPE>
struct DotK {
    static constexpr u32 BYTES = TYPE == 0 ? 144 : TYPE == 1 ? 176 : 210;

    static AITL_DEV void run(const u8* row, const Activations& a, u32 first, u32 count, u32 lane, float* acc) {
        const u32 blocks = a.k / 256;
        const u32 t = lane % 16;
        const i16* bsums = (const i16*)a.aux;
        for (u32 b = lane / 16; b < blocks; b += 2) {
            const u8* block = row + (u64)b * BYTES;
            i32 wq[4];
            float weight_scale;
            float min_scale = 0.0f;
            i32 offset = 0;
            if (TYPE == 2) {
                const u32 half = t / 8;
                const u32 j0 = (t % 8) * 16;
                const u32 quarter = j0 / 32;
                const u32 l0 = j0 % 32;
                const u8* ql = block + half * 64 + l0 + (quarter & 1u) * 32;
                const u8* qh = block + 128 + half * 32 + l0;
                const u32 low_shift = (quarter >> 1) * 4;
                const u32 high_shift = 2 * quarter;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const u32 low = (u32)load_u32_from_u16s(ql + 4 * i);
                    const u32 high = (u32)load_u32_from_u16s(qh + 4 * i);
                    wq[i] = (i32)(((low >> low_shift) & 0x0f0f0f0fu) | (((high >> high_shift) & 0x03030303u) << 4));
                }
                const i8 scale = (i8)block[192 + half * 8 + quarter * 2 + l0 / 16];
                weight_scale = f16_at(block + 208) * (float)scale;
                offset = 32;  // quants are stored + 32
            } else {
                const u32 sub = t / 2;
                const u32 chunk = sub / 2;
                const u32 shift = (sub % 2) * 4;
                const u32 l0 = (t % 2) * 16;
                const u8* qs = block + (TYPE == 1 ? 48 : 16) + chunk * 32 + l0;
                u32 scale, min;
                scale_min_k4(sub, block + 4, &scale, &min);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    u32 quants = (((const u32*)qs)[i] >> shift) & 0x0f0f0f0fu;
                    if (TYPE == 1) {
                        const u32 fifth = ((const u32*)(block + 16 + l0))[i];
                        quants |= ((fifth >> sub) & 0x01010101u) << 4;
                    }
                    wq[i] = (i32)quants;
                }
                weight_scale = f16_at(block) * (float)scale;
                min_scale = f16_at(block + 2) * (float)min;
            }
#pragma unroll
            for (int r = 0; r < MV_GROUP; r++) {
                if ((u32)r < count) {
                    const u64 at = (u64)(first + r) * (a.k / 256) + b;
                    const i32* xq = (const i32*)(a.xq + at * 256 + t * 16);
                    i32 sumi = 0;
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        sumi = __dp4a(wq[i], xq[i], sumi);
                    }
                    const i32 bsum = bsums[at * 16 + t];
                    sumi -= offset * bsum;
                    float term = weight_scale * (float)sumi;
                    if (TYPE != 2) {
                        term -= min_scale * (float)bsum;
                    }
                    acc[r] = fmaf(a.xd[at], term, acc[r]);
                }
            }
        }
    }
};

#define AITL_MATVEC(name, Dot, bytes_per_row)                                                                         \
    extern "C" __global__ void __launch_bounds__(MV_THREADS)                                                        \
        name(const u8* w, u64 expert_bytes, const u32* groups,  const float* x, const i8* xq, const float* xd,      \
             const void* aux, const float* row_scale, float* out, u32 n, u32 k, u32 rows) {                         \
        const Activations a = {x, xq, xd, aux, k};                                                                  \
        matvec<Dot>(w, expert_bytes, groups, a, row_scale, out, n, rows, (bytes_per_row));                          \
    }

AITL_MATVEC(matvec_f32, DotPlain<0>, (u64)k * 4)
AITL_MATVEC(matvec_f16, DotPlain<1>, (u64)k * 2)
AITL_MATVEC(matvec_bf16, DotPlain<2>, (u64)k * 2)
AITL_MATVEC(matvec_q4_0, Dot32<0>, (u64)(k / 32) * 18)
AITL_MATVEC(matvec_q4_1, Dot32<1>, (u64)(k / 32) * 20)
AITL_MATVEC(matvec_q8_0, Dot32<2>, (u64)(k / 32) * 34)
AITL_MATVEC(matvec_q4_k, DotK<0>, (u64)(k / 256) * 144)
AITL_MATVEC(matvec_q5_k, DotK<1>, (u64)(k / 256) * 176)
AITL_MATVEC(matvec_q6_k, DotK<2>, (u64)(k / 256) * 210)
