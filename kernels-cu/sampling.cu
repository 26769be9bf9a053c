#include "common.cuh"

// Choosing each sequence's next token on the device, with the semantics of
// the CPU sampler (`engine::sampler`): the repetition penalty over the
// distinct tokens seen, then greedy (temperature 0) or temperature → top-k
// → softmax (in f64) → top-p → a draw from SplitMix64, whose state advances
// once per draw exactly as the CPU's does.
//
// sample_tokens_f32(logits, vocab, seen, temperature, top_k, top_p, penalty, state, keys, probs, tokens)
//   grid  = (seqs), block = (any multiple of 32 up to 1024; 1024 on a GPU):
//   a block per sequence
//   logits: [seqs, vocab] f32, modified by the penalty as the CPU's are
//   seen: nullable [seqs, ceil(vocab / 32)] u32 bitmaps of the tokens the
//         penalty applies to (prompt and generated, each once)
//   temperature, top_p, penalty: [seqs] f32; top_k: [seqs] u32 (0: no cut)
//   state: [seqs] u64, SplitMix64's state, read and advanced (sampling only)
//   keys: [seqs, vocab] u64 and probs: [seqs, vocab] f64, scratch
//   tokens: [seqs] u32, the chosen token
//
// The CPU sorts the candidates; here each candidate has a 64-bit key
// (its scaled logit's total order above, then the complement of its id)
// that orders them the same way, all keys distinct, and each cut is a
// threshold on the keys found bit by bit (64 passes, each a reduction in
// a fixed order, so a seed always gives the same token): the k-th key for
// top-k, the largest key whose prefix mass reaches top_p, and the key at
// which the draw's prefix mass is passed. Probabilities and their sums are
// f64 as on the CPU, summed in another order: a draw within ~1e-16 of a
// boundary may fall on the other side (same distribution, not the same
// bits).

#define SAMPLE_WARPS 32

// The reduction over the block, in a fixed order; `none` is op's identity.
template <class T, class Op>
AITL_DEV T block_reduce(T v, Op op, T none, T* scratch) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = op(v, __shfl_xor_sync(AITL_FULL_MASK, v, offset));
    }
    const u32 lane = threadIdx.x % AITL_WARP;
    const u32 warp = threadIdx.x / AITL_WARP;
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    T total = lane < blockDim.x / AITL_WARP ? scratch[lane] : none;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        total = op(total, __shfl_xor_sync(AITL_FULL_MASK, total, offset));
    }
    __syncthreads();
    return total;
}

