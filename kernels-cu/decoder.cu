#include "common.cuh"

// The decoder's per-token ops (Llama family): rotary embeddings, SwiGLU's
// gate, the paged KV cache and attention over it. The CPU definitions they
// follow are `backend::cpu_decode` (ggml's).
//
// rope_f32(x, positions, rows, heads, head_dim, step, neox)
//   grid  = (any; grid-stride over rows · heads · head_dim/2), block = (256)
//   x: [rows, heads · head_dim], in place; positions: [rows]
//   step = base^(−2/head_dim) from the host; pair i turns by position · stepⁱ,
//   the power multiplied up in f32 as the CPU does. neox = 0: adjacent
//   pairs (2i, 2i+1, GGUF's permuted Q/K); 1: halves (i, i + head_dim/2).
//
// silu_mul_f32(gate, up, n)
//   grid  = (any; grid-stride), block = (256)
//   gate ← gate / (1 + e^−gate) · up, in place.
//
// kv_append_{f16,bf16}(k, v, slots, k_cache, v_cache, rows, width)
//   grid  = (any; grid-stride over rows · width), block = (256)
//   k, v: [rows, width] f32 (width = kv_heads · head_dim), the step's new keys
//   and values; slots: [rows], each row's place in the cache (its page ·
//   page_size + its offset in the page, from the sequence's block table);
//   k_cache, v_cache: [pages · page_size, width] as f16 or bf16 bits.
//
// paged_attention_f32_d{16,32,64,128}(q, k_cache, v_cache, block_tables, items, out, partials, count, heads,
//                                    kv_heads, max_pages, page_size, splits, keys_per_split, scale, bf16)
//   grid  = (kv_heads, count, splits), block = (128)
//   shared: static, 4 · 8 · (D + 2) floats (16.6 KiB at D = 128); no dynamic
//   Causal grouped-query attention of `count` query rows ("items") over a
//   paged cache: item i is [seq, visible] in `items` ([count · 2] u32), its
//   query row q[i] ([count, heads · D]) sees positions 0..visible of
//   sequence seq, whose pages are block_tables[seq · max_pages ..]. A decode
//   step has one item per sequence (visible = its length); a prompt has one
//   per row (visible = past + row + 1). One block serves the heads / kv_heads
//   (≤ 8) query heads that share a KV head, so each key and value row is read
//   once for all of them; its 4 warps take every fourth key. Split-K: block z
//   takes keys z·keys_per_split ..; with splits = 1 it writes out, otherwise
//   `partials` ([count, heads, splits, D + 2]: the unnormalised sum, the
//   running max and the sum of weights) for paged_attention_combine_f32.
//   bf16 = 0: the cache holds f16; 1: bf16.
//
// paged_attention_combine_f32(partials, out, count, heads, head_dim, splits)
//   grid  = (heads, count), block = (128; head_dim ≤ 128)
//   out[i, h] = Σ_z e^(m_z − M) · acc_z / Σ_z e^(m_z − M) · l_z.

#define DEC_THREADS 256
#define ATT_THREADS 128
#define ATT_WARPS (ATT_THREADS / AITL_WARP)
// Query heads per KV head a block serves.
#define ATT_MAX_GROUP 8

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    rope_f32(float* x, const u32* positions, u32 rows, u32 heads, u32 head_dim, float step, u32 neox) {
    const u32 half = head_dim / 2;
    const u64 total = (u64)rows * heads * half;
    for (u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (u64)gridDim.x * blockDim.x) {
        const u32 i = (u32)(t % half);
        const u64 head = t / half;
        const u32 row = (u32)(head / heads);
        float theta = (float)positions[row];
        for (u32 s = 0; s < i; s++) {
            theta *= step;
        }
        const float sin = sinf(theta);
        const float cos = cosf(theta);
        float* h = x + head * head_dim;
        const u32 a = neox != 0 ? i : 2 * i;
        const u32 b = neox != 0 ? i + half : 2 * i + 1;
        const float x0 = h[a];
        const float x1 = h[b];
        h[a] = x0 * cos - x1 * sin;
        h[b] = x0 * sin + x1 * cos;
    }
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS) silu_mul_f32(float* gate, const float* up, u32 n) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

