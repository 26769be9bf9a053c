#include "common.cuh"

// Mixture-of-experts decoding, all on the device: route each token, plan
// the products (tokens sorted by expert, in groups that share one read of
// an expert's weights: `matvec_*` with groups), combine the experts'
// outputs back in token order. The CPU definitions are `backend::experts`.
//
// moe_route_f32(logits, experts, weights, tokens, count, used, normalize)
//   grid  = (ceil(tokens / 4)), block = (128): a warp per token
//   logits: [tokens, count] (count ≤ 256); experts: [tokens, used] u32 and
//   weights: [tokens, used] f32 (used ≤ count): softmax over the logits, the
//   `used` most probable experts (ties to the lower index), in that order;
//   their probabilities renormalised to sum to one when normalize ≠ 0
//   (Mixtral), kept as they are otherwise (Qwen2-MoE).
//
// moe_plan_f32(experts, weights, pairs, count, used, sorted, position, sorted_token, sorted_weight,
//              groups, max_groups)
//   grid  = (1), block = (256); count ≤ 256
//   shared: static, 3 · 257 u32
//   experts, weights: [pairs] (pairs = tokens · used, a token's choices
//   adjacent). Writes the pairs sorted by expert, stably (sorted[i] = the
//   pair at place i; position[pair] = its place; sorted_token[i] = its
//   token; sorted_weight[i] = its routing weight), and groups: [max_groups
//   · 3] u32 (expert, first place, rows ≤ 8), each expert's places cut in
//   eights, then padding groups of 0 rows. max_groups ≥ ceil(pairs / 8) +
//   min(count, pairs) always suffices. An expert no token chose has no
//   group, so its weights are never read.
//
// moe_combine_f32(rows, position, out, tokens, used, width, accumulate)
//   grid  = (any; grid-stride over tokens · width), block = (256)
//   out[t] (+)= Σ_slot rows[position[t · used + slot]] in slot order: the
//   down products (already scaled by their routing weights) back in token
//   order; accumulate ≠ 0 adds to out (the residual stream).
//
// add_gated_f32(x, y, gate, rows, width)
//   grid  = (any; grid-stride over rows · width), block = (256)
//   x[r] += sigmoid(gate[r]) · y[r]: Qwen-MoE's gated shared expert.

#define MOE_MAX_EXPERTS 256
#define MOE_PER_LANE (MOE_MAX_EXPERTS / AITL_WARP)
#define MOE_ROWS_PER_GROUP 8

