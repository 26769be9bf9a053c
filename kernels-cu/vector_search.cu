#include "common.cuh"

// Exact vector search over an index resident on the device: score every
// row against a few queries, then keep the best k per query by repeated
// chunked sorts.
//
// score_rows_{f32,f16,bf16}(rows, n, dim, queries, nq, row_kind, kind_masks,
//                           allow_bits, allow_words, live, scores)
//   grid  = (any x ≥ 1; ceil(n / 8) covers every row once, a capped grid
//            strides over rows)
//   block = (256): one warp per row, 8 rows per block at a time
//   shared: dynamic, nq · dim floats (the host keeps nq · dim ≤ 8192: 32 KiB);
//           no static
//   rows: [n, dim] of f32, f16 or bf16 bits; queries: [nq, dim] f32;
//   row_kind: [n]; kind_masks: [nq]; allow_bits: [nq, allow_words], nullable;
//   live: [n]; scores: [nq, n].
//   scores[q·n + r] = dot(rows[r], queries[q]) (f32 sums) if live[r] != 0,
//   and kind_masks[q] == 0 or (row_kind[r] < 32 and bit row_kind[r] of
//   kind_masks[q] is set), and allow_bits is null or bit r of
//   allow_bits[q·allow_words + r/32] is set; otherwise -inf.
//
// topk_chunks_f32(scores, ids, n, k, out_scores, out_ids)
//   grid  = (ceil(n / 2048), nq)
//   block = (1024): two elements per thread
//   shared: static, 2048 floats + 2048 u32 (16 KiB); no dynamic
//   scores: [nq, n]; ids: [nq, n], nullable (id = position in the row);
//   out_scores, out_ids: [nq, gridDim.x · k], k ≤ 1024.
//   Chunk c of query q (elements c·2048 .. min(n, (c+1)·2048)) is sorted
//   by score descending, then id ascending (NaN counts as -inf), and its
//   first k entries written at q·(gridDim.x·k) + c·k, padded with
//   (-inf, 0xffffffff). The host feeds the output back in as
//   (scores, ids) with n = gridDim.x · k until one chunk remains, then
//   drops the -inf entries: the same list a host sort with this order
//   gives, since each chunk's best k contain every global winner in it.

#define SCORE_THREADS 256
#define SCORE_ROWS_PER_BLOCK (SCORE_THREADS / AITL_WARP)
// Queries scored per pass over a row: eight accumulators per lane, folded
// together by a reduce-scatter (9 shuffles rather than 8 · 5).
#define SCORE_QUERIES 8

#define TOPK_THREADS 1024
#define TOPK_CHUNK 2048
#define TOPK_NO_ID 0xffffffffu

struct F32Row {
    static AITL_DEV float get(const float* row, u32 i) { return row[i]; }
};
struct F16Row {
    static AITL_DEV float get(const u16* row, u32 i) { return aitl_f16_to_f32(row[i]); }
};
struct Bf16Row {
    static AITL_DEV float get(const u16* row, u32 i) { return aitl_bf16_to_f32(row[i]); }
};

// Halves the number of partial sums a lane holds: lanes with `bit` set keep
// the upper half of `acc` and give away the lower, their partners the
// reverse, and each adds what it receives.
template <int HALF>
AITL_DEV void fold_half(float* acc, u32 lane, u32 bit) {
    const bool upper = (lane & bit) != 0;
#pragma unroll
    for (int i = 0; i < HALF; i++) {
        const float give = upper ? acc[i] : acc[i + HALF];
        const float keep = upper ? acc[i + HALF] : acc[i];
        acc[i] = keep + __shfl_xor_sync(AITL_FULL_MASK, give, bit);
    }
}

