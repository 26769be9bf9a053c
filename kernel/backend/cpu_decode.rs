//! CPU ops of decoder models (Llama family): RMSNorm, rotary position
//! embeddings, SwiGLU's gate, and causal grouped-query attention over a KV
//! cache. Follows ggml's CPU definitions (`ggml-cpu/ops.cpp`) so logits stay
//! close to llama.cpp's.

use rayon::prelude::*;

use super::{
    AttentionShape, RopeStyle,
    cpu::{LANES, dot, exp},
};

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

/// One sequence's part of a step's attention: its next `rows` query rows
/// (positions `past..past + rows`) over its cache, whose first `past + rows`
/// rows are filled (`[positions, kv_heads · head_dim]`).
pub(super) struct Sequence<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub past: usize,
    pub rows: usize,
}

/// Causal attention for the sequences of one step, whose query rows are
/// stacked in `q` (`[Σ rows, heads · head_dim]`, in order); query head `h`
/// reads KV head `h / (heads / kv_heads)`.
pub(super) fn cached_attention(
    q: &[f32],
    sequences: &[Sequence],
    shape: AttentionShape,
    kv_heads: usize,
    ggml_order: bool,
    out: &mut [f32],
) {
    let (heads, head_dim) = (shape.heads, shape.head_dim);
    let (width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // (first row in q, sequence) of the sequences left to the row kernel.
    let mut rowwise = Vec::new();
    let mut first = 0;
    for (i, s) in sequences.iter().enumerate() {
        let rows = first * width..(first + s.rows) * width;
        #[cfg(target_arch = "x86_64")]
        if !ggml_order
            && s.rows >= BLOCK_ROWS
            && head_dim.is_multiple_of(KEYS)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            prompt_attention(&q[rows.clone()], s.k, s.v, s.past, shape, kv_heads, &mut out[rows]);
            first += s.rows;
            continue;
        }
        rowwise.extend((0..s.rows).map(|t| (first + t, i, t)));
        first += s.rows;
    }
    if rowwise.is_empty() {
        return;
    }
    // One task per (query row, head) of every decoding sequence, claimed by
    // the awake team in one pass: a single decoding row still spreads its
    // heads over the cores, and several sequences share a join.
    let team = super::team::Team::global();
    let chunks: Vec<std::sync::Mutex<&mut [f32]>> = out.chunks_mut(head_dim).map(std::sync::Mutex::new).collect();
    team.run(rowwise.len() * heads, &|task| {
        let ((row, i, t), h) = (rowwise[task / heads], task % heads);
        let s = &sequences[i];
        let qh = &q[row * width + h * head_dim..row * width + (h + 1) * head_dim];
        let head = KvHead { k: s.k, v: s.v, stride: kv_width, offset: (h / group) * head_dim };
        let mut o = chunks[row * heads + h].lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the processor has the features `attend_avx512` enables (checked above).
            unsafe { attend_avx512(qh, &head, s.past + t + 1, scale, &mut o) };
            return;
        }
        attend(qh, &head, s.past + t + 1, scale, &mut o);
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

/// Query rows per task of a prompt's attention: each key and value row read
/// serves this many queries.
const BLOCK_ROWS: usize = 8;
/// Keys per score vector (one AVX-512 register).
const KEYS: usize = 16;

/// A prompt's causal attention (many new rows), blocked: per KV head the keys
/// are transposed once, so a register of 16 scores fills from one broadcast
/// query value and one load per dimension, with no horizontal sums; the
/// values are then summed for 8 query rows per load. The softmax runs 16
/// lanes wide with the encoder's polynomial exp (2e-7 relative).
#[cfg(target_arch = "x86_64")]
fn prompt_attention(
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
    let new = q.len() / width;
    let positions = (past + new).div_ceil(KEYS) * KEYS;
    // keys[g][d][p], zero past the last position.
    let mut keys = vec![0f32; kv_heads * head_dim * positions];
    keys.par_chunks_mut(head_dim * positions).enumerate().for_each(|(g, keys)| {
        for (p, row) in k_cache.chunks_exact(kv_width).take(past + new).enumerate() {
            for (d, &v) in row[g * head_dim..(g + 1) * head_dim].iter().enumerate() {
                keys[d * positions + p] = v;
            }
        }
    });
    let blocks = new.div_ceil(BLOCK_ROWS);
    let dst = super::packed::Out(out.as_mut_ptr());
    // Later blocks see more keys: rayon's splitting keeps both cores busy.
    (0..blocks * heads).into_par_iter().for_each(|task| {
        let dst = dst;
        let (block, h) = (task / heads, task % heads);
        let rows = block * BLOCK_ROWS..((block + 1) * BLOCK_ROWS).min(new);
        let g = h / (heads / kv_heads);
        let job = PromptBlock {
            q,
            width,
            head: h * head_dim,
            head_dim,
            rows,
            past,
            keys: &keys[g * head_dim * positions..(g + 1) * head_dim * positions],
            positions,
            values: v_cache,
            kv_width,
            kv_offset: g * head_dim,
        };
        // SAFETY: the features were checked by the caller; `dst` has `new`
        // rows of `width` and only this task writes this head's columns of its rows.
        unsafe { job.run_avx512(dst.0) };
    });
}

/// One task of [`prompt_attention`]: query rows `rows` of one head.
#[cfg(target_arch = "x86_64")]
struct PromptBlock<'a> {
    q: &'a [f32],
    width: usize,
    /// The head's first column in `q` and the output.
    head: usize,
    head_dim: usize,
    rows: std::ops::Range<usize>,
    past: usize,
    /// This KV head's keys, `[head_dim][positions]`.
    keys: &'a [f32],
    positions: usize,
    values: &'a [f32],
    kv_width: usize,
    kv_offset: usize,
}

#[cfg(target_arch = "x86_64")]
impl PromptBlock<'_> {
    /// # Safety
    /// AVX-512F and FMA; `out` holds the query rows' `width` columns each.
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn run_avx512(&self, out: *mut f32) {
        use std::arch::x86_64::*;
        let n = self.rows.len();
        let d = self.head_dim;
        let scale = 1.0 / (d as f32).sqrt();
        // Row r sees positions < past + first + r + 1; compute up to the last row's end.
        let seen = |r: usize| self.past + self.rows.start + r + 1;
        let span = seen(n - 1).div_ceil(KEYS) * KEYS;
        let mut scores = vec![0f32; BLOCK_ROWS * span];
        let query = |r: usize| &self.q[(self.rows.start + r) * self.width + self.head..][..d];
        // SAFETY (for the loads and stores below): key loads read 16 of a
        // row of `positions` ≥ span; score stores 16 of a row of `span`;
        // value loads 16 of a head's `d` columns.
        for p0 in (0..span).step_by(KEYS) {
            let mut acc = [_mm512_setzero_ps(); BLOCK_ROWS];
            for i in 0..d {
                let k = unsafe { _mm512_loadu_ps(self.keys.as_ptr().add(i * self.positions + p0)) };
                for (r, acc) in acc.iter_mut().enumerate().take(n) {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(query(r)[i]), k, *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate().take(n) {
                unsafe {
                    _mm512_storeu_ps(scores.as_mut_ptr().add(r * span + p0), _mm512_mul_ps(*acc, _mm512_set1_ps(scale)))
                };
            }
        }
        let mut sums = [0f32; BLOCK_ROWS];
        for (r, sum) in sums.iter_mut().enumerate().take(n) {
            // Lane-wise maxima and sums over whole registers (the span is
            // whole registers; hidden positions are -inf, then 0).
            let row = &mut scores[r * span..(r + 1) * span];
            row[seen(r)..].fill(f32::NEG_INFINITY);
            let mut maxima = [f32::NEG_INFINITY; LANES];
            for chunk in row.chunks_exact(LANES) {
                for l in 0..LANES {
                    maxima[l] = if chunk[l] > maxima[l] { chunk[l] } else { maxima[l] };
                }
            }
            let max = maxima.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            for s in row.iter_mut() {
                *s = exp(*s - max);
            }
            row[seen(r)..].fill(0.0);
            let mut lanes = [0f32; LANES];
            for chunk in row.chunks_exact(LANES) {
                for l in 0..LANES {
                    lanes[l] += chunk[l];
                }
            }
            *sum = lanes.iter().sum();
        }
        for c in (0..d).step_by(KEYS) {
            let mut acc = [_mm512_setzero_ps(); BLOCK_ROWS];
            for p in 0..seen(n - 1) {
                let v = unsafe { _mm512_loadu_ps(self.values.as_ptr().add(p * self.kv_width + self.kv_offset + c)) };
                for (r, acc) in acc.iter_mut().enumerate().take(n) {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[r * span + p]), v, *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate().take(n) {
                let row = (self.rows.start + r) * self.width + self.head + c;
                // SAFETY: row r's head columns c..c + 16, inside `out`, this task's alone.
                unsafe { _mm512_storeu_ps(out.add(row), _mm512_mul_ps(*acc, _mm512_set1_ps(1.0 / sums[r]))) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
    }

    /// One step's sequences in one call, against `attend` per row and head
    /// (the reference): a decoding row, a few rows and a prompt long enough
    /// for the blocked path, each over its own cache with earlier positions;
    /// grouped heads and head sizes of one and several registers. With
    /// ggml's order every row takes `attend` and must equal it to the bit.
    #[test]
    fn step_attention_matches_row_attention() {
        for (heads, kv_heads, head_dim) in [(2, 1, 16), (6, 2, 64), (3, 3, 32)] {
            let shape = AttentionShape { heads, head_dim };
            let (width, kv_width) = (heads * head_dim, kv_heads * head_dim);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let mut seed = (heads * 100 + head_dim) as u64;
            // (past, new rows) per sequence.
            let shapes = [(40, 1), (5, 3), (7, 37), (0, 9)];
            let caches: Vec<(Vec<f32>, Vec<f32>)> = shapes
                .iter()
                .map(|&(past, new)| {
                    let len = (past + new) * kv_width;
                    ((0..len).map(|_| noise(&mut seed)).collect(), (0..len).map(|_| noise(&mut seed)).collect())
                })
                .collect();
            let rows: usize = shapes.iter().map(|s| s.1).sum();
            let q: Vec<f32> = (0..rows * width).map(|_| noise(&mut seed)).collect();
            let sequences: Vec<Sequence> =
                shapes.iter().zip(&caches).map(|(&(past, rows), (k, v))| Sequence { k, v, past, rows }).collect();
            for ggml_order in [false, true] {
                let mut got = vec![0f32; q.len()];
                cached_attention(&q, &sequences, shape, kv_heads, ggml_order, &mut got);
                let mut row = 0;
                for (&(past, new), (k, v)) in shapes.iter().zip(&caches) {
                    for t in 0..new {
                        for h in 0..heads {
                            let mut want = vec![0f32; head_dim];
                            let offset = (h / (heads / kv_heads)) * head_dim;
                            let head = KvHead { k, v, stride: kv_width, offset };
                            attend(&q[row * width + h * head_dim..][..head_dim], &head, past + t + 1, scale, &mut want);
                            let got = &got[row * width + h * head_dim..][..head_dim];
                            if ggml_order {
                                assert_eq!(got, &want[..], "row {row} head {h}");
                            }
                            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                                assert!(
                                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                                    "row {row} head {h} [{i}]: {g} vs {w}"
                                );
                            }
                        }
                        row += 1;
                    }
                }
                assert_eq!(row, rows);
            }
        }
    }
}
