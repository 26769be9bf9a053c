//! The CUDA kernels of `kernels-cu/`, compiled for the host as C++ with the
//! emulator in `tests/cuda_emu/shim.h` and checked against the CPU backend
//! (`aitl::backend`, the specification). It is the same source NVRTC
//! compiles for the GPU, so the kernels' indexing, barriers, shuffles,
//! tails and numerics are tested where no GPU exists (here and in CI); what
//! needs a real device (timing-dependent races, the CUDA math library's
//! last bits, register pressure) is not.
//!
//! Each kernel runs on fresh seeded random inputs with its outputs
//! poisoned first (NaN, or an odd bit pattern), so an element it never
//! writes fails. Tolerances, all against the CPU backend:
//! - f32 arithmetic (LayerNorm, RMSNorm, attention, L2 normalisation,
//!   GELU/tanh/sigmoid epilogues): |got − want| ≤ 1e-5 · max(1, |want|);
//!   summation orders differ and the CPU's exp/erf are polynomial
//!   approximations (≤ 3e-7);
//! - vector scores: the same bound, against the dot product of the
//!   (dequantized) rows;
//! - gathers, mean pooling, bias and add without activation, dtype
//!   conversions and top-k: bit for bit.
//!
//! A missing C++ compiler fails the test with a message, never skips it.

use aitl::backend::{
    Activation, AttentionShape, Device, SeqLayout, Tensor, dot_rows,
    half::{bf16_to_f32 as from_bf16, f16_to_f32, f32_to_bf16 as to_bf16, f32_to_f16},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[path = "cuda_emu/harness.rs"]
mod harness;

use harness::*;

const TOPK_CHUNK: usize = 2048;
const NO_ID: u32 = u32::MAX;

// ---- elementwise ---------------------------------------------------------------

type ToHalf = unsafe extern "C" fn(*const f32, *mut u16, u32);
type FromHalf = unsafe extern "C" fn(*const u16, *mut f32, u32);
type ToHalfReference = fn(f32) -> u16;
type FromHalfReference = fn(u16) -> f32;

/// The values where rounding can go wrong: specials, both formats' exact
/// values, the halfway points between neighbours and one ulp either side.
fn conversion_inputs(rng: &mut StdRng) -> Vec<f32> {
    let mut values = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xff80_2000),
        f32::from_bits(0x7fff_ffff),
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::MAX,
        65504.0,
        65519.99,
        65520.0,
        2f32.powi(-24),
        2f32.powi(-25),
        1.5 * 2f32.powi(-25),
        2f32.powi(-26),
        2f32.powi(-14),
    ];
    let mut around = |x: f32| {
        for bits in [x.to_bits().wrapping_sub(1), x.to_bits(), x.to_bits().wrapping_add(1)] {
            values.push(f32::from_bits(bits));
        }
    };
    for h in 0..0x7c00u16 {
        let (x, next) = (f16_to_f32(h) as f64, f16_to_f32(h + 1) as f64);
        around(x as f32);
        around(((x + next) / 2.0) as f32);
    }
    for b in (0..0x7f80u16).step_by(7) {
        around(from_bf16(b));
        around(f32::from_bits(((b as u32) << 16) | 0x8000));
    }
    let mirrored: Vec<f32> = values.iter().map(|v| -v).collect();
    values.extend(mirrored);
    values.extend((0..50_000).map(|_| f32::from_bits(rng.random())));
    values
}