template <bool BF16>
AITL_DEV void kv_append(const float* k, const float* v, const u32* slots, u16* k_cache, u16* v_cache, u32 rows,
                        u32 width) {
    const u64 total = (u64)rows * width;
    for (u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (u64)gridDim.x * blockDim.x) {
        const u64 row = t / width;
        const u64 at = (u64)slots[row] * width + t % width;
        k_cache[at] = BF16 ? aitl_f32_to_bf16(k[t]) : aitl_f32_to_f16(k[t]);
        v_cache[at] = BF16 ? aitl_f32_to_bf16(v[t]) : aitl_f32_to_f16(v[t]);
    }
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    kv_append_f16(const float* k, const float* v, const u32* slots, u16* k_cache, u16* v_cache, u32 rows, u32 width) {
    kv_append<false>(k, v, slots, k_cache, v_cache, rows, width);
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    kv_append_bf16(const float* k, const float* v, const u32* slots, u16* k_cache, u16* v_cache, u32 rows, u32 width) {
    kv_append<true>(k, v, slots, k_cache, v_cache, rows, width);
}

// PER consecutive halves of a cache row as f32, in one load where aligned
// (a row of D ≥ 32 halves starts on 64 bytes; lane · PER halves on PER · 2).
template <int PER>
AITL_DEV void load_halves(const u16* p, bool bf16, float* out) {
    u16 h[PER];
    if (PER == 4) {
        const u64 word = *(const u64*)p;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            h[i] = (u16)(word >> (16 * i));
        }
    } else if (PER == 2) {
        const u32 word = *(const u32*)p;
        h[0] = (u16)word;
        h[PER - 1] = (u16)(word >> 16);
    } else {
        h[0] = p[0];
    }
#pragma unroll
    for (int i = 0; i < PER; i++) {
        out[i] = bf16 ? aitl_bf16_to_f32(h[i]) : aitl_f16_to_f32(h[i]);
    }
}

template <int D>
AITL_DEV void paged_attention(const float* q, const u16* k_cache, const u16* v_cache, const u32* block_tables,
                              const u32* items, float* out, float* partials, u32 count, u32 heads, u32 kv_heads,
                              u32 max_pages, u32 page_size, u32 splits, u32 keys_per_split, float scale, u32 bf16) {
    static_assert((D % AITL_WARP == 0 || D == 16) && D <= 128, "head size");
    // Each lane holds PER consecutive dimensions; with D = 16 half the warp idles.
    constexpr int PER = D >= AITL_WARP ? D / AITL_WARP : 1;
    __shared__ float state[ATT_WARPS][ATT_MAX_GROUP][D + 2];

    const u32 kv_head = blockIdx.x;
    const u32 item = blockIdx.y;
    const u32 split = blockIdx.z;
    if (kv_head >= kv_heads || item >= count) {
        return;
    }
    const u32 lane = threadIdx.x % AITL_WARP;
    const u32 warp = threadIdx.x / AITL_WARP;
    const bool active = lane * PER < (u32)D;
    const u32 group = heads / kv_heads;
    const u32 seq = items[2 * item];
    const u32 visible = items[2 * item + 1];
    const u32 kv_width = kv_heads * D;
    const u32 begin = split * keys_per_split;
    const u32 end = aitl_min(visible, begin + keys_per_split);

    float qv[ATT_MAX_GROUP][PER];
    float m[ATT_MAX_GROUP];
    float l[ATT_MAX_GROUP];
    float acc[ATT_MAX_GROUP][PER];
#pragma unroll
    for (int g = 0; g < ATT_MAX_GROUP; g++) {
        m[g] = aitl_neg_inf();
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const bool live = (u32)g < group && active;
            qv[g][i] = live ? q[(u64)item * heads * D + (kv_head * group + (u32)g) * D + lane * PER + (u32)i] : 0.0f;
            acc[g][i] = 0.0f;
        }
    }
    const u32* pages = block_tables + (u64)seq * max_pages;
    for (u32 p = begin + warp; p < end; p += ATT_WARPS) {
        const u64 slot = (u64)pages[p / page_size] * page_size + p % page_size;
        const u64 at = slot * kv_width + (u64)kv_head * D + lane * PER;
        float kv[PER];
        float vv[PER];
        if (active) {
            load_halves<PER>(k_cache + at, bf16 != 0, kv);
            load_halves<PER>(v_cache + at, bf16 != 0, vv);
        } else {
#pragma unroll
            for (int i = 0; i < PER; i++) {
                kv[i] = 0.0f;
                vv[i] = 0.0f;
            }
        }
#pragma unroll
        for (int g = 0; g < ATT_MAX_GROUP; g++) {
            if ((u32)g < group) {
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    dot = fmaf(qv[g][i], kv[i], dot);
                }
                const float s = aitl_warp_sum(dot) * scale;
                const float top = fmaxf(m[g], s);
                const float keep = expf(m[g] - top);
                const float weight = expf(s - top);
                l[g] = fmaf(l[g], keep, weight);
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    acc[g][i] = fmaf(acc[g][i], keep, weight * vv[i]);
                }
                m[g] = top;
            }
        }
    }