// A float's bits as an unsigned integer in the order of Rust's total_cmp.
AITL_DEV u32 total_order(float x) {
    const u32 bits = __float_as_uint(x);
    return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

AITL_DEV u64 candidate_key(float scaled, u32 id) { return ((u64)total_order(scaled) << 32) | (u64)(0xffffffffu - id); }

AITL_DEV u32 key_id(u64 key) { return 0xffffffffu - (u32)key; }

AITL_DEV double splitmix_uniform(u64* state) {
    *state += 0x9E3779B97F4A7C15ull;
    u64 z = *state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (double)((z ^ (z >> 31)) >> 11) / (double)(1ull << 53);
}

struct SumF64 {
    AITL_DEV double operator()(double a, double b) const { return a + b; }
};
struct SumU32 {
    AITL_DEV u32 operator()(u32 a, u32 b) const { return a + b; }
};
struct MinU64 {
    AITL_DEV u64 operator()(u64 a, u64 b) const { return a < b ? a : b; }
};
struct MaxU64 {
    AITL_DEV u64 operator()(u64 a, u64 b) const { return a < b ? b : a; }
};

extern "C" __global__ void __launch_bounds__(1024)
    sample_tokens_f32(float* logits, u32 vocab, const u32* seen, const float* temperature, const u32* top_k,
                      const float* top_p, const float* penalty, u64* state, u64* keys, double* probs, u32* tokens) {
    __shared__ double scratch_f64[SAMPLE_WARPS];
    __shared__ u32 scratch_u32[SAMPLE_WARPS];
    __shared__ u64 scratch_u64[SAMPLE_WARPS];
    const u32 seq = blockIdx.x;
    const u32 tid = threadIdx.x;
    float* l = logits + (u64)seq * vocab;
    u64* key = keys + (u64)seq * vocab;
    double* p = probs + (u64)seq * vocab;

    const float rp = penalty[seq];
    if (seen != nullptr && rp > 0.0f && rp != 1.0f) {
        const u32* bits = seen + (u64)seq * ((vocab + 31) / 32);
        for (u32 i = tid; i < vocab; i += blockDim.x) {
            if ((bits[i / 32] >> (i % 32)) & 1u) {
                l[i] = l[i] > 0.0f ? l[i] / rp : l[i] * rp;
            }
        }
    }
    __syncthreads();

    const float t = temperature[seq];
    if (t <= 0.0f) {
        // Greedy: the first largest logit; a NaN never wins.
        u64 best = 0;
        for (u32 i = tid; i < vocab; i += blockDim.x) {
            if (!aitl_is_nan(l[i])) {
                best = MaxU64()(best, candidate_key(l[i], i));
            }
        }
        best = block_reduce(best, MaxU64(), (u64)0, scratch_u64);
        if (tid == 0) {
            tokens[seq] = best == 0 ? 0u : key_id(best);
        }
        return;
    }

    u64 top = 0;
    for (u32 i = tid; i < vocab; i += blockDim.x) {
        key[i] = candidate_key(l[i] / t, i);
        top = MaxU64()(top, key[i]);
    }
    top = block_reduce(top, MaxU64(), (u64)0, scratch_u64);
    const float max = l[key_id(top)] / t;
    for (u32 i = tid; i < vocab; i += blockDim.x) {
        p[i] = exp((double)(l[i] / t - max));
    }
    __syncthreads();

    // The k-th largest key (every key is distinct): the largest threshold
    // with at least k keys at or above it.
    u64 lower = 0;
    const u32 k = top_k[seq];
    if (k > 0 && k < vocab) {
        for (int b = 63; b >= 0; b--) {
            const u64 trial = lower | (1ull << b);
            u32 count = 0;
            for (u32 i = tid; i < vocab; i += blockDim.x) {
                count += key[i] >= trial ? 1u : 0u;
            }
            if (block_reduce(count, SumU32(), 0u, scratch_u32) >= k) {
                lower = trial;
            }
        }
    }
    auto mass_from = [&](u64 threshold) {
        const u64 from = threshold > lower ? threshold : lower;
        double sum = 0.0;
        for (u32 i = tid; i < vocab; i += blockDim.x) {
            sum += key[i] >= from ? p[i] : 0.0;
        }
        return block_reduce(sum, SumF64(), 0.0, scratch_f64);
    };
    const double total = mass_from(lower);

    // Top-p: the shortest prefix whose probability reaches top_p, i.e. the
    // largest threshold whose mass (over the top-k set) still does.
    const float nucleus = top_p[seq];
    if (nucleus > 0.0f && nucleus < 1.0f) {
        const double need = (double)nucleus * total;
        u64 cut = 0;
        for (int b = 63; b >= 0; b--) {
            const u64 trial = cut | (1ull << b);
            if (mass_from(trial) >= need) {
                cut = trial;
            }
        }
        lower = cut > lower ? cut : lower;
    }
    const double kept = mass_from(lower);

    // The draw: the first candidate (in key order) at which the prefix mass
    // passes u; the last kept one if rounding leaves u above them all.
    u64 local_state = state[seq];
    const double u = splitmix_uniform(&local_state) * kept;
    u64 pick = 0;
    for (int b = 63; b >= 0; b--) {
        const u64 trial = pick | (1ull << b);
        if (mass_from(trial) > u) {
            pick = trial;
        }
    }
    const u64 from = pick > lower ? pick : lower;
    u64 chosen = 0xffffffffffffffffull;
    for (u32 i = tid; i < vocab; i += blockDim.x) {
        if (key[i] >= from) {
            chosen = MinU64()(chosen, key[i]);
        }
    }
    chosen = block_reduce(chosen, MinU64(), 0xffffffffffffffffull, scratch_u64);
    if (tid == 0) {
        tokens[seq] = key_id(chosen);
        state[seq] = local_state;
    }
}