#[test]
fn dtype_conversions_match_the_rust_references_bit_for_bit() {
    let m = module("elementwise");
    let mut rng = StdRng::seed_from_u64(1);
    let inputs = conversion_inputs(&mut rng);
    let n = inputs.len() as u32;
    // A capped grid: the grid-stride loops go round several times.
    let launch = Launch::rows(48, 256);
    let to_half: [(&str, ToHalfReference); 2] = [("f32_to_f16", f32_to_f16), ("f32_to_bf16", to_bf16)];
    for (name, reference) in to_half {
        let kernel: ToHalf = m.kernel(name);
        let mut out = vec![0xdeadu16; inputs.len()];
        let (x, o) = (inputs.as_ptr(), out.as_mut_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(launch, &|| unsafe { kernel(x, o, n) });
        for (i, (&got, &x)) in out.iter().zip(&inputs).enumerate() {
            assert_eq!(got, reference(x), "{name}: input {i} ({x:e}, bits {:#010x})", x.to_bits());
        }
    }
    let patterns: Vec<u16> = (0..=u16::MAX).collect();
    let from_half: [(&str, FromHalfReference); 2] = [("f16_to_f32", f16_to_f32), ("bf16_to_f32", from_bf16)];
    for (name, reference) in from_half {
        let kernel: FromHalf = m.kernel(name);
        let mut out = nan(patterns.len());
        let (x, o) = (patterns.as_ptr(), out.as_mut_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(launch, &|| unsafe { kernel(x, o, u16::MAX as u32 + 1) });
        let want: Vec<f32> = patterns.iter().map(|&h| reference(h)).collect();
        assert_bits(name, &out, &want);
    }
}

type BiasAct = unsafe extern "C" fn(*mut f32, *const f32, u32, u32, u32);
type Add = unsafe extern "C" fn(*mut f32, *const f32, u32);

#[test]
fn bias_and_activation_epilogues_match_linear() {
    let m = module("elementwise");
    let bias_act: BiasAct = m.kernel("bias_act_f32");
    let mut rng = StdRng::seed_from_u64(2);
    for (rows, k, cols, grid) in [(1, 8, 37, 1), (7, 16, 1000, 3), (3, 5, 384, 64)] {
        let x = tensor(&[rows, k], uniform(&mut rng, rows * k, -2.0, 2.0));
        let w = tensor(&[k, cols], uniform(&mut rng, k * cols, -1.0, 1.0));
        let bias_values = uniform(&mut rng, cols, -1.0, 1.0);
        let bias = tensor(&[cols], bias_values.clone());
        // The product alone stands in for cuBLAS; the epilogue is the kernel's.
        let product = Device::Cpu.linear(&x, &w, None, Activation::None).unwrap().to_host().unwrap();
        let cases =
            [(0u32, Some(Activation::None)), (1, Some(Activation::Gelu)), (2, Some(Activation::Tanh)), (3, None)];
        for (act, activation) in cases {
            for with_bias in [false, true] {
                let want = match activation {
                    Some(a) => Device::Cpu.linear(&x, &w, with_bias.then_some(&bias), a).unwrap().to_host().unwrap(),
                    // Sigmoid has no CPU epilogue (a cross-encoder head applies it).
                    None => product
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            let v = (v + if with_bias { bias_values[i % cols] } else { 0.0 }) as f64;
                            (1.0 / (1.0 + (-v).exp())) as f32
                        })
                        .collect(),
                };
                let mut out = product.clone();
                let (o, b) = (out.as_mut_ptr(), if with_bias { bias_values.as_ptr() } else { std::ptr::null() });
                let (r, c) = (rows as u32, cols as u32);
                // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
                m.launch(Launch::rows(grid, 256), &|| unsafe { bias_act(o, b, r, c, act) });
                let what = format!("bias_act act={act} bias={with_bias} {rows}×{cols}");
                if act == 0 { assert_bits(&what, &out, &want) } else { assert_close(&what, &out, &want) }
            }
        }
    }

    let add: Add = m.kernel("add_f32");
    for len in [1usize, 37, 10_000] {
        let (mut x, y) = (uniform(&mut rng, len, -1.0, 1.0), uniform(&mut rng, len, -1.0, 1.0));
        let mut want = tensor(&[len], x.clone());
        Device::Cpu.add(&mut want, &tensor(&[len], y.clone())).unwrap();
        let (xp, yp) = (x.as_mut_ptr(), y.as_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(Launch::rows(len.div_ceil(256).min(8) as u32, 256), &|| unsafe { add(xp, yp, len as u32) });
        assert_bits("add_f32", &x, &want.to_host().unwrap());
    }
}

// ---- embeddings and norms ----------------------------------------------------------

type EmbedLayerNorm = unsafe extern "C" fn(
    *const u32,
    *const f32,
    *const u32,
    *const f32,
    *const u32,
    *const f32,
    *const f32,
    *const f32,
    *mut f32,
    u32,
    u32,
    f32,
);
type GatherRows = unsafe extern "C" fn(*const f32, *const u32, *mut f32, u32, u32);

/// Widths: odd, BERT-small and -base, not a multiple of 32, and wider than
/// the 2048 values the norms keep in registers.
const WIDTHS: [usize; 5] = [37, 384, 768, 1000, 2500];

#[test]
fn embed_layer_norm_matches_embed_then_layer_norm() {
    let m = module("embeddings");
    let kernel: EmbedLayerNorm = m.kernel("embed_layer_norm_f32");
    let mut rng = StdRng::seed_from_u64(3);
    let (vocab, positions, types) = (50, 40, 2);
    for (case, width) in WIDTHS.into_iter().enumerate() {
        let tokens = [1, 9, 3, 17, 2][case];
        let word = uniform(&mut rng, vocab * width, -1.0, 1.0);
        let position = uniform(&mut rng, positions * width, -0.5, 0.5);
        let token_type = uniform(&mut rng, types * width, -0.1, 0.1);
        let gamma = uniform(&mut rng, width, 0.5, 1.5);
        let beta = uniform(&mut rng, width, -0.5, 0.5);
        let ids: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..vocab as u32)).collect();
        let position_ids: Vec<u32> = (0..tokens as u32).collect();
        let type_ids: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..types as u32)).collect();
        let tables = (tensor(&[vocab, width], word.clone()), tensor(&[positions, width], position.clone()));
        let type_table = tensor(&[types, width], token_type.clone());
        // Both pairs, the first only, the second only, neither.
        for (first, second) in [(true, true), (true, false), (false, true), (false, false)] {
            let mut extra: Vec<(&Tensor, &[u32])> = Vec::new();
            if first {
                extra.push((&tables.1, &position_ids[..]));
            }
            if second {
                extra.push((&type_table, &type_ids[..]));
            }
            let mut want = Device::Cpu.embed(&tables.0, &ids, &extra).unwrap();
            let (g, b) = (tensor(&[width], gamma.clone()), tensor(&[width], beta.clone()));
            Device::Cpu.add_layer_norm(&mut want, None, &g, &b, 1e-12).unwrap();

            let mut out = nan(tokens * width);
            let pick = |on: bool, ids: &[u32], table: &[f32]| {
                if on { (ids.as_ptr(), table.as_ptr()) } else { (std::ptr::null(), std::ptr::null()) }
            };
            let ((i1, t1), (i2, t2)) = (pick(first, &position_ids, &position), pick(second, &type_ids, &token_type));
            let (i0, t0, gp, bp, o) = (ids.as_ptr(), word.as_ptr(), gamma.as_ptr(), beta.as_ptr(), out.as_mut_ptr());
            let (t, w) = (tokens as u32, width as u32);
            // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
            m.launch(Launch::rows(t, 256), &|| unsafe { kernel(i0, t0, i1, t1, i2, t2, gp, bp, o, t, w, 1e-12) });
            assert_close(
                &format!("embed_layer_norm {tokens}×{width} ({first}, {second})"),
                &out,
                &want.to_host().unwrap(),
            );
        }
    }
}