#pragma unroll
    for (int g = 0; g < ATT_MAX_GROUP; g++) {
        if ((u32)g < group) {
#pragma unroll
            for (int i = 0; i < PER; i++) {
                if (active) {
                    state[warp][g][lane * PER + (u32)i] = acc[g][i];
                }
            }
            if (lane == 0) {
                state[warp][g][D] = m[g];
                state[warp][g][D + 1] = l[g];
            }
        }
    }
    __syncthreads();
    // The warps' running sums merged, one (head, dimension) per thread.
    for (u32 t = threadIdx.x; t < group * D; t += ATT_THREADS) {
        const u32 g = t / D;
        const u32 d = t % D;
        float top = aitl_neg_inf();
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) {
            top = fmaxf(top, state[w][g][D]);
        }
        float sum = 0.0f;
        float weights = 0.0f;
        if (top != aitl_neg_inf()) {
#pragma unroll
            for (int w = 0; w < ATT_WARPS; w++) {
                const float keep = expf(state[w][g][D] - top);
                sum = fmaf(state[w][g][d], keep, sum);
                weights = fmaf(state[w][g][D + 1], keep, weights);
            }
        }
        const u32 head = kv_head * group + g;
        if (splits == 1) {
            out[(u64)item * heads * D + head * D + d] = sum / weights;
        } else {
            float* partial = partials + (((u64)item * heads + head) * splits + split) * (D + 2);
            partial[d] = sum;
            if (d == 0) {
                partial[D] = top;
                partial[D + 1] = weights;
            }
        }
    }
}

#define AITL_PAGED_ATTENTION(name, D)                                                                               \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) name(                                                \
        const float* q, const u16* k_cache, const u16* v_cache, const u32* block_tables, const u32* items,          \
        float* out, float* partials, u32 count, u32 heads, u32 kv_heads, u32 max_pages, u32 page_size, u32 splits, \
        u32 keys_per_split, float scale, u32 bf16) {                                                                \
        paged_attention<D>(q, k_cache, v_cache, block_tables, items, out, partials, count, heads, kv_heads,        \
                           max_pages, page_size, splits, keys_per_split, scale, bf16);                              \
    }

AITL_PAGED_ATTENTION(paged_attention_f32_d16, 16)
AITL_PAGED_ATTENTION(paged_attention_f32_d32, 32)
AITL_PAGED_ATTENTION(paged_attention_f32_d64, 64)
AITL_PAGED_ATTENTION(paged_attention_f32_d128, 128)

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    paged_attention_combine_f32(const float* partials, float* out, u32 count, u32 heads, u32 head_dim, u32 splits) {
    const u32 head = blockIdx.x;
    const u32 item = blockIdx.y;
    const u32 d = threadIdx.x;
    if (head >= heads || item >= count || d >= head_dim) {
        return;
    }
    const float* partial = partials + ((u64)item * heads + head) * splits * (head_dim + 2);
    float top = aitl_neg_inf();
    for (u32 z = 0; z < splits; z++) {
        top = fmaxf(top, partial[z * (head_dim + 2) + head_dim]);
    }
    float sum = 0.0f;
    float weights = 0.0f;
    for (u32 z = 0; z < splits; z++) {
        const float* p = partial + z * (head_dim + 2);
        // A split past the item's last key holds nothing (max −∞, weight 0).
        if (p[head_dim] != aitl_neg_inf()) {
            const float keep = expf(p[head_dim] - top);
            sum = fmaf(p[d], keep, sum);
            weights = fmaf(p[head_dim + 1], keep, weights);
        }
    }
    out[(u64)item * heads * head_dim + head * head_dim + d] = sum / weights;
}
