#include "common.cuh"

// Bidirectional multi-head attention over a ragged batch (no padding, no
// mask): within each sequence, out = softmax(scale · q·kᵀ) · v per head.
//
// varlen_attention_f32_d{16,32,64,128}(qkv, cu_seqlens, out, seqs, heads, scale)
//   grid  = (ceil(max_seq_len / ROWS), heads, seqs)   ROWS = 128 / SPLIT:
//           D=16: 128, D=32: 128, D=64: 64, D=128: 32 query rows per block
//           (heads ≤ 65535 and seqs ≤ 65535: grid y and z limits)
//   block = (128)
//   shared: static only: K and V tiles, 2 · KT · D floats (KT = 64 key rows,
//           32 for D=128): 8, 16, 32, 32 KiB; no dynamic
//   qkv:  [tokens, 3 · heads · D], row t = [Q | K | V], head h at columns h·D
//   cu_seqlens: [seqs + 1] row offsets; sequence s is rows cu[s]..cu[s+1]
//   out:  [tokens, heads · D]
//   scale: 1/sqrt(D) from the host (the CPU backend's factor).
//
// SPLIT adjacent lanes share one query row, each holding D/SPLIT of its
// dimensions (interleaved: lane part p holds dims p, p+SPLIT, ...) so a
// thread keeps at most 32 query and 32 accumulator values in registers,
// and the SPLIT lanes of a row read consecutive shared-memory words (no
// bank conflicts; lanes of other rows read the same words, a broadcast).
// Softmax is online (running max and sum), rescaled once per CHUNK keys.

#define ATTN_THREADS 128
// Keys scored between two rescales of the accumulator.
#define ATTN_CHUNK 16

template <int D, int SPLIT, int KT>
AITL_DEV void varlen_attention(const float* qkv, const u32* cu_seqlens, float* out, u32 seqs, u32 heads, float scale) {
    static_assert(D % SPLIT == 0 && (SPLIT & (SPLIT - 1)) == 0 && SPLIT <= AITL_WARP, "split");
    static_assert(KT % ATTN_CHUNK == 0, "tile");
    constexpr int ROWS = ATTN_THREADS / SPLIT;
    constexpr int PART = D / SPLIT;
    __shared__ float keys[KT][D];
    __shared__ float values[KT][D];

    const u32 seq = blockIdx.z;
    const u32 head = blockIdx.y;
    if (seq >= seqs || head >= heads) {
        return;
    }
    const u32 start = cu_seqlens[seq];
    const u32 len = cu_seqlens[seq + 1] - start;
    const u32 row0 = blockIdx.x * ROWS;
    // The whole block at once, so no thread misses a barrier below.
    if (row0 >= len) {
        return;
    }
    const u32 hidden = heads * D;
    const u64 stride = 3ull * hidden;
    const float* base = qkv + (u64)start * stride + head * D;
    const u32 part = threadIdx.x % SPLIT;
    const u32 qrow = row0 + threadIdx.x / SPLIT;
    // Rows past the sequence's end still load tiles and shuffle; they work
    // on a zero query (finite scores) and store nothing.
    const bool active = qrow < len;

    // The query is pre-scaled by scale · log2(e) so exp2 gives e^(scale·s).
    const float qscale = scale * 1.4426950408889634f;
    float q[PART];
    float acc[PART];
#pragma unroll
    for (int i = 0; i < PART; i++) {
        q[i] = active ? base[(u64)qrow * stride + i * SPLIT + part] * qscale : 0.0f;
        acc[i] = 0.0f;
    }
    float running_max = aitl_neg_inf();
    float running_sum = 0.0f;

    for (u32 k0 = 0; k0 < len; k0 += KT) {
        const u32 valid = aitl_min(len - k0, (u32)KT);
        // The previous tile is consumed before it is overwritten.
        __syncthreads();
        for (u32 e = threadIdx.x; e < (u32)(KT * D); e += ATTN_THREADS) {
            const u32 j = e / D;
            const u32 d = e % D;
            // Rows past the end are zero so 0 · v stays 0 (stale shared
            // memory could hold NaN).
            const u64 at = (u64)(k0 + j) * stride + d;
            keys[j][d] = j < valid ? base[at + hidden] : 0.0f;
            values[j][d] = j < valid ? base[at + 2 * hidden] : 0.0f;
        }
        __syncthreads();

        // The first chunk of every tile has a valid key, so running_max is
        // finite after it and exp2(running_max − new_max) is never NaN.
        for (u32 c0 = 0; c0 < valid; c0 += ATTN_CHUNK) {
            float s[ATTN_CHUNK];
            float chunk_max = aitl_neg_inf();
#pragma unroll
            for (int jj = 0; jj < ATTN_CHUNK; jj++) {
                const float* k = keys[c0 + jj];
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < PART; i++) {
                    dot = fmaf(q[i], k[i * SPLIT + part], dot);
                }
#pragma unroll
                for (int lanes = 1; lanes < SPLIT; lanes <<= 1) {
                    dot += __shfl_xor_sync(AITL_FULL_MASK, dot, lanes);
                }
                s[jj] = c0 + jj < valid ? dot : aitl_neg_inf();
                chunk_max = fmaxf(chunk_max, s[jj]);
            }
            const float new_max = fmaxf(running_max, chunk_max);
            const float correction = exp2f(running_max - new_max);
            running_sum *= correction;
#pragma unroll
            for (int i = 0; i < PART; i++) {
                acc[i] *= correction;
            }
#pragma unroll
            for (int jj = 0; jj < ATTN_CHUNK; jj++) {
                const float p = exp2f(s[jj] - new_max);
                running_sum += p;
                const float* v = values[c0 + jj];
#pragma unroll
                for (int i = 0; i < PART; i++) {
                    acc[i] = fmaf(p, v[i * SPLIT + part], acc[i]);
                }
            }
            running_max = new_max;
        }
    }

    if (active) {
        const float inv = 1.0f / running_sum;
        float* dst = out + (u64)(start + qrow) * hidden + head * D;
#pragma unroll
        for (int i = 0; i < PART; i++) {
            dst[i * SPLIT + part] = acc[i] * inv;
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    varlen_attention_f32_d16(const float* qkv, const u32* cu_seqlens, float* out, u32 seqs, u32 heads, float scale) {
    varlen_attention<16, 1, 64>(qkv, cu_seqlens, out, seqs, heads, scale);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    varlen_attention_f32_d32(const float* qkv, const u32* cu_seqlens, float* out, u32 seqs, u32 heads, float scale) {
    varlen_attention<32, 1, 64>(qkv, cu_seqlens, out, seqs, heads, scale);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    varlen_attention_f32_d64(const float* qkv, const u32* cu_seqlens, float* out, u32 seqs, u32 heads, float scale) {
    varlen_attention<64, 2, 64>(qkv, cu_seqlens, out, seqs, heads, scale);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    varlen_attention_f32_d128(const float* qkv, const u32* cu_seqlens, float* out, u32 seqs, u32 heads, float scale) {
    varlen_attention<128, 4, 32>(qkv, cu_seqlens, out, seqs, heads, scale);
}