template <class T, class Row>
AITL_DEV void score_rows(const T* rows, u32 n, u32 dim, const float* queries, u32 nq, const u32* row_kind,
                         const u32* kind_masks, const u32* allow_bits, u32 allow_words, const u8* live,
                         float* scores) {
    AITL_DYNAMIC_SHARED(float, staged);
    for (u32 i = threadIdx.x; i < nq * dim; i += SCORE_THREADS) {
        staged[i] = queries[i];
    }
    __syncthreads();
    const u32 lane = threadIdx.x % AITL_WARP;
    const u32 warp = threadIdx.x / AITL_WARP;
    // After the folds lane l holds the sum for query (l >> 2) & 7 of the
    // pass; lanes l ≡ 0 (mod 4) store it.
    const u32 mine = (lane >> 2) & (SCORE_QUERIES - 1);
    // One warp per row and nothing block-wide below: warps go at their own pace.
    for (u64 r = (u64)blockIdx.x * SCORE_ROWS_PER_BLOCK + warp; r < n; r += (u64)gridDim.x * SCORE_ROWS_PER_BLOCK) {
        const bool alive = live[r] != 0;
        const u32 kind = row_kind[r];
        if (!alive) {
            // A dead row costs no reads and no shuffles (the branch is warp-uniform).
            for (u32 q = lane; q < nq; q += AITL_WARP) {
                scores[(u64)q * n + r] = aitl_neg_inf();
            }
            continue;
        }
        const T* row = rows + r * dim;
        for (u32 q0 = 0; q0 < nq; q0 += SCORE_QUERIES) {
            float acc[SCORE_QUERIES];
#pragma unroll
            for (int j = 0; j < SCORE_QUERIES; j++) {
                acc[j] = 0.0f;
            }
            const u32 count = aitl_min(nq - q0, (u32)SCORE_QUERIES);
            for (u32 d = lane; d < dim; d += AITL_WARP) {
                const float v = Row::get(row, d);
                const float* query = staged + q0 * dim + d;
#pragma unroll
                for (int j = 0; j < SCORE_QUERIES; j++) {
                    if ((u32)j < count) {
                        acc[j] = fmaf(v, query[j * dim], acc[j]);
                    }
                }
            }
            fold_half<4>(acc, lane, 16);
            fold_half<2>(acc, lane, 8);
            fold_half<1>(acc, lane, 4);
            acc[0] += __shfl_xor_sync(AITL_FULL_MASK, acc[0], 2);
            acc[0] += __shfl_xor_sync(AITL_FULL_MASK, acc[0], 1);
            const u32 q = q0 + mine;
            if ((lane & 3) == 0 && q < nq) {
                const u32 mask = kind_masks[q];
                bool keep = (mask == 0 || (kind < 32 && ((mask >> kind) & 1u) != 0));
                if (allow_bits != nullptr) {
                    keep = keep && ((allow_bits[(u64)q * allow_words + r / 32] >> (r % 32)) & 1u) != 0;
                }
                scores[(u64)q * n + r] = keep ? acc[0] : aitl_neg_inf();
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(SCORE_THREADS)
    score_rows_f32(const float* rows, u32 n, u32 dim, const float* queries, u32 nq, const u32* row_kind,
                   const u32* kind_masks, const u32* allow_bits, u32 allow_words, const u8* live, float* scores) {
    score_rows<float, F32Row>(rows, n, dim, queries, nq, row_kind, kind_masks, allow_bits, allow_words, live, scores);
}

extern "C" __global__ void __launch_bounds__(SCORE_THREADS)
    score_rows_f16(const u16* rows, u32 n, u32 dim, const float* queries, u32 nq, const u32* row_kind,
                   const u32* kind_masks, const u32* allow_bits, u32 allow_words, const u8* live, float* scores) {
    score_rows<u16, F16Row>(rows, n, dim, queries, nq, row_kind, kind_masks, allow_bits, allow_words, live, scores);
}

extern "C" __global__ void __launch_bounds__(SCORE_THREADS)
    score_rows_bf16(const u16* rows, u32 n, u32 dim, const float* queries, u32 nq, const u32* row_kind,
                    const u32* kind_masks, const u32* allow_bits, u32 allow_words, const u8* live, float* scores) {
    score_rows<u16, Bf16Row>(rows, n, dim, queries, nq, row_kind, kind_masks, allow_bits, allow_words, live,
                             scores);
}

// Strictly before in the output order: higher score, then lower id.
AITL_DEV bool ranks_before(float a, u32 ia, float b, u32 ib) { return a > b || (a == b && ia < ib); }

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_chunks_f32(const float* scores, const u32* ids, u32 n, u32 k, float* out_scores, u32* out_ids) {
    __shared__ float key[TOPK_CHUNK];
    __shared__ u32 id[TOPK_CHUNK];
    const u32 q = blockIdx.y;
    const u32 begin = blockIdx.x * TOPK_CHUNK;
    const u32 tid = threadIdx.x;
#pragma unroll
    for (u32 half = 0; half < 2; half++) {
        const u32 e = tid + half * TOPK_THREADS;
        const u64 g = (u64)begin + e;
        float s = aitl_neg_inf();
        u32 i = TOPK_NO_ID;
        if (g < n) {
            s = scores[(u64)q * n + g];
            // NaN would break the order's transitivity: it ranks as -inf.
            s = aitl_is_nan(s) ? aitl_neg_inf() : s;
            i = ids != nullptr ? ids[(u64)q * n + g] : (u32)g;
        }
        key[e] = s;
        id[e] = i;
    }
    __syncthreads();

    // Bitonic sort, one compare-exchange per thread per step. A step of
    // stride j ≤ 32 only touches the 64 elements of the thread's warp, so
    // two such steps in a row need only a warp barrier.
    for (u32 size = 2; size <= TOPK_CHUNK; size <<= 1) {
        for (u32 j = size >> 1; j > 0; j >>= 1) {
            const u32 lo = 2 * tid - (tid & (j - 1));
            const u32 hi = lo + j;
            const float a = key[lo];
            const float b = key[hi];
            const u32 ia = id[lo];
            const u32 ib = id[hi];
            // Runs of `size` alternate direction; the last run (size = 2048)
            // ends in output order.
            const bool forward = (lo & size) == 0;
            if (forward ? ranks_before(b, ib, a, ia) : ranks_before(a, ia, b, ib)) {
                key[lo] = b;
                key[hi] = a;
                id[lo] = ib;
                id[hi] = ia;
            }
            const u32 next = j > 1 ? j >> 1 : size;
            if (j <= 32 && next <= 32) {
                __syncwarp();
            } else {
                __syncthreads();
            }
        }
    }

    float* dst_scores = out_scores + (u64)q * gridDim.x * k + (u64)blockIdx.x * k;
    u32* dst_ids = out_ids + (u64)q * gridDim.x * k + (u64)blockIdx.x * k;
    for (u32 e = tid; e < k; e += TOPK_THREADS) {
        dst_scores[e] = key[e];
        dst_ids[e] = id[e];
    }
}
