//! The CPU backend: the executable specification of every op. Matrix
//! products go to the `gemm` crate (runtime-dispatched AVX-512/AVX2/scalar
//! micro-kernels, both cores through rayon); the rest is written so the
//! compiler vectorises it, and compiled once per instruction set with the
//! widest one chosen at run time (see [`dispatch!`]).

use rayon::prelude::*;

use super::{Activation, AttentionShape, SeqLayout, quant};

/// Calls `$generic` through a copy compiled for AVX-512 or AVX2+FMA when the
/// processor has it, else the baseline build. The generic bodies are
/// `#[inline(always)]` so each copy is vectorised for its own ISA.
macro_rules! dispatch {
    ($generic:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl,avx512dq,fma")]
            unsafe fn avx512<F: FnOnce() -> R, R>(f: F) -> R { f() }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<F: FnOnce() -> R, R>(f: F) -> R { f() }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the processor supports the enabled features (checked above).
                unsafe { avx512(|| $generic($($arg),*)) }
            } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                unsafe { avx2(|| $generic($($arg),*)) }
            } else {
                $generic($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $generic($($arg),*)
        }
    }};
}

pub(super) const LANES: usize = 16;

/// Dot product with 16 independent accumulators, so it vectorises without
/// reassociating a single running sum.
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, ar) = a.split_at(a.len() / LANES * LANES);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in ar.iter().zip(br) {
        sum = x.mul_add(*y, sum);
    }
    sum
}

/// e^x for x ≤ 0 ranges used here (softmax, erf): Cody–Waite range
/// reduction and a degree-6 polynomial; relative error below 2e-7.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    // Integer-lane arithmetic only (no float-to-int casts, which do not
    // vectorise): adding 1.5·2²³ rounds x·log2(e) to the nearest integer n
    // and leaves n in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x.mul_add(std::f32::consts::LOG2_E, SHIFTER);
    let n = shifted - SHIFTER;
    let scale = f32::from_bits((shifted.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127)) << 23);
    let r = n.mul_add(-0.693_145_75, x);
    let r = n.mul_add(-1.428_606_8e-6, r);
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    p * scale
}

/// erf, branch free so it vectorises: the Maclaurin series (to x¹³) below
/// |x| = 0.5, where the tail formula loses digits to cancellation, and
/// Abramowitz & Stegun 7.1.26 above. Absolute error below 3e-7 in f32.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let tail = 1.0 - poly * exp(-a * a);
    let x2 = a * a;
    let series = a
        * std::f32::consts::FRAC_2_SQRT_PI
        * (1.0
            + x2 * (-1.0 / 3.0
                + x2 * (0.1 + x2 * (-1.0 / 42.0 + x2 * (1.0 / 216.0 + x2 * (-1.0 / 1320.0 + x2 / 9360.0))))));
    let y = if a < 0.5 { series } else { tail };
    y.copysign(x)
}

#[inline(always)]
fn activate_rows(out: &mut [f32], bias: Option<&[f32]>, act: Activation, n: usize) {
    for row in out.chunks_exact_mut(n) {
        if let Some(bias) = bias {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
        match act {
            Activation::None => {}
            Activation::Gelu => {
                for o in row.iter_mut() {
                    *o = 0.5 * *o * (1.0 + erf(*o * std::f32::consts::FRAC_1_SQRT_2));
                }
            }
            Activation::Tanh => {
                for o in row.iter_mut() {
                    let e = exp(-2.0 * o.abs());
                    *o = ((1.0 - e) / (1.0 + e)).copysign(*o);
                }
            }
        }
    }
}

#[inline(always)]
fn to_bf16_generic(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = super::half::f32_to_bf16(*s);
    }
}

/// Rounds a row to bf16 (the AMX path's activations).
pub(super) fn to_bf16_row(src: &[f32], dst: &mut [u16]) {
    dispatch!(to_bf16_generic(src, dst))
}

/// Applies `act` in place (a matmul epilogue on one finished tile row).
pub(super) fn activate(values: &mut [f32], act: Activation) {
    if act != Activation::None {
        let n = values.len();
        dispatch!(activate_rows(values, None, act, n))
    }
}