#[test]
fn gather_rows_copies_rows_exactly() {
    let m = module("embeddings");
    let kernel: GatherRows = m.kernel("gather_rows_f32");
    let mut rng = StdRng::seed_from_u64(4);
    for (width, count, grid) in [(37, 1, 1), (384, 20, 20), (1000, 9, 4)] {
        let source_rows = 30;
        let x = uniform(&mut rng, source_rows * width, -1.0, 1.0);
        let rows: Vec<u32> = (0..count).map(|_| rng.random_range(0..source_rows as u32)).collect();
        let want: Vec<f32> =
            rows.iter().flat_map(|&r| x[r as usize * width..(r as usize + 1) * width].iter().copied()).collect();
        let mut out = nan(count * width);
        let (xp, rp, o) = (x.as_ptr(), rows.as_ptr(), out.as_mut_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(Launch::rows(grid, 256), &|| unsafe { kernel(xp, rp, o, count as u32, width as u32) });
        assert_bits(&format!("gather_rows {count}×{width}"), &out, &want);
    }
}

type CopyColumns = unsafe extern "C" fn(*const f32, *mut f32, u32, u32, u32, u32);

/// `copy_columns_f32` is what `Device::split_columns` runs on a GPU: each
/// group of a fused projection as its own matrix, equal to the CPU's split.
#[test]
fn copy_columns_splits_like_the_cpu_backend() {
    let m = module("layout");
    let kernel: CopyColumns = m.kernel("copy_columns_f32");
    let mut rng = StdRng::seed_from_u64(11);
    for (rows, widths) in [(1, vec![7, 7, 7]), (5, vec![384, 96, 96]), (3, vec![1, 300, 37])] {
        let width: usize = widths.iter().sum();
        let x = uniform(&mut rng, rows * width, -1.0, 1.0);
        let want = Device::Cpu.split_columns(&tensor(&[rows, width], x.clone()), &widths).unwrap();
        let mut start = 0;
        for (part, &w) in widths.iter().enumerate() {
            let mut out = nan(rows * w);
            let (xp, o) = (x.as_ptr(), out.as_mut_ptr());
            // Fewer row blocks than rows: blocks stride over rows.
            let grid = ((w as u32).div_ceil(256), (rows as u32).min(2), 1);
            // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
            m.launch(Launch::new(grid, 256), &|| unsafe {
                kernel(xp, o, rows as u32, width as u32, start as u32, w as u32)
            });
            assert_bits(&format!("copy_columns {rows}×{width} part {part}"), &out, &want[part].to_host().unwrap());
            start += w;
        }
    }
}

type AddLayerNorm = unsafe extern "C" fn(*mut f32, *const f32, *const f32, *const f32, u32, u32, f32);
type RmsNorm = unsafe extern "C" fn(*const f32, *const f32, *mut f32, u32, u32, f32);

#[test]
fn add_layer_norm_matches_the_cpu_backend() {
    let m = module("layer_norm");
    let kernel: AddLayerNorm = m.kernel("add_layer_norm_f32");
    let mut rng = StdRng::seed_from_u64(5);
    for (case, width) in WIDTHS.into_iter().enumerate() {
        let rows = [1, 7, 2, 5, 3][case];
        // An offset mean, so a one-pass variance would show its cancellation.
        let x = uniform(&mut rng, rows * width, 2.0, 6.0);
        let residual = uniform(&mut rng, rows * width, -1.0, 1.0);
        let gamma = uniform(&mut rng, width, 0.5, 1.5);
        let beta = uniform(&mut rng, width, -0.5, 0.5);
        for (with_residual, eps) in [(true, 1e-12), (false, 1e-5)] {
            let mut want = tensor(&[rows, width], x.clone());
            let r = tensor(&[rows, width], residual.clone());
            let (g, b) = (tensor(&[width], gamma.clone()), tensor(&[width], beta.clone()));
            Device::Cpu.add_layer_norm(&mut want, with_residual.then_some(&r), &g, &b, eps).unwrap();

            let mut out = x.clone();
            let res = or_null(with_residual.then_some(&residual[..]));
            let (o, gp, bp) = (out.as_mut_ptr(), gamma.as_ptr(), beta.as_ptr());
            // Fewer blocks than rows on one case: blocks stride over rows.
            let grid = if case == 1 { 3 } else { rows as u32 };
            // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
            m.launch(Launch::rows(grid, 256), &|| unsafe { kernel(o, res, gp, bp, rows as u32, width as u32, eps) });
            assert_close(
                &format!("add_layer_norm {rows}×{width} residual={with_residual}"),
                &out,
                &want.to_host().unwrap(),
            );
        }
    }
}

#[test]
fn rms_norm_matches_the_cpu_backend() {
    let m = module("layer_norm");
    let kernel: RmsNorm = m.kernel("rms_norm_f32");
    let mut rng = StdRng::seed_from_u64(6);
    for (case, width) in WIDTHS.into_iter().enumerate() {
        let rows = [1, 4, 2, 3, 2][case];
        let x = uniform(&mut rng, rows * width, -3.0, 3.0);
        let gamma = uniform(&mut rng, width, 0.5, 1.5);
        let want = Device::Cpu.rms_norm(&tensor(&[rows, width], x.clone()), &tensor(&[width], gamma.clone()), 1e-6);
        let mut out = nan(rows * width);
        let (xp, gp, o) = (x.as_ptr(), gamma.as_ptr(), out.as_mut_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(Launch::rows(rows as u32, 256), &|| unsafe { kernel(xp, gp, o, rows as u32, width as u32, 1e-6) });
        assert_close(&format!("rms_norm {rows}×{width}"), &out, &want.unwrap().to_host().unwrap());
    }
}

// ---- attention and pooling -------------------------------------------------------------

type Attention = unsafe extern "C" fn(*const f32, *const u32, *mut f32, u32, u32, f32);

#[test]
fn varlen_attention_matches_the_cpu_backend_for_every_head_dim() {
    let m = module("attention");
    let mut rng = StdRng::seed_from_u64(7);
    // Sequences of one token, a batch of one, and sequences longer than a
    // block's query rows and than a key tile (150 and 300 tokens).
    let layouts: [&[usize]; 3] = [&[1], &[3, 1, 150], &[300, 2]];
    for (head_dim, heads) in [(16, 3), (32, 2), (64, 2), (128, 1)] {
        let kernel: Attention = m.kernel(&format!("varlen_attention_f32_d{head_dim}"));
        let split = match head_dim {
            16 | 32 => 1,
            64 => 2,
            _ => 4,
        };
        let rows_per_block = 128 / split;
        for lengths in layouts {
            let tokens: usize = lengths.iter().sum();
            let hidden = heads * head_dim;
            let qkv = uniform(&mut rng, tokens * 3 * hidden, -1.0, 1.0);
            let want = Device::Cpu
                .attention(
                    &tensor(&[tokens, 3 * hidden], qkv.clone()),
                    &SeqLayout::from_lengths(lengths),
                    AttentionShape { heads, head_dim },
                )
                .unwrap();
            let cu = offsets(lengths);
            let max_len = *lengths.iter().max().unwrap();
            let grid = (max_len.div_ceil(rows_per_block) as u32, heads as u32, lengths.len() as u32);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let mut out = nan(tokens * hidden);
            let (q, c, o, seqs) = (qkv.as_ptr(), cu.as_ptr(), out.as_mut_ptr(), lengths.len() as u32);
            // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
            m.launch(Launch::new(grid, 128), &|| unsafe { kernel(q, c, o, seqs, heads as u32, scale) });
            assert_close(&format!("attention d={head_dim} heads={heads} {lengths:?}"), &out, &want.to_host().unwrap());
        }
    }
}

type MeanPool = unsafe extern "C" fn(*const f32, *const u32, *mut f32, u32, u32);
type L2Normalize = unsafe extern "C" fn(*mut f32, u32, u32);

#[test]
fn mean_pool_and_l2_normalize_match_the_cpu_backend() {
    let m = module("pooling");
    let mean_pool: MeanPool = m.kernel("mean_pool_f32");
    let l2_normalize: L2Normalize = m.kernel("l2_normalize_f32");
    let mut rng = StdRng::seed_from_u64(8);
    let layouts: [&[usize]; 3] = [&[1], &[0, 3, 0, 150, 1], &[300, 0]];
    for (width, lengths) in [37, 384, 1000].into_iter().zip(layouts) {
        let tokens: usize = lengths.iter().sum();
        let x = uniform(&mut rng, tokens * width, -1.0, 1.0);
        let want = Device::Cpu.mean_pool(&tensor(&[tokens, width], x.clone()), &SeqLayout::from_lengths(lengths));
        let cu = offsets(lengths);
        let mut out = nan(lengths.len() * width);
        let (seqs, w) = (lengths.len() as u32, width as u32);
        let (xp, c, o) = (x.as_ptr(), cu.as_ptr(), out.as_mut_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(Launch::new((w.div_ceil(256), seqs, 1), 256), &|| unsafe { mean_pool(xp, c, o, seqs, w) });
        // Same summation order as the CPU: the same bits.
        assert_bits(&format!("mean_pool width={width} {lengths:?}"), &out, &want.unwrap().to_host().unwrap());
    }

    for (rows, width) in [(1, 37), (6, 384), (3, 768)] {
        let mut x = uniform(&mut rng, rows * width, -1.0, 1.0);
        // A zero row: the norm is clamped, and the row stays zero.
        x[..width].fill(0.0);
        let mut want = tensor(&[rows, width], x.clone());
        Device::Cpu.l2_normalize(&mut want).unwrap();
        let xp = x.as_mut_ptr();
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(Launch::rows(rows.min(4) as u32, 256), &|| unsafe { l2_normalize(xp, rows as u32, width as u32) });
        assert_close(&format!("l2_normalize {rows}×{width}"), &x, &want.to_host().unwrap());
    }
}

// ---- vector search -------------------------------------------------------------------

type ScoreRows<T> = unsafe extern "C" fn(
    *const T,
    u32,
    u32,
    *const f32,
    u32,
    *const u32,
    *const u32,
    *const u32,
    u32,
    *const u8,
    *mut f32,
);
type TopkChunks = unsafe extern "C" fn(*const f32, *const u32, u32, u32, *mut f32, *mut u32);

/// An index with everything the filters look at, and ties planted.
struct Index {
    n: usize,
    dim: usize,
    rows: Vec<f32>,
    queries: Vec<f32>,
    nq: usize,
    row_kind: Vec<u32>,
    kind_masks: Vec<u32>,
    allow_bits: Vec<u32>,
    allow_words: usize,
    live: Vec<u8>,
}

fn unit_rows(rng: &mut StdRng, count: usize, dim: usize) -> Vec<f32> {
    let mut rows = uniform(rng, count * dim, -1.0, 1.0);
    for row in rows.chunks_exact_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    rows
}

/// Rows holding the same vector as query 0 (the index has more than 2010 rows).
const TIED: [usize; 4] = [5, 17, 100, 2010];

fn index(rng: &mut StdRng, n: usize, dim: usize, nq: usize) -> Index {
    let mut rows = unit_rows(rng, n, dim);
    let mut queries = unit_rows(rng, nq, dim);
    // Ties: every 97th row repeats the row 1000 before it; query 0 is row 17,
    // and rows 5, 100 and 2010 are copies of it (a four-way tie at the top).
    for r in (1003..n).step_by(97) {
        rows.copy_within((r - 1000) * dim..(r - 999) * dim, r * dim);
    }
    queries[..dim].copy_from_slice(&rows[17 * dim..18 * dim]);
    for copy in TIED {
        rows.copy_within(17 * dim..18 * dim, copy * dim);
    }
    // Kinds 0..6, and some past the 32 a mask can name.
    let row_kind = (0..n).map(|_| if rng.random_bool(0.02) { 40 } else { rng.random_range(0..6) }).collect();
    let masks = [0, 1 << 2, 0b1001, 0, 1 << 5 | 1, u32::MAX, 0, 1 << 1, 0, 1 << 3];
    let kind_masks = (0..nq).map(|q| masks[q % masks.len()]).collect();
    let allow_words = n.div_ceil(32);
    let mut allow_bits: Vec<u32> = (0..nq * allow_words)
        .map(|i| {
            if i / allow_words == 3 { u32::MAX } else { (0..32).fold(0, |w, b| w | (rng.random_bool(0.8) as u32) << b) }
        })
        .collect();
    let mut live: Vec<u8> = (0..n).map(|_| rng.random_bool(0.95) as u8).collect();
    // The four tied rows stay visible to query 0 (whose kind mask is 0).
    for r in TIED {
        live[r] = 1;
        allow_bits[r / 32] |= 1 << (r % 32);
    }
    Index { n, dim, rows, queries, nq, row_kind, kind_masks, allow_bits, allow_words, live }
}

impl Index {
    fn passes(&self, q: usize, r: usize, allow: bool) -> bool {
        let mask = self.kind_masks[q];
        let kind = self.row_kind[r];
        let allowed = !allow || self.allow_bits[q * self.allow_words + r / 32] >> (r % 32) & 1 == 1;
        self.live[r] != 0 && (mask == 0 || (kind < 32 && mask >> kind & 1 == 1)) && allowed
    }

    /// What score_rows must produce, from rows as the device reads them.
    fn host_scores(&self, rows: &[f32], allow: bool) -> Vec<f32> {
        let mut scores = vec![0f32; self.nq * self.n];
        for (q, out) in scores.chunks_exact_mut(self.n).enumerate() {
            dot_rows(&self.queries[q * self.dim..(q + 1) * self.dim], rows, out);
            for (r, s) in out.iter_mut().enumerate() {
                if !self.passes(q, r, allow) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        scores
    }

    fn device_scores<T>(&self, m: &Module, name: &str, rows: &[T], allow: bool, grid: u32) -> Vec<f32> {
        let kernel: ScoreRows<T> = m.kernel(name);
        let mut scores = nan(self.nq * self.n);
        let (n, dim, nq, words) = (self.n as u32, self.dim as u32, self.nq as u32, self.allow_words as u32);
        let (rp, qp, kinds, masks) =
            (rows.as_ptr(), self.queries.as_ptr(), self.row_kind.as_ptr(), self.kind_masks.as_ptr());
        let (allow_p, live, out) =
            (or_null(allow.then_some(&self.allow_bits[..])), self.live.as_ptr(), scores.as_mut_ptr());
        let launch = Launch { grid: (grid, 1, 1), block: 256, shared_bytes: (self.nq * self.dim * 4) as u64 };
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(launch, &|| unsafe { kernel(rp, n, dim, qp, nq, kinds, masks, allow_p, words, live, out) });
        scores
    }
}

#[track_caller]
fn assert_scores(what: &str, got: &[f32], want: &[f32], n: usize) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f32::NEG_INFINITY || g == f32::NEG_INFINITY {
            assert_eq!(g, w, "{what}: query {}, row {}: filtered differently", i / n, i % n);
        }
    }
    assert_close(what, got, want);
}

/// The best k of each query's row of `scores` by (score desc, id asc), NaN
/// as -inf, -inf dropped: what a host search returns.
fn host_topk(scores: &[f32], ids: Option<&[u32]>, n: usize, k: usize) -> Vec<Vec<(u32, u32)>> {
    scores
        .chunks_exact(n.max(1))
        .enumerate()
        .map(|(q, row)| {
            let mut entries: Vec<(f32, u32)> = row
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    (if s.is_nan() { f32::NEG_INFINITY } else { s }, ids.map_or(i as u32, |ids| ids[q * n + i]))
                })
                .filter(|(s, _)| *s != f32::NEG_INFINITY)
                .collect();
            entries.sort_by(|a, b| b.0.partial_cmp(&a.0).expect("no NaN left").then(a.1.cmp(&b.1)));
            entries.truncate(k);
            entries.into_iter().map(|(s, id)| (id, s.to_bits())).collect()
        })
        .collect()
}

/// topk_chunks_f32 as the host drives it: passes until one chunk is left.
fn device_topk(m: &Module, scores: &[f32], ids: Option<&[u32]>, nq: usize, n: usize, k: usize) -> Vec<Vec<(u32, u32)>> {
    let kernel: TopkChunks = m.kernel("topk_chunks_f32");
    let (mut scores, mut ids, mut n) = (scores.to_vec(), ids.map(<[u32]>::to_vec), n);
    let mut passes = 0;
    loop {
        let chunks = n.div_ceil(TOPK_CHUNK).max(1);
        let mut out_scores = nan(nq * chunks * k);
        let mut out_ids = vec![0xdead_beef_u32; nq * chunks * k];
        let (s, i, os, oi) = (scores.as_ptr(), or_null(ids.as_deref()), out_scores.as_mut_ptr(), out_ids.as_mut_ptr());
        let launch = Launch::new((chunks as u32, nq as u32, 1), 1024);
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(launch, &|| unsafe { kernel(s, i, n as u32, k as u32, os, oi) });
        passes += 1;
        assert!(passes < 10, "top-k passes do not converge");
        (scores, ids, n) = (out_scores, Some(out_ids), chunks * k);
        if chunks == 1 {
            break;
        }
    }
    let ids = ids.expect("one pass ran");
    (0..nq)
        .map(|q| {
            (q * k..(q + 1) * k)
                .filter(|&e| scores[e] != f32::NEG_INFINITY)
                .map(|e| (ids[e], scores[e].to_bits()))
                .collect()
        })
        .collect()
}

#[test]
fn score_rows_and_topk_match_a_host_search() {
    let m = module("vector_search");
    let mut rng = StdRng::seed_from_u64(9);
    // Not a multiple of 8 rows; 10 queries is one full and one partial pass
    // of the kernel's 8 query accumulators.
    let index = index(&mut rng, 6003, 384, 10);
    let want = index.host_scores(&index.rows, true);
    let got = index.device_scores(m, "score_rows_f32", &index.rows, true, index.n.div_ceil(8) as u32);
    assert_scores("score_rows_f32", &got, &want, index.n);

    // The planted tie is exact on the device too, so its order rests on the ids.
    let top = host_topk(&got, None, index.n, 4);
    assert_eq!(top[0].iter().map(|e| e.0 as usize).collect::<Vec<_>>(), TIED, "query 0's tie: {:?}", top[0]);
    assert!(top[0].iter().all(|e| e.1 == top[0][0].1), "query 0's tie: {:?}", top[0]);
    for k in [1, 75, 1000] {
        let device = device_topk(m, &got, None, index.nq, index.n, k);
        assert_eq!(device, host_topk(&got, None, index.n, k), "top-{k} over score_rows_f32");
    }
}

#[test]
fn score_rows_of_half_rows_match_dequantized_rows() {
    let m = module("vector_search");
    let mut rng = StdRng::seed_from_u64(10);
    let index = index(&mut rng, 2011, 384, 3);
    let halves: Vec<u16> = index.rows.iter().map(|&v| f32_to_f16(v)).collect();
    let dequantized: Vec<f32> = halves.iter().map(|&h| f16_to_f32(h)).collect();
    // A capped grid (blocks stride over rows) and no allow-list.
    let got = index.device_scores(m, "score_rows_f16", &halves, false, 37);
    assert_scores("score_rows_f16", &got, &index.host_scores(&dequantized, false), index.n);

    let brains: Vec<u16> = index.rows.iter().map(|&v| to_bf16(v)).collect();
    let dequantized: Vec<f32> = brains.iter().map(|&b| from_bf16(b)).collect();
    let got = index.device_scores(m, "score_rows_bf16", &brains, true, 250);
    assert_scores("score_rows_bf16", &got, &index.host_scores(&dequantized, true), index.n);
}

#[test]
fn topk_breaks_ties_by_id_and_ranks_nan_last() {
    let m = module("vector_search");
    let mut rng = StdRng::seed_from_u64(11);
    let (nq, n) = (2, 5000);
    // Eight score levels (ties everywhere), -0.0 next to 0.0, NaN and -inf;
    // ids given and out of position order.
    let levels = [1.0, 0.5, 0.0, -0.0, -0.25, f32::NAN, f32::NEG_INFINITY, f32::INFINITY];
    let scores: Vec<f32> = (0..nq * n).map(|_| levels[rng.random_range(0..levels.len())]).collect();
    // Multiplying by an odd number is a bijection on u32: distinct ids.
    let ids: Vec<u32> = (0..nq * n).map(|i| (i as u32).wrapping_mul(2_654_435_761)).collect();
    for k in [1, 75, 1000] {
        let device = device_topk(m, &scores, Some(&ids[..]), nq, n, k);
        assert_eq!(device, host_topk(&scores, Some(&ids[..]), n, k), "top-{k} with ties");
    }
    // Fewer elements than k: the real ones, then nothing.
    let few = [0.5f32, f32::NAN, 2.0];
    let device = device_topk(m, &few, None, 1, few.len(), 75);
    assert_eq!(device, host_topk(&few, None, few.len(), 75));
    assert_eq!(device[0].iter().map(|e| e.0).collect::<Vec<_>>(), [2, 0]);

    // One pass as the contract states it: NaN ranks as -inf (its id kept),
    // then padding (-inf, NO_ID) up to k.
    let kernel: TopkChunks = m.kernel("topk_chunks_f32");
    let (mut scores, mut ids) = (nan(5), vec![0xdead_beef_u32; 5]);
    let (s, os, oi) = (few.as_ptr(), scores.as_mut_ptr(), ids.as_mut_ptr());
    // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
    m.launch(Launch::new((1, 1, 1), 1024), &|| unsafe { kernel(s, std::ptr::null(), 3, 5, os, oi) });
    assert_eq!(ids, [2, 0, 1, NO_ID, NO_ID]);
    assert_bits("one top-k pass", &scores, &[2.0, 0.5, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY]);
}
