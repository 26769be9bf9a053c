//! CPU ops of decoder models (Llama family): RMSNorm, rotary position
//! embeddings, SwiGLU's gate, and causal grouped-query attention over a KV
//! cache. Follows ggml's CPU definitions (`ggml-cpu/ops.cpp`) so logits stay
//! close to llama.cpp's.

use rayon::prelude::*;

use super::{AttentionShape, RopeStyle, cpu::dot};

pub(super) fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let width = gamma.len();
    out.par_chunks_mut(width).zip(x.par_chunks(width)).for_each(|(o, row)| {
        let mean = row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / width as f64;
        let scale = 1.0 / (mean as f32 + eps).sqrt();
        for ((o, v), g) in o.iter_mut().zip(row).zip(gamma) {
            *o = v * scale * g;
        }
    });
}

/// Rotates each head's pairs by `position · base^(−2i/d)`; the angle steps
/// are multiplied up in f32 as ggml does.
pub(super) fn rope(x: &mut [f32], positions: &[u32], heads: usize, head_dim: usize, base: f32, style: RopeStyle) {
    let width = heads * head_dim;
    let step = base.powf(-2.0 / head_dim as f32);
    x.par_chunks_mut(width).zip(positions.par_iter()).for_each(|(row, &position)| {
        for head in row.chunks_exact_mut(head_dim) {
            let mut theta = position as f32;
            for i in 0..head_dim / 2 {
                let (sin, cos) = theta.sin_cos();
                // Normal: adjacent pairs (GGUF's permuted Q/K); NeoX: halves (HF layout).
                let (a, b) = match style {
                    RopeStyle::Normal => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + head_dim / 2),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
                theta *= step;
            }
        }
    });
}

/// `gate ← silu(gate) · up`, in place.
pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gate.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(|(g, u)| {
        for (g, u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    });
}

/// Causal attention of `new` query rows (positions `past..past + new`) over
/// the cache's first `past + new` rows. `q` is `[new, heads · head_dim]`; the
/// caches are `[positions, kv_heads · head_dim]`; query head `h` reads KV head
/// `h / (heads / kv_heads)`.
pub(super) fn cached_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    past: usize,
    shape: AttentionShape,
    kv_heads: usize,
    out: &mut [f32],
) {
    let (heads, head_dim) = (shape.heads, shape.head_dim);
    let (width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // One task per (query row, head), dealt round-robin to the awake team:
    // a single decoding row still spreads its heads over the cores.
    let team = super::team::Team::global();
    let tasks: Vec<std::sync::Mutex<&mut [f32]>> = out.chunks_mut(head_dim).map(std::sync::Mutex::new).collect();
    team.run(&|member| {
        for task in (member..tasks.len()).step_by(team.size()) {
            let (t, h) = (task / heads, task % heads);
            let qh = &q[t * width + h * head_dim..t * width + (h + 1) * head_dim];
            let head = KvHead { k: k_cache, v: v_cache, stride: kv_width, offset: (h / group) * head_dim };
            let mut o = tasks[task].lock().unwrap_or_else(|e| e.into_inner());
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the processor has the features `attend_avx512` enables (checked above).
                unsafe { attend_avx512(qh, &head, past + t + 1, scale, &mut o) };
                continue;
            }
            attend(qh, &head, past + t + 1, scale, &mut o);
        }
    });
}

/// `attend` compiled for AVX-512: the dot products, exponentials and
/// weighted sums vectorise 16 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,fma")]
unsafe fn attend_avx512(q: &[f32], head: &KvHead, visible: usize, scale: f32, out: &mut [f32]) {
    attend(q, head, visible, scale, out)
}

/// One KV head's columns in the cache rows.
struct KvHead<'a> {
    k: &'a [f32],
    v: &'a [f32],
    stride: usize,
    offset: usize,
}

/// Softmax-weighted sum of the first `visible` values for one query head.
#[inline(always)]
fn attend(q: &[f32], head: &KvHead, visible: usize, scale: f32, out: &mut [f32]) {
    // Plain loops, no closures: a closure body is compiled apart from the
    // target-feature caller and would lose its vector instructions.
    let d = q.len();
    let mut scores = vec![0f32; visible];
    let mut max = f32::NEG_INFINITY;
    for (p, s) in scores.iter_mut().enumerate() {
        let start = p * head.stride + head.offset;
        *s = dot(q, &head.k[start..start + d]) * scale;
        max = max.max(*s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        // libm's exp: this model turns even 2e-7 relative error here into logit changes.
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (p, s) in scores.iter().enumerate() {
        let start = p * head.stride + head.offset;
        for (o, v) in out.iter_mut().zip(&head.v[start..start + d]) {
            *o = s.mul_add(*v, *o);
        }
    }
    let inverse = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inverse;
    }
}