/// Rows per parallel task for row-wise ops: big enough to amortise the task.
fn rows_per_task(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

/// A matrix in memory: element (i, j) is at `ptr + i·row_stride + j·col_stride`.
#[derive(Clone, Copy)]
struct Strided<P> {
    ptr: P,
    row_stride: usize,
    col_stride: usize,
}

fn row_major<P>(ptr: P, cols: usize) -> Strided<P> {
    Strided { ptr, row_stride: cols, col_stride: 1 }
}

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` through the gemm crate.
///
/// # Safety
/// Every element the three views address for these sizes must lie inside
/// live allocations, and `dst` must not overlap `lhs` or `rhs`.
unsafe fn strided_matmul(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col_stride as isize,
            dst.row_stride as isize,
            false,
            lhs.ptr,
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.ptr,
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    act: Activation,
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    let parallelism = if m * n * k >= 1 << 18 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: slices are row-major with the stated sizes (checked by the
    // caller): x is m×k, w is k×n, out is m×n.
    unsafe {
        strided_matmul(
            (m, n, k),
            row_major(out.as_mut_ptr(), n),
            row_major(x.as_ptr(), k),
            row_major(w.as_ptr(), n),
            parallelism,
        );
    }
    if bias.is_some() || act != Activation::None {
        out.par_chunks_mut(n * rows_per_task(n)).for_each(|rows| dispatch!(activate_rows(rows, bias, act, n)));
    }
}

#[inline(always)]
fn layer_norm_rows(x: &mut [f32], residual: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32, width: usize) {
    for (i, row) in x.chunks_exact_mut(width).enumerate() {
        if let Some(residual) = residual {
            for (v, r) in row.iter_mut().zip(&residual[i * width..(i + 1) * width]) {
                *v += r;
            }
        }
        let mut acc = [0f32; LANES];
        for chunk in row.chunks(LANES) {
            for (a, v) in acc.iter_mut().zip(chunk) {
                *a += v;
            }
        }
        let mean = acc.iter().sum::<f32>() / width as f32;
        let mut acc = [0f32; LANES];
        for chunk in row.chunks(LANES) {
            for (a, v) in acc.iter_mut().zip(chunk) {
                let d = v - mean;
                *a = d.mul_add(d, *a);
            }
        }
        let inv = 1.0 / (acc.iter().sum::<f32>() / width as f32 + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = ((*v - mean) * inv).mul_add(*g, *b);
        }
    }
}

/// Outputs per parallel task of a quantized product: a few rows of weights,
/// enough to amortise the task.
const QUANT_ROWS_PER_TASK: usize = 64;

/// Up to this many activation rows (sequences decoded together), quantized
/// products run on the awake team rather than rayon.
const TEAM_MAX_ROWS: usize = 16;

/// From this many activation rows (a prompt's prefill), block-quantized
/// weights asked to (`Precision::Bf16`) run on AMX tiles where the processor
/// has them: the weight is expanded to bf16 once per call and reused by
/// every row. The block dot products round activations to 8 bits per block
/// (as llama.cpp does); bf16's 8-bit mantissa is as close to f32. Float
/// weights keep the f32 path, which bf16 would round.
const AMX_MIN_ROWS: usize = 32;

/// `x[m, k] · wᵀ` (`[m, n]`).
pub(super) fn linear_quantized(x: &[f32], w: super::QuantRows<'_>, m: usize) -> Vec<f32> {
    let (k, n) = (w.k, w.n);
    let row_bytes = w.dtype.row_bytes(k);
    if m >= AMX_MIN_ROWS && w.prefill == super::Precision::Bf16 && w.dtype.is_quantized() && super::amx::available() {
        let tiles = super::amx::AmxWeights::from_rows(k, n, &|j, values| {
            dequantize_row(w.dtype, &w.bytes[j * row_bytes..(j + 1) * row_bytes], values)
        });
        return super::amx::matmul(x, &tiles, None, m, &|_| {});
    }
    let mut out = vec![0f32; m * n];
    let activations: Vec<_> = x.chunks_exact(k).map(|row| quant::quantize_activations(w.dtype, row)).collect();
    // `outputs` holds m values per weight row, for rows from `first_row` on;
    // activation rows go four at a time, sharing each weight block's unpacking.
    let products = |outputs: &mut [f32], first_row: usize| {
        for (r, outputs) in outputs.chunks_exact_mut(m).enumerate() {
            let j = first_row + r;
            let row = &w.bytes[j * row_bytes..(j + 1) * row_bytes];
            let mut fours = outputs.chunks_exact_mut(4);
            let mut acts = activations.chunks_exact(4);
            for (o, a) in (&mut fours).zip(&mut acts) {
                o.copy_from_slice(&quant::vec_dot_rows(w.dtype, row, [&a[0], &a[1], &a[2], &a[3]]));
            }
            let (o, a) = (fours.into_remainder(), acts.remainder());
            match a {
                [] => {}
                [x] => o[0] = quant::vec_dot(w.dtype, row, x),
                [x, y] => o.copy_from_slice(&quant::vec_dot_rows(w.dtype, row, [x, y])),
                [x, y, z] => o.copy_from_slice(&quant::vec_dot_rows(w.dtype, row, [x, y, z])),
                _ => unreachable!("a remainder of chunks of four"),
            }
        }
    };
    // Weight-row major (m outputs per weight row): each weight row is read
    // once for all m activation rows. With one row that is `out` itself.
    let mut transposed = if m == 1 { Vec::new() } else { vec![0f32; n * m] };
    let target: &mut [f32] = if m == 1 { &mut out } else { &mut transposed };
    if m <= TEAM_MAX_ROWS {
        // Decoding steps: the awake team splits the weight rows (see team.rs).
        let team = super::team::Team::global();
        let per = n.div_ceil(team.chunks_for(n));
        let parts: Vec<std::sync::Mutex<&mut [f32]>> = target.chunks_mut(per * m).map(std::sync::Mutex::new).collect();
        team.run(parts.len(), &|part| {
            products(&mut parts[part].lock().unwrap_or_else(|e| e.into_inner()), part * per);
        });
    } else {
        target
            .par_chunks_mut(QUANT_ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, chunk)| products(chunk, task * QUANT_ROWS_PER_TASK));
    }
    if m > 1 {
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = transposed[j * m + i];
            }
        }
    }
    out
}

/// [`quant::dequantize_row`] compiled for the widest instruction set here
/// (and written out for Q4_1, the default generator's type).
pub(super) fn dequantize_row(dtype: quant::GgmlType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if dtype == quant::GgmlType::Q4_1 && super::quant_x86::available() {
        assert!(bytes.len() >= dtype.row_bytes(out.len()));
        // SAFETY: the features are present and the row holds out.len() values.
        unsafe { super::quant_x86::dequantize_q4_1(bytes, out) };
        return;
    }
    use quant::dequantize_row_inline;
    dispatch!(dequantize_row_inline(dtype, bytes, out))
}

pub(super) fn add_layer_norm(
    x: &mut [f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    width: usize,
) {
    let rows = rows_per_task(width);
    x.par_chunks_mut(width * rows).enumerate().for_each(|(task, chunk)| {
        let residual = residual.map(|r| &r[task * rows * width..task * rows * width + chunk.len()]);
        dispatch!(layer_norm_rows(chunk, residual, gamma, beta, eps, width))
    });
}

pub(super) fn embed(table: &[f32], ids: &[u32], extra: &[(&[f32], &[u32])], width: usize, out: &mut [f32]) {
    for (t, row) in out.chunks_exact_mut(width).enumerate() {
        let id = ids[t] as usize;
        row.copy_from_slice(&table[id * width..(id + 1) * width]);
        for (table, ids) in extra {
            let id = ids[t] as usize;
            for (o, v) in row.iter_mut().zip(&table[id * width..(id + 1) * width]) {
                *o += v;
            }
        }
    }
}

#[inline(always)]
fn softmax_rows(scores: &mut [f32], len: usize, scale: f32) {
    for row in scores.chunks_exact_mut(len) {
        // Whole 16-lane chunks with lane-wise maxima and sums (kept in
        // registers, so the loops vectorise), then the ragged tail.
        let whole = len / LANES * LANES;
        let mut maxima = [f32::NEG_INFINITY; LANES];
        for chunk in row[..whole].chunks_exact(LANES) {
            for l in 0..LANES {
                maxima[l] = if chunk[l] > maxima[l] { chunk[l] } else { maxima[l] };
            }
        }
        let max = row[whole..].iter().chain(&maxima).fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
        let mut sums = [0f32; LANES];
        for chunk in row[..whole].chunks_exact_mut(LANES) {
            for l in 0..LANES {
                chunk[l] = exp((chunk[l] - max) * scale);
                sums[l] += chunk[l];
            }
        }
        let mut sum = sums.iter().sum::<f32>();
        for s in &mut row[whole..] {
            *s = exp((*s - max) * scale);
            sum += *s;
        }
        let inv = 1.0 / sum;
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
}

/// One head of one sequence: softmax(Q Kᵀ / √d) V as two small matrix
/// products read in place from the fused QKV rows (strided), written into
/// this head's columns of `out`.
fn attend_head(
    qkv: &[f32],
    rows: std::ops::Range<usize>,
    head: usize,
    shape: AttentionShape,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (d, hidden) = (shape.head_dim, shape.heads * shape.head_dim);
    let stride = 3 * hidden;
    let len = rows.len();
    let base = rows.start * 3 * hidden + head * d;
    scores.resize(len * len, 0.0);
    let in_qkv = |offset: usize| Strided { ptr: qkv[offset..].as_ptr(), row_stride: stride, col_stride: 1 };
    // SAFETY: Q, K and V of this head are `len` rows of `d` values at row
    // stride `stride` from `base`, `base + hidden`, `base + 2·hidden`, all
    // inside `qkv` (whose rows cover this sequence); `scores` is len×len;
    // `out` holds this sequence's len rows of `hidden`, and the head's
    // columns start at head·d.
    unsafe {
        // Kᵀ: element (j, t) of the transposed view is K[t, j].
        let keys = in_qkv(base + hidden);
        let keys_t = Strided { ptr: keys.ptr, row_stride: 1, col_stride: stride };
        let scores_view = row_major(scores.as_mut_ptr(), len);
        strided_matmul((len, len, d), scores_view, in_qkv(base), keys_t, gemm::Parallelism::None);
    }
    dispatch!(softmax_rows(scores, len, 1.0 / (d as f32).sqrt()));
    // SAFETY: as above.
    unsafe {
        let dst = Strided { ptr: out[head * d..].as_mut_ptr(), row_stride: hidden, col_stride: 1 };
        strided_matmul(
            (len, d, len),
            dst,
            row_major(scores.as_ptr(), len),
            in_qkv(base + 2 * hidden),
            gemm::Parallelism::None,
        );
    }
}

pub(super) fn attention(qkv: &[f32], layout: &SeqLayout, shape: AttentionShape, out: &mut [f32]) {
    let hidden = shape.heads * shape.head_dim;
    // Split the output by sequence, then run (sequence, head) pairs in parallel.
    let mut per_seq: Vec<(usize, &mut [f32])> = Vec::with_capacity(layout.len());
    let mut rest = out;
    for seq in 0..layout.len() {
        let (mine, tail) = rest.split_at_mut(layout.range(seq).len() * hidden);
        per_seq.push((seq, mine));
        rest = tail;
    }
    per_seq.into_par_iter().for_each(|(seq, seq_out)| {
        let mut scores = Vec::new();
        for head in 0..shape.heads {
            attend_head(qkv, layout.range(seq), head, shape, &mut scores, seq_out);
        }
    });
}

pub(super) fn mean_pool(x: &[f32], layout: &SeqLayout, width: usize, out: &mut [f32]) {
    for (seq, pooled) in out.chunks_exact_mut(width).enumerate() {
        let rows = layout.range(seq);
        let n = rows.len().max(1) as f32;
        for row in rows {
            for (p, v) in pooled.iter_mut().zip(&x[row * width..(row + 1) * width]) {
                *p += v;
            }
        }
        for p in pooled.iter_mut() {
            *p /= n;
        }
    }
}

#[inline(always)]
fn dot_rows_generic(query: &[f32], rows: &[f32], out: &mut [f32]) {
    for (row, o) in rows.chunks_exact(query.len()).zip(out.iter_mut()) {
        *o = dot(query, row);
    }
}

pub(super) fn dot_rows(query: &[f32], rows: &[f32], out: &mut [f32]) {
    dispatch!(dot_rows_generic(query, rows, out))
}

pub(super) fn l2_normalize(x: &mut [f32], width: usize) {
    for row in x.chunks_exact_mut(width) {
        let norm = dot(row, row).sqrt().max(1e-12);
        for v in row.iter_mut() {
            *v /= norm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_match_libm() {
        for i in -4000..=4000 {
            let x = i as f32 / 500.0;
            let (e, want) = (exp(x), x.exp());
            assert!(((e - want) / want).abs() < 3e-7, "exp({x}) = {e}, want {want}");
            let (erf_x, want) = (erf(x), libm::erff(x));
            assert!((erf_x - want).abs() < 3e-7, "erf({x}) = {erf_x}, want {want}");
        }
    }

    #[test]
    fn dot_matches_naive_sum_for_odd_lengths() {
        for len in [0, 1, 15, 16, 17, 33, 384] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - naive).abs() < 1e-4, "len {len}");
        }
    }
}
