//! CPU ops of decoder models (Llama family): RMSNorm, rotary position
//! embeddings, SwiGLU's gate, and causal grouped-query attention over a KV
//! cache. Follows ggml's CPU definitions (`ggml-cpu/ops.cpp`) so logits stay
//! close to llama.cpp's.

use rayon::prelude::*;

use super::{AttentionShape, RopeStyle};

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
    out.par_chunks_mut(width).zip(q.par_chunks(width)).enumerate().for_each(|(t, (o, q))| {
        let visible = past + t + 1;
        let mut scores = vec![0f32; visible];
        for h in 0..heads {
            let kv = h / group;
            let qh = &q[h * head_dim..(h + 1) * head_dim];
            for (p, s) in scores.iter_mut().enumerate() {
                let k = &k_cache[p * kv_width + kv * head_dim..p * kv_width + (kv + 1) * head_dim];
                *s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let oh = &mut o[h * head_dim..(h + 1) * head_dim];
            oh.fill(0.0);
            for (p, s) in scores.iter().enumerate() {
                let v = &v_cache[p * kv_width + kv * head_dim..p * kv_width + (kv + 1) * head_dim];
                for (o, v) in oh.iter_mut().zip(v) {
                    *o += s * v;
                }
            }
            for o in oh.iter_mut() {
                *o /= sum;
            }
        }
    });
}