extern "C" __global__ void __launch_bounds__(128)
    moe_route_f32(const float* logits, u32* experts, float* weights, u32 tokens, u32 count, u32 used, u32 normalize) {
    const u32 lane = threadIdx.x % AITL_WARP;
    const u32 token = blockIdx.x * 4 + threadIdx.x / AITL_WARP;
    if (token >= tokens) {
        return;
    }
    const float* row = logits + (u64)token * count;
    // Expert lane + 32·i lives in lane `lane`, slot i.
    float e[MOE_PER_LANE];
    float top = aitl_neg_inf();
#pragma unroll
    for (int i = 0; i < MOE_PER_LANE; i++) {
        const u32 expert = lane + AITL_WARP * (u32)i;
        e[i] = expert < count ? row[expert] : aitl_neg_inf();
        top = fmaxf(top, e[i]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        top = fmaxf(top, __shfl_xor_sync(AITL_FULL_MASK, top, offset));
    }
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < MOE_PER_LANE; i++) {
        const u32 expert = lane + AITL_WARP * (u32)i;
        // Probabilities are ≥ 0; −1 marks an expert that is not there or
        // already chosen.
        e[i] = expert < count ? expf(e[i] - top) : -1.0f;
        total += expert < count ? e[i] : 0.0f;
    }
    total = aitl_warp_sum(total);
    u32* out_experts = experts + (u64)token * used;
    float* out_weights = weights + (u64)token * used;
    for (u32 slot = 0; slot < used; slot++) {
        float best = -1.0f;
        u32 best_expert = 0xffffffffu;
#pragma unroll
        for (int i = 0; i < MOE_PER_LANE; i++) {
            // Within a lane, experts rise with i: strict > keeps the lower.
            if (e[i] > best) {
                best = e[i];
                best_expert = lane + AITL_WARP * (u32)i;
            }
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float other = __shfl_xor_sync(AITL_FULL_MASK, best, offset);
            const u32 other_expert = __shfl_xor_sync(AITL_FULL_MASK, best_expert, offset);
            if (other > best || (other == best && other_expert < best_expert)) {
                best = other;
                best_expert = other_expert;
            }
        }
        if (best_expert % AITL_WARP == lane) {
#pragma unroll
            for (int i = 0; i < MOE_PER_LANE; i++) {
                if ((u32)i == best_expert / AITL_WARP) {
                    e[i] = -1.0f;
                }
            }
        }
        const float weight = best / total;
        if (lane == 0) {
            out_experts[slot] = best_expert;
            out_weights[slot] = weight;
        }
    }
    if (normalize != 0 && lane == 0) {
        // The sum in slot order, as the CPU's.
        float sum = 0.0f;
        for (u32 slot = 0; slot < used; slot++) {
            sum += out_weights[slot];
        }
        for (u32 slot = 0; slot < used; slot++) {
            out_weights[slot] /= sum;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    moe_plan_f32(const u32* experts, const float* weights, u32 pairs, u32 count, u32 used, u32* sorted, u32* position,
                 u32* sorted_token, float* sorted_weight, u32* groups, u32 max_groups) {
    __shared__ u32 tokens_of[MOE_MAX_EXPERTS + 1];
    __shared__ u32 first_place[MOE_MAX_EXPERTS + 1];
    __shared__ u32 first_group[MOE_MAX_EXPERTS + 1];
    const u32 tid = threadIdx.x;
    // Each thread owns experts tid, tid + 256, …: it counts and later places
    // their pairs, scanning the pairs in order (which makes the sort stable).
    for (u32 e = tid; e < count; e += blockDim.x) {
        u32 n = 0;
        for (u32 p = 0; p < pairs; p++) {
            n += experts[p] == e ? 1u : 0u;
        }
        tokens_of[e] = n;
    }
    __syncthreads();
    if (tid == 0) {
        u32 place = 0;
        u32 group = 0;
        for (u32 e = 0; e < count; e++) {
            first_place[e] = place;
            first_group[e] = group;
            place += tokens_of[e];
            group += (tokens_of[e] + MOE_ROWS_PER_GROUP - 1) / MOE_ROWS_PER_GROUP;
        }
        first_place[count] = place;
        first_group[count] = group;
    }
    __syncthreads();
    for (u32 e = tid; e < count; e += blockDim.x) {
        u32 place = first_place[e];
        for (u32 p = 0; p < pairs; p++) {
            if (experts[p] == e) {
                sorted[place] = p;
                position[p] = place;
                sorted_token[place] = p / used;
                sorted_weight[place] = weights[p];
                place++;
            }
        }
        const u32 n = tokens_of[e];
        for (u32 j = 0; j * MOE_ROWS_PER_GROUP < n; j++) {
            u32* group = groups + (u64)(first_group[e] + j) * 3;
            group[0] = e;
            group[1] = first_place[e] + j * MOE_ROWS_PER_GROUP;
            group[2] = aitl_min((u32)MOE_ROWS_PER_GROUP, n - j * MOE_ROWS_PER_GROUP);
        }
    }
    for (u32 g = first_group[count] + tid; g < max_groups; g += blockDim.x) {
        groups[(u64)g * 3] = 0;
        groups[(u64)g * 3 + 1] = 0;
        groups[(u64)g * 3 + 2] = 0;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    moe_combine_f32(const float* rows, const u32* position, float* out, u32 tokens, u32 used, u32 width,
                    u32 accumulate) {
    const u64 total = (u64)tokens * width;
    for (u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (u64)gridDim.x * blockDim.x) {
        const u64 token = t / width;
        const u32 c = (u32)(t % width);
        float sum = accumulate != 0 ? out[t] : 0.0f;
        for (u32 slot = 0; slot < used; slot++) {
            sum += rows[(u64)position[token * used + slot] * width + c];
        }
        out[t] = sum;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    add_gated_f32(float* x, const float* y, const float* gate, u32 rows, u32 width) {
    const u64 total = (u64)rows * width;
    for (u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (u64)gridDim.x * blockDim.x) {
        const float g = 1.0f / (1.0f + expf(-gate[t / width]));
        x[t] += g * y[t];
    }
}
