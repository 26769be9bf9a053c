//! The decoder's CUDA kernels (quantized products, dequantization, decoder
//! ops, paged KV attention, mixture of experts, device sampling) run on the
//! CPU emulator of `tests/cuda_emu/` and checked against the CPU backend, as
//! `cuda_kernels_emulated.rs` does for the encoder's. Outputs are poisoned
//! first (NaN), so an element a kernel never writes fails.
//!
//! Tolerances, all against the CPU backend:
//! - activation quantization (Q8_1, Q8_K), dequantization: bit for bit;
//! - sampling: the CPU sampler's tokens for the same seeds, and its
//!   penalised logits bit for bit;
//! - quantized products: |got − want| ≤ 1e-5 · Σ|wᵢ·xᵢ| over the row (the
//!   block products are exact integer sums; only the float sum over blocks
//!   is in another order);
//! - norms, rotary embeddings, SwiGLU, attention, routing weights:
//!   |got − want| ≤ 1e-5 · max(1, |want|);
//! - KV cache writes, chosen experts, combining: bit for bit where the
//!   order of the sums is the CPU's, else the f32 bound.

use std::ffi::c_void;

use aitl::backend::{
    AttentionShape, CachedRows, Device, KvLayer, RopeStyle,
    half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16},
    quant::{
        GgmlType, QuantizedActivations, dequantize_activations, dequantize_row, quantize_activations, vec_dot_portable,
    },
};
use rand::{Rng, SeedableRng, rngs::StdRng};

mod common;
#[path = "cuda_emu/harness.rs"]
mod harness;

use common::parity::random_weights;
use harness::*;

// ---- quantized products ---------------------------------------------------------

type QuantizeQ8_1 = unsafe extern "C" fn(*const f32, *mut i8, *mut f32, *mut f32, u32);
type QuantizeQ8K = unsafe extern "C" fn(*const f32, *mut i8, *mut f32, *mut i16, u32);
type Matvec = unsafe extern "C" fn(
    *const u8,
    u64,
    *const u32,
    *const f32,
    *const i8,
    *const f32,
    *const c_void,
    *const f32,
    *mut f32,
    u32,
    u32,
    u32,
);

const WEIGHT_TYPES: [(GgmlType, &str); 9] = [
    (GgmlType::F32, "matvec_f32"),
    (GgmlType::F16, "matvec_f16"),
    (GgmlType::Bf16, "matvec_bf16"),
    (GgmlType::Q4_0, "matvec_q4_0"),
    (GgmlType::Q4_1, "matvec_q4_1"),
    (GgmlType::Q8_0, "matvec_q8_0"),
    (GgmlType::Q4K, "matvec_q4_k"),
    (GgmlType::Q5K, "matvec_q5_k"),
    (GgmlType::Q6K, "matvec_q6_k"),
];

/// Activation rows with the cases quantization can get wrong: a zero row,
/// a row whose largest magnitudes tie with opposite signs, values that
/// land halfway between quants.
fn activation_rows(rng: &mut StdRng, rows: usize, k: usize) -> Vec<f32> {
    let mut x = uniform(rng, rows * k, -2.0, 2.0);
    if rows >= 3 {
        x[..k].fill(0.0);
        let tie = &mut x[k..2 * k];
        tie[3] = -3.0;
        tie[200] = 3.0;
        let halves = &mut x[2 * k..3 * k];
        halves[0] = 127.0;
        for (i, v) in halves.iter_mut().enumerate().skip(1) {
            *v = (i % 255) as f32 - 127.0 + 0.5;
        }
    }
    x
}

/// The activations each product reads, as the kernels take them: quants,
/// scales and Q4_1's sums or the K-quants' block sums.
struct DeviceActivations {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    bsums: Vec<i16>,
}

impl DeviceActivations {
    fn aux(&self, dtype: GgmlType) -> *const c_void {
        match dtype {
            GgmlType::Q4_1 => self.s.as_ptr() as *const c_void,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => self.bsums.as_ptr() as *const c_void,
            _ => std::ptr::null(),
        }
    }
}

/// Quantizes `rows` rows of `x` on the emulator for `dtype`'s product.
fn quantize_on_device(dtype: GgmlType, x: &[f32], rows: usize, k: usize) -> DeviceActivations {
    let m = module("quant_matvec");
    let mut out = DeviceActivations { q: vec![0x55; rows * k], d: nan(0), s: nan(0), bsums: Vec::new() };
    let xp = x.as_ptr();
    match dtype {
        GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => {}
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            let blocks = rows * k / 32;
            let kernel: QuantizeQ8_1 = m.kernel("quantize_q8_1_f32");
            (out.d, out.s) = (nan(blocks), nan(blocks));
            let (q, d, s) = (out.q.as_mut_ptr(), out.d.as_mut_ptr(), out.s.as_mut_ptr());
            // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
            m.launch(Launch::rows(blocks.div_ceil(8) as u32, 256), &|| unsafe { kernel(xp, q, d, s, blocks as u32) });
        }
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            let blocks = rows * k / 256;
            let kernel: QuantizeQ8K = m.kernel("quantize_q8_k_f32");
            (out.d, out.bsums) = (nan(blocks), vec![0x5555; blocks * 16]);
            let (q, d, b) = (out.q.as_mut_ptr(), out.d.as_mut_ptr(), out.bsums.as_mut_ptr());
            // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
            m.launch(Launch::rows(blocks.div_ceil(8) as u32, 256), &|| unsafe { kernel(xp, q, d, b, blocks as u32) });
        }
    }
    out
}

#[test]
fn activation_quantization_matches_ggml_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(21);
    let (rows, k) = (5, 512);
    let x = activation_rows(&mut rng, rows, k);
    for dtype in [GgmlType::Q8_0, GgmlType::Q4K] {
        let got = quantize_on_device(dtype, &x, rows, k);
        for (r, row) in x.chunks_exact(k).enumerate() {
            let what = format!("{dtype:?} row {r}");
            match quantize_activations(dtype, row) {
                QuantizedActivations::Q8 { d, s, q } => {
                    let blocks = k / 32;
                    assert_eq!(&got.q[r * k..(r + 1) * k], &q[..], "{what}: quants");
                    assert_bits(&format!("{what}: scales"), &got.d[r * blocks..(r + 1) * blocks], &d);
                    assert_bits(&format!("{what}: sums"), &got.s[r * blocks..(r + 1) * blocks], &s);
                }
                QuantizedActivations::Q8K { d, q, bsums } => {
                    let blocks = k / 256;
                    assert_eq!(&got.q[r * k..(r + 1) * k], &q[..], "{what}: quants");
                    assert_bits(&format!("{what}: scales"), &got.d[r * blocks..(r + 1) * blocks], &d);
                    assert_eq!(&got.bsums[r * blocks * 16..(r + 1) * blocks * 16], &bsums[..], "{what}: block sums");
                }
                QuantizedActivations::Plain(_) => unreachable!("quantized types"),
            }
        }
    }
}

/// Runs one product on the emulator: `n` columns of `k` over `rows`
/// activation rows, optionally in groups of one stacked matrix each
/// (expert, first row, rows) and with a scale per row.
#[allow(clippy::too_many_arguments)]
fn matvec_on_device(
    dtype: GgmlType,
    entry: &str,
    weights: &[u8],
    groups: Option<&[u32]>,
    x: &[f32],
    row_scale: Option<&[f32]>,
    n: usize,
    k: usize,
    rows: usize,
) -> Vec<f32> {
    let m = module("quant_matvec");
    let kernel: Matvec = m.kernel(entry);
    let a = quantize_on_device(dtype, x, rows, k);
    let mut out = nan(rows * n);
    let grid_y = groups.map_or(rows.div_ceil(8), |g| g.len() / 3);
    let expert_bytes = (dtype.row_bytes(k) * n) as u64;
    let (w, e, xp, xq, xd, aux) =
        (weights.as_ptr(), or_null(groups), x.as_ptr(), a.q.as_ptr(), a.d.as_ptr(), a.aux(dtype));
    let (scale, o) = (or_null(row_scale), out.as_mut_ptr());
    let launch = Launch::new((n.div_ceil(4) as u32, grid_y as u32, 1), 128);
    // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
    m.launch(launch, &|| unsafe {
        kernel(w, expert_bytes, e, xp, xq, xd, aux, scale, o, n as u32, k as u32, rows as u32)
    });
    out
}

/// `Σ|wᵢ·xᵢ|` of a weight row and the activations its product reads: the
/// scale of the summation error.
fn magnitude(dtype: GgmlType, row: &[u8], x: &QuantizedActivations, k: usize) -> f32 {
    let mut w = vec![0f32; k];
    dequantize_row(dtype, row, &mut w);
    w.iter().zip(dequantize_activations(x)).map(|(w, x)| (w * x).abs()).sum()
}

#[track_caller]
fn assert_product(what: &str, got: f32, want: f32, magnitude: f32) {
    let bound = 1e-5 * magnitude.max(1e-6);
    assert!((got - want).abs() <= bound, "{what}: got {got}, want {want} (bound {bound:e})");
}

#[test]
fn quantized_products_match_the_cpu_block_products_for_every_type() {
    let mut rng = StdRng::seed_from_u64(22);
    // An odd column count (the last block's warps idle), one and several
    // groups of eight activation rows.
    let (n, k) = (37, 512);
    for (dtype, entry) in WEIGHT_TYPES {
        let weights = random_weights(&mut rng, dtype, k, n);
        let row_bytes = dtype.row_bytes(k);
        for rows in [1, 3, 8, 11] {
            let x = activation_rows(&mut rng, rows, k);
            let got = matvec_on_device(dtype, entry, &weights, None, &x, None, n, k, rows);
            for (r, xr) in x.chunks_exact(k).enumerate() {
                let a = quantize_activations(dtype, xr);
                for j in 0..n {
                    let row = &weights[j * row_bytes..(j + 1) * row_bytes];
                    let want = vec_dot_portable(dtype, row, &a);
                    let what = format!("{entry} rows={rows} row {r} column {j}");
                    assert_product(&what, got[r * n + j], want, magnitude(dtype, row, &a, k));
                }
            }
        }
    }
}

#[test]
fn expert_groups_read_their_own_matrix_and_scale_the_result() {
    let mut rng = StdRng::seed_from_u64(23);
    let (experts, n, k) = (3, 21, 256);
    // (expert, first row, rows): a group of three, a single row, a full
    // group of eight, and a padding group that must write nothing.
    let groups = [2u32, 0, 3, 0, 3, 1, 1, 4, 8, 2, 12, 0];
    let rows = 12;
    let expert_of: Vec<usize> = groups.chunks(3).flat_map(|g| vec![g[0] as usize; g[2] as usize]).collect();
    let scales = uniform(&mut rng, rows, 0.1, 2.0);
    for (dtype, entry) in WEIGHT_TYPES {
        let stack = random_weights(&mut rng, dtype, k, n * experts);
        let (row_bytes, matrix_bytes) = (dtype.row_bytes(k), dtype.row_bytes(k) * n);
        let x = uniform(&mut rng, rows * k, -1.0, 1.0);
        let got = matvec_on_device(dtype, entry, &stack, Some(&groups), &x, Some(&scales), n, k, rows);
        for (r, (&e, &scale)) in expert_of.iter().zip(&scales).enumerate() {
            let a = quantize_activations(dtype, &x[r * k..(r + 1) * k]);
            let matrix = &stack[e * matrix_bytes..(e + 1) * matrix_bytes];
            for j in 0..n {
                let row = &matrix[j * row_bytes..(j + 1) * row_bytes];
                let want = scale * vec_dot_portable(dtype, row, &a);
                let what = format!("{entry} row {r} (expert {e}) column {j}");
                assert_product(&what, got[r * n + j], want, scale * magnitude(dtype, row, &a, k));
            }
        }
    }
}

type Dequantize = unsafe extern "C" fn(*const u8, *const u32, *mut c_void, u32, u32, u32);

#[test]
fn dequantized_rows_equal_the_cpu_reference_bit_for_bit() {
    let m = module("dequantize");
    let mut rng = StdRng::seed_from_u64(24);
    let (rows, k) = (7, 512);
    for (dtype, product) in WEIGHT_TYPES {
        let entry = product.replace("matvec", "dequantize");
        let kernel: Dequantize = m.kernel(&entry);
        let weights = random_weights(&mut rng, dtype, k, rows);
        let row_bytes = dtype.row_bytes(k);
        // Embedding lookups: rows by id, repeated and out of order.
        let ids = [6u32, 0, 3, 3, 5];
        let mut want = Vec::new();
        for &id in &ids {
            let mut row = vec![0f32; k];
            dequantize_row(dtype, &weights[id as usize * row_bytes..(id as usize + 1) * row_bytes], &mut row);
            want.extend(row);
        }
        let mut out = nan(ids.len() * k);
        let (w, i, o) = (weights.as_ptr(), ids.as_ptr(), out.as_mut_ptr() as *mut c_void);
        let launch = Launch::new((k.div_ceil(256) as u32, ids.len() as u32, 1), 256);
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(launch, &|| unsafe { kernel(w, i, o, 0, ids.len() as u32, k as u32) });
        assert_bits(&entry, &out, &want);
        // A whole matrix as bf16 tiles (no ids), from a grid of fewer rows
        // than the matrix (as past 65,535 rows): blocks stride over the rest.
        let mut tiles = vec![0x7fc1u16; rows * k];
        let o = tiles.as_mut_ptr() as *mut c_void;
        let launch = Launch::new((k.div_ceil(256) as u32, 3, 1), 256);
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(launch, &|| unsafe { kernel(w, std::ptr::null(), o, 1, rows as u32, k as u32) });
        let mut all = vec![0f32; rows * k];
        for (r, row) in all.chunks_exact_mut(k).enumerate() {
            dequantize_row(dtype, &weights[r * row_bytes..(r + 1) * row_bytes], row);
        }
        let want: Vec<u16> = all.iter().map(|&v| f32_to_bf16(v)).collect();
        assert_eq!(tiles, want, "{entry} as bf16");
    }
}

// ---- norms, rotary embeddings, SwiGLU -------------------------------------------------

type AddRmsNorm = unsafe extern "C" fn(*mut f32, *const f32, *const f32, *mut f32, u32, u32, f32);
type Rope = unsafe extern "C" fn(*mut f32, *const u32, u32, u32, u32, f32, u32);
type InPlace = unsafe extern "C" fn(*mut f32, *const f32, u32);

#[test]
fn add_rms_norm_adds_the_residual_and_normalises_like_the_cpu() {
    let m = module("layer_norm");
    let kernel: AddRmsNorm = m.kernel("add_rms_norm_f32");
    let mut rng = StdRng::seed_from_u64(31);
    // Narrow, SmolLM2's 576, Llama's 4096 (wider than the registers hold), odd.
    for (rows, width) in [(1, 37), (3, 576), (2, 4096), (5, 1000)] {
        let h = uniform(&mut rng, rows * width, -3.0, 3.0);
        let delta = uniform(&mut rng, rows * width, -1.0, 1.0);
        let gamma = uniform(&mut rng, width, 0.5, 1.5);
        for with_delta in [true, false] {
            let mut sum = tensor(&[rows, width], h.clone());
            if with_delta {
                Device::Cpu.add(&mut sum, &tensor(&[rows, width], delta.clone())).unwrap();
            }
            let want = Device::Cpu.rms_norm(&sum, &tensor(&[width], gamma.clone()), 1e-6).unwrap().to_host().unwrap();
            let (mut got_h, mut out) = (h.clone(), nan(rows * width));
            let (hp, dp, g, o) = (
                got_h.as_mut_ptr(),
                if with_delta { delta.as_ptr() } else { std::ptr::null() },
                gamma.as_ptr(),
                out.as_mut_ptr(),
            );
            // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
            m.launch(Launch::rows(2, 256), &|| unsafe { kernel(hp, dp, g, o, rows as u32, width as u32, 1e-6) });
            let what = format!("add_rms_norm {rows}×{width} delta={with_delta}");
            assert_bits(&format!("{what}: residual"), &got_h, &sum.to_host().unwrap());
            assert_close(&what, &out, &want);
        }
    }
}

#[test]
fn rope_turns_both_pair_styles_like_the_cpu() {
    let m = module("decoder");
    let kernel: Rope = m.kernel("rope_f32");
    let mut rng = StdRng::seed_from_u64(32);
    let positions = [0u32, 1, 7, 511, 4095, 30_000];
    for (heads, head_dim, base) in [(3, 64, 10_000.0f32), (2, 128, 500_000.0), (5, 16, 10_000.0)] {
        let rows = positions.len();
        let x = uniform(&mut rng, rows * heads * head_dim, -2.0, 2.0);
        for (style, neox) in [(RopeStyle::Normal, 0), (RopeStyle::Neox, 1)] {
            let mut want = tensor(&[rows, heads * head_dim], x.clone());
            Device::Cpu.rope(&mut want, &positions, head_dim, base, style).unwrap();
            let mut got = x.clone();
            let step = base.powf(-2.0 / head_dim as f32);
            let (xp, pp) = (got.as_mut_ptr(), positions.as_ptr());
            let (r, h, d) = (rows as u32, heads as u32, head_dim as u32);
            // A capped grid: the grid-stride loop goes round.
            // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
            m.launch(Launch::rows(3, 256), &|| unsafe { kernel(xp, pp, r, h, d, step, neox) });
            assert_close(&format!("rope {style:?} {heads}×{head_dim}"), &got, &want.to_host().unwrap());
        }
    }
}

#[test]
fn silu_mul_and_the_gated_shared_expert_match_the_cpu() {
    let mut rng = StdRng::seed_from_u64(33);
    let silu: InPlace = module("decoder").kernel("silu_mul_f32");
    for len in [1usize, 37, 10_000] {
        let (gate, up) = (uniform(&mut rng, len, -8.0, 8.0), uniform(&mut rng, len, -2.0, 2.0));
        let mut want = tensor(&[len], gate.clone());
        Device::Cpu.silu_mul(&mut want, &tensor(&[len], up.clone())).unwrap();
        let mut got = gate.clone();
        let (g, u) = (got.as_mut_ptr(), up.as_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        module("decoder").launch(Launch::rows(4, 256), &|| unsafe { silu(g, u, len as u32) });
        assert_close(&format!("silu_mul {len}"), &got, &want.to_host().unwrap());
    }

    type AddGated = unsafe extern "C" fn(*mut f32, *const f32, *const f32, u32, u32);
    let m = module("moe");
    let kernel: AddGated = m.kernel("add_gated_f32");
    let (rows, width) = (5, 300);
    let (x, y, gate) = (
        uniform(&mut rng, rows * width, -1.0, 1.0),
        uniform(&mut rng, rows * width, -1.0, 1.0),
        uniform(&mut rng, rows, -6.0, 6.0),
    );
    let mut want = tensor(&[rows, width], x.clone());
    Device::Cpu.add_gated(&mut want, &tensor(&[rows, width], y.clone()), &tensor(&[rows, 1], gate.clone())).unwrap();
    let mut got = x.clone();
    let (xp, yp, gp) = (got.as_mut_ptr(), y.as_ptr(), gate.as_ptr());
    // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
    m.launch(Launch::rows(2, 256), &|| unsafe { kernel(xp, yp, gp, rows as u32, width as u32) });
    assert_close("add_gated", &got, &want.to_host().unwrap());
}

// ---- the paged KV cache and attention over it ------------------------------------------

type KvAppend = unsafe extern "C" fn(*const f32, *const f32, *const u32, *mut u16, *mut u16, u32, u32);
type PagedAttention = unsafe extern "C" fn(
    *const f32,
    *const u16,
    *const u16,
    *const u32,
    *const u32,
    *mut f32,
    *mut f32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    f32,
    u32,
);
type Combine = unsafe extern "C" fn(*const f32, *mut f32, u32, u32, u32, u32);

const PAGE: usize = 16;

/// Sequences in a paged cache: their lengths, and block tables whose pages
/// are scattered over the pool; the last sequence is a fork of the one
/// before it and shares its first two (full) pages.
struct PagedCache {
    tables: Vec<Vec<u32>>,
    pages: usize,
}

impl PagedCache {
    fn new(rng: &mut StdRng, lengths: &[usize]) -> Self {
        let own: Vec<usize> = lengths.iter().map(|l| l.div_ceil(PAGE)).collect();
        let fork = lengths.len() - 1;
        let shared = 2;
        let pages = own.iter().sum::<usize>() - shared + 3;
        let mut pool: Vec<u32> = (0..pages as u32).collect();
        // A fixed shuffle: no sequence's pages are in order.
        for i in (1..pool.len()).rev() {
            pool.swap(i, rng.random_range(0..=i));
        }
        let mut next = pool.into_iter();
        let mut tables: Vec<Vec<u32>> = Vec::new();
        for (s, &n) in own.iter().enumerate() {
            let table = if s == fork {
                let mut t = tables[fork - 1][..shared].to_vec();
                t.extend(next.by_ref().take(n - shared));
                t
            } else {
                next.by_ref().take(n).collect()
            };
            tables.push(table);
        }
        PagedCache { tables, pages }
    }

    fn slot(&self, seq: usize, position: usize) -> u32 {
        self.tables[seq][position / PAGE] * PAGE as u32 + (position % PAGE) as u32
    }

    fn max_pages(&self) -> usize {
        self.tables.iter().map(Vec::len).max().unwrap()
    }

    fn flat_tables(&self) -> Vec<u32> {
        let width = self.max_pages();
        self.tables.iter().flat_map(|t| t.iter().copied().chain(std::iter::repeat(u32::MAX)).take(width)).collect()
    }
}

#[test]
fn paged_attention_over_a_forked_cache_matches_cached_attention() {
    let mut rng = StdRng::seed_from_u64(34);
    let decoder = module("decoder");
    // Lengths: one position, one past a page, several pages; the fork
    // shares the first 32 positions of the sequence before it.
    let lengths = [1usize, 17, 40, 35];
    for (heads, kv_heads, head_dim, entry) in [
        (9, 3, 64, "paged_attention_f32_d64"),
        (8, 1, 128, "paged_attention_f32_d128"),
        (4, 4, 32, "paged_attention_f32_d32"),
        (4, 2, 16, "paged_attention_f32_d16"),
    ] {
        let kv_width = kv_heads * head_dim;
        let cache = PagedCache::new(&mut rng, &lengths);
        for bf16 in [false, true] {
            let round = |v: f32| if bf16 { bf16_to_f32(f32_to_bf16(v)) } else { f16_to_f32(f32_to_f16(v)) };
            // Every sequence's keys and values; the fork's shared positions equal its parent's.
            let mut k: Vec<Vec<f32>> = lengths.iter().map(|&l| uniform(&mut rng, l * kv_width, -2.0, 2.0)).collect();
            let mut v: Vec<Vec<f32>> = lengths.iter().map(|&l| uniform(&mut rng, l * kv_width, -2.0, 2.0)).collect();
            let fork = lengths.len() - 1;
            let shared = 2 * PAGE * kv_width;
            let (parent_k, parent_v) = (k[fork - 1][..shared].to_vec(), v[fork - 1][..shared].to_vec());
            k[fork][..shared].copy_from_slice(&parent_k);
            v[fork][..shared].copy_from_slice(&parent_v);

            // Appended the way a server fills it: the fork writes only its own positions.
            let mut k_cache = vec![0xffffu16; cache.pages * PAGE * kv_width];
            let mut v_cache = k_cache.clone();
            let append: KvAppend = decoder.kernel(if bf16 { "kv_append_bf16" } else { "kv_append_f16" });
            for (s, &len) in lengths.iter().enumerate() {
                let from = if s == fork { 2 * PAGE } else { 0 };
                let slots: Vec<u32> = (from..len).map(|p| cache.slot(s, p)).collect();
                let (kp, vp) = (k[s][from * kv_width..].as_ptr(), v[s][from * kv_width..].as_ptr());
                let (kc, vc, sp) = (k_cache.as_mut_ptr(), v_cache.as_mut_ptr(), slots.as_ptr());
                let rows = slots.len() as u32;
                // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
                decoder.launch(Launch::rows(3, 256), &|| unsafe { append(kp, vp, sp, kc, vc, rows, kv_width as u32) });
            }
            let convert = |x: f32| if bf16 { f32_to_bf16(x) } else { f32_to_f16(x) };
            for (s, &len) in lengths.iter().enumerate() {
                for p in 0..len {
                    let at = cache.slot(s, p) as usize * kv_width;
                    let want: Vec<u16> = k[s][p * kv_width..(p + 1) * kv_width].iter().map(|&x| convert(x)).collect();
                    assert_eq!(&k_cache[at..at + kv_width], &want[..], "bf16={bf16} sequence {s} position {p}: keys");
                    let want: Vec<u16> = v[s][p * kv_width..(p + 1) * kv_width].iter().map(|&x| convert(x)).collect();
                    assert_eq!(&v_cache[at..at + kv_width], &want[..], "bf16={bf16} sequence {s} position {p}: values");
                }
            }

            // A decode step for every sequence, and a prompt's last rows for sequence 1.
            let mut items: Vec<(usize, usize)> = lengths.iter().enumerate().map(|(s, &l)| (s, l)).collect();
            items.extend((10..=17).map(|visible| (1, visible)));
            let width = heads * head_dim;
            let q = uniform(&mut rng, items.len() * width, -1.0, 1.0);
            let shape = AttentionShape { heads, head_dim };
            let mut want = Vec::new();
            for (i, &(s, visible)) in items.iter().enumerate() {
                let mut layer = KvLayer::new(kv_width);
                let rounded = |x: &[f32]| {
                    tensor(&[visible, kv_width], x[..visible * kv_width].iter().map(|&x| round(x)).collect())
                };
                layer.append(&rounded(&k[s]), &rounded(&v[s])).unwrap();
                let rows = [CachedRows { cache: &layer, past: visible - 1, rows: 1 }];
                let qi = tensor(&[1, width], q[i * width..(i + 1) * width].to_vec());
                want.extend(
                    Device::Cpu.cached_attention(&qi, &rows, shape, kv_heads, false).unwrap().to_host().unwrap(),
                );
            }

            let kernel: PagedAttention = decoder.kernel(entry);
            let combine: Combine = decoder.kernel("paged_attention_combine_f32");
            let tables = cache.flat_tables();
            let flat_items: Vec<u32> = items.iter().flat_map(|&(s, visible)| [s as u32, visible as u32]).collect();
            let count = items.len() as u32;
            // One split, and splits of 16 keys (the 40-key sequence in three, the rest in fewer, some empty).
            for splits in [1usize, 3] {
                let keys_per_split = if splits == 1 { 64 } else { 16 };
                let mut out = nan(items.len() * width);
                let mut partials = nan(items.len() * heads * splits * (head_dim + 2));
                let (qp, kc, vc, tp, ip) =
                    (q.as_ptr(), k_cache.as_ptr(), v_cache.as_ptr(), tables.as_ptr(), flat_items.as_ptr());
                let (o, pp) = (out.as_mut_ptr(), partials.as_mut_ptr());
                let scale = 1.0 / (head_dim as f32).sqrt();
                let launch = Launch::new((kv_heads as u32, count, splits as u32), 128);
                // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
                decoder.launch(launch, &|| unsafe {
                    kernel(
                        qp,
                        kc,
                        vc,
                        tp,
                        ip,
                        o,
                        pp,
                        count,
                        heads as u32,
                        kv_heads as u32,
                        cache.max_pages() as u32,
                        PAGE as u32,
                        splits as u32,
                        keys_per_split,
                        scale,
                        bf16 as u32,
                    )
                });
                if splits > 1 {
                    let p = partials.as_ptr();
                    let launch = Launch::new((heads as u32, count, 1), 128);
                    // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
                    decoder.launch(launch, &|| unsafe {
                        combine(p, o, count, heads as u32, head_dim as u32, splits as u32)
                    });
                }
                let what = format!("{entry} heads {heads}/{kv_heads} bf16={bf16} splits={splits}");
                assert_close(&what, &out, &want);
            }
        }
    }
}

// ---- mixture of experts ---------------------------------------------------------------

type Route = unsafe extern "C" fn(*const f32, *mut u32, *mut f32, u32, u32, u32, u32);
type Plan =
    unsafe extern "C" fn(*const u32, *const f32, u32, u32, u32, *mut u32, *mut u32, *mut u32, *mut f32, *mut u32, u32);
type MoeCombine = unsafe extern "C" fn(*const f32, *const u32, *mut f32, u32, u32, u32, u32);
type GatherRows = unsafe extern "C" fn(*const f32, *const u32, *mut f32, u32, u32);

/// Routes on the emulator: (experts, weights), `used` per token.
fn route_on_device(logits: &[f32], tokens: usize, count: usize, used: usize, normalize: bool) -> (Vec<u32>, Vec<f32>) {
    let m = module("moe");
    let kernel: Route = m.kernel("moe_route_f32");
    let (mut experts, mut weights) = (vec![u32::MAX; tokens * used], nan(tokens * used));
    let (l, e, w) = (logits.as_ptr(), experts.as_mut_ptr(), weights.as_mut_ptr());
    let launch = Launch::rows(tokens.div_ceil(4) as u32, 128);
    // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
    m.launch(launch, &|| unsafe { kernel(l, e, w, tokens as u32, count as u32, used as u32, normalize as u32) });
    (experts, weights)
}

/// The plan's outputs: sorted pairs, each pair's place, the sorted pairs'
/// tokens and weights, and the groups (expert, first place, rows).
struct MoePlanOut {
    sorted: Vec<u32>,
    position: Vec<u32>,
    token: Vec<u32>,
    weight: Vec<f32>,
    groups: Vec<u32>,
}

fn plan_on_device(experts: &[u32], weights: &[f32], count: usize, used: usize) -> MoePlanOut {
    let m = module("moe");
    let kernel: Plan = m.kernel("moe_plan_f32");
    let pairs = experts.len();
    let max_groups = pairs.div_ceil(8) + count.min(pairs);
    let mut p = MoePlanOut {
        sorted: vec![u32::MAX; pairs],
        position: vec![u32::MAX; pairs],
        token: vec![u32::MAX; pairs],
        weight: nan(pairs),
        groups: vec![u32::MAX; max_groups * 3],
    };
    let (e, w) = (experts.as_ptr(), weights.as_ptr());
    let (s, pos, t, sw, g) = (
        p.sorted.as_mut_ptr(),
        p.position.as_mut_ptr(),
        p.token.as_mut_ptr(),
        p.weight.as_mut_ptr(),
        p.groups.as_mut_ptr(),
    );
    // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
    m.launch(Launch::rows(1, 256), &|| unsafe {
        kernel(e, w, pairs as u32, count as u32, used as u32, s, pos, t, sw, g, max_groups as u32)
    });
    p
}

#[test]
fn routing_chooses_the_cpus_experts_with_its_weights() {
    let mut rng = StdRng::seed_from_u64(41);
    // Mixtral (8, top 2, renormalised), Qwen1.5-MoE (60, top 4, kept), 256 experts top 8.
    for (count, used, normalize) in [(8, 2, true), (60, 4, false), (256, 8, true), (5, 5, false)] {
        let tokens = 9;
        let mut logits = uniform(&mut rng, tokens * count, -4.0, 4.0);
        // Ties: token 0's two best logits are equal (the lower index first).
        logits[1] = 9.0;
        logits[count - 1] = 9.0;
        let want = Device::Cpu.route_top_k(&tensor(&[tokens, count], logits.clone()), used, normalize).unwrap();
        let (experts, weights) = route_on_device(&logits, tokens, count, used, normalize);
        assert_eq!(experts, want.experts().unwrap(), "{count} experts, top {used}: chosen experts");
        assert_close(&format!("{count} experts, top {used}: weights"), &weights, &want.weights().unwrap());
    }
}

#[test]
fn the_plan_sorts_pairs_by_expert_stably_in_groups_of_at_most_eight() {
    let mut rng = StdRng::seed_from_u64(42);
    let (tokens, used, count) = (13, 2, 6);
    // Expert 1 gets 11 pairs (two groups), expert 4 none.
    let mut experts: Vec<u32> = (0..tokens * used).map(|_| [0u32, 2, 3, 5][rng.random_range(0..4)]).collect();
    for e in experts.iter_mut().step_by(2).take(11) {
        *e = 1;
    }
    let weights = uniform(&mut rng, tokens * used, 0.0, 1.0);
    let plan = plan_on_device(&experts, &weights, count, used);
    let mut want: Vec<u32> = (0..experts.len() as u32).collect();
    want.sort_by_key(|&p| experts[p as usize]);
    assert_eq!(plan.sorted, want, "sorted pairs");
    for (place, &pair) in plan.sorted.iter().enumerate() {
        assert_eq!(plan.position[pair as usize], place as u32, "position of pair {pair}");
        assert_eq!(plan.token[place], pair / used as u32, "token at place {place}");
        assert_eq!(plan.weight[place].to_bits(), weights[pair as usize].to_bits(), "weight at place {place}");
    }
    let groups: Vec<&[u32]> = plan.groups.chunks(3).collect();
    let live: Vec<&[u32]> = groups.iter().copied().filter(|g| g[2] > 0).collect();
    let mut covered = 0;
    for g in &live {
        assert!(g[2] <= 8, "group {g:?} holds more than eight rows");
        assert_eq!(g[1], covered, "groups follow each other: {g:?}");
        for place in g[1]..g[1] + g[2] {
            assert_eq!(experts[plan.sorted[place as usize] as usize], g[0], "place {place} in group {g:?}");
        }
        covered += g[2];
    }
    assert_eq!(covered as usize, experts.len(), "the groups cover every pair");
    assert!(!live.iter().any(|g| g[0] == 4), "an expert nobody chose has no group");
    assert_eq!(live.iter().filter(|g| g[0] == 1).count(), 2, "eleven pairs make two groups");
    assert!(groups[live.len()..].iter().all(|g| g == &[0, 0, 0]), "padding groups are empty: {groups:?}");
}

/// A whole mixture-of-experts layer on the emulator, as a decoding step
/// runs it on the device: route, plan, gather each pair's token row,
/// grouped gate and up products, SwiGLU, the down product scaled by the
/// routing weights, and the sum back in token order.
#[test]
fn a_mixture_of_experts_layer_matches_experts_swiglu() {
    let mut rng = StdRng::seed_from_u64(43);
    let (count, used, hidden, ffn, dtype) = (8, 2, 256, 512, GgmlType::Q4K);
    let gate_w = random_weights(&mut rng, dtype, hidden, count * ffn);
    let up_w = random_weights(&mut rng, dtype, hidden, count * ffn);
    let down_w = random_weights(&mut rng, dtype, ffn, count * hidden);
    let quant = |k: usize, n: usize, bytes: &[u8]| Device::Cpu.quant_matrix(dtype, k, n, bytes.to_vec()).unwrap();
    let stacked = aitl::backend::StackedExperts::new(
        count,
        quant(hidden, count * ffn, &gate_w),
        quant(hidden, count * ffn, &up_w),
        quant(ffn, count * hidden, &down_w),
    )
    .unwrap();
    // One token (a decode step), a few (several sequences), more than eight per expert.
    for tokens in [1usize, 3, 40] {
        let x = uniform(&mut rng, tokens * hidden, -1.0, 1.0);
        let logits = uniform(&mut rng, tokens * count, -2.0, 2.0);
        let routing = Device::Cpu.route_top_k(&tensor(&[tokens, count], logits.clone()), used, true).unwrap();
        let want = Device::Cpu.experts_swiglu(&tensor(&[tokens, hidden], x.clone()), &routing, &stacked).unwrap();

        let (experts, weights) = route_on_device(&logits, tokens, count, used, true);
        assert_eq!(experts, routing.experts().unwrap(), "{tokens} tokens: routing");
        let plan = plan_on_device(&experts, &weights, count, used);
        let pairs = tokens * used;
        let mut rows = nan(pairs * hidden);
        let gather: GatherRows = module("embeddings").kernel("gather_rows_f32");
        let (xp, ids, r) = (x.as_ptr(), plan.token.as_ptr(), rows.as_mut_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        module("embeddings")
            .launch(Launch::rows(pairs as u32, 256), &|| unsafe { gather(xp, ids, r, pairs as u32, hidden as u32) });
        let product = |weights: &[u8], k: usize, n: usize, x: &[f32], scale: Option<&[f32]>| {
            let rows = x.len() / k;
            let a = quantize_on_device(dtype, x, rows, k);
            let mut out = nan(rows * n);
            let (w, g, xp, xq, xd, aux) =
                (weights.as_ptr(), plan.groups.as_ptr(), x.as_ptr(), a.q.as_ptr(), a.d.as_ptr(), a.aux(dtype));
            let (s, o) = (or_null(scale), out.as_mut_ptr());
            let expert_bytes = (dtype.row_bytes(k) * n) as u64;
            let kernel: Matvec = module("quant_matvec").kernel("matvec_q4_k");
            let launch = Launch::new((n.div_ceil(4) as u32, (plan.groups.len() / 3) as u32, 1), 128);
            // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
            module("quant_matvec").launch(launch, &|| unsafe {
                kernel(w, expert_bytes, g, xp, xq, xd, aux, s, o, n as u32, k as u32, rows as u32)
            });
            out
        };
        let mut gate = product(&gate_w, hidden, ffn, &rows, None);
        let up = product(&up_w, hidden, ffn, &rows, None);
        let silu: InPlace = module("decoder").kernel("silu_mul_f32");
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        module("decoder").launch(Launch::rows(8, 256), &|| unsafe { silu(g, u, (pairs * ffn) as u32) });
        let down = product(&down_w, ffn, hidden, &gate, Some(&plan.weight));
        let combine: MoeCombine = module("moe").kernel("moe_combine_f32");
        let mut out = nan(tokens * hidden);
        let (d, pos, o) = (down.as_ptr(), plan.position.as_ptr(), out.as_mut_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        module("moe").launch(Launch::rows(4, 256), &|| unsafe {
            combine(d, pos, o, tokens as u32, used as u32, hidden as u32, 0)
        });
        // Three products in a row, each quantizing its input: 1e-4 of the
        // layer's output scale, not of each element.
        let want = want.to_host().unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * scale, "{tokens} tokens: element {i}: got {g}, want {w} (scale {scale})");
        }
    }
}

// ---- sampling ------------------------------------------------------------------------------

type Sample = unsafe extern "C" fn(
    *mut f32,
    u32,
    *const u32,
    *const f32,
    *const u32,
    *const f32,
    *const f32,
    *mut u64,
    *mut u64,
    *mut f64,
    *mut u32,
);

/// Every sequence of a step sampled on the device picks what the CPU
/// sampler with the same seed picks, step after step (the penalty's seen
/// tokens growing with what was chosen) for greedy, plain temperature,
/// top-k, top-p, both, a top-k past the vocabulary, and penalties.
#[test]
fn device_sampling_draws_what_the_cpu_sampler_draws_with_the_same_seed() {
    use aitl::engine::sampler::{Sampler, SamplingConfig};
    let m = module("sampling");
    let kernel: Sample = m.kernel("sample_tokens_f32");
    let mut rng = StdRng::seed_from_u64(51);
    let vocab: usize = 3000;
    let config = |temperature, top_k, top_p, repetition_penalty, seed| SamplingConfig {
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        seed,
    };
    let configs = [
        config(0.0, 0, 1.0, 1.3, 0),
        config(0.8, 0, 1.0, 1.0, 7),
        config(1.0, 40, 1.0, 1.0, 8),
        config(0.7, 0, 0.9, 1.0, 9),
        config(1.2, 50, 0.95, 1.1, 10),
        config(1.0, 5000, 0.5, 1.0, 11),
    ];
    let seqs = configs.len();
    let mut cpu: Vec<Sampler> = configs.iter().cloned().map(Sampler::new).collect();
    let mut history: Vec<Vec<u32>> = (0..seqs).map(|s| vec![s as u32, 17, 17, 2999]).collect();
    let mut state: Vec<u64> = configs.iter().map(|c| c.seed).collect();
    let temperature: Vec<f32> = configs.iter().map(|c| c.temperature).collect();
    let top_k: Vec<u32> = configs.iter().map(|c| c.top_k as u32).collect();
    let top_p: Vec<f32> = configs.iter().map(|c| c.top_p).collect();
    let penalty: Vec<f32> = configs.iter().map(|c| c.repetition_penalty).collect();
    let words = vocab.div_ceil(32);
    let (mut keys, mut probs) = (vec![0u64; seqs * vocab], vec![0f64; seqs * vocab]);
    // Blocks of 256 threads for most steps (the emulator runs every thread),
    // the GPU's 1024 for the last two.
    for step in 0..12 {
        let threads = if step < 10 { 256 } else { 1024 };
        // Peaked logits (a few likely tokens, a long tail), as a model gives.
        let logits: Vec<f32> = (0..seqs * vocab)
            .map(|_| rng.random_range(-4.0..4.0f32) * rng.random_range(0.0..1.0f32).powi(3) * 3.0)
            .collect();
        let mut seen = vec![0u32; seqs * words];
        for (s, h) in history.iter().enumerate() {
            h.iter().for_each(|&t| seen[s * words + t as usize / 32] |= 1 << (t % 32));
        }
        let mut got_logits = logits.clone();
        let mut tokens = vec![u32::MAX; seqs];
        let (l, sn, tp, kp, pp, rp) = (
            got_logits.as_mut_ptr(),
            seen.as_ptr(),
            temperature.as_ptr(),
            top_k.as_ptr(),
            top_p.as_ptr(),
            penalty.as_ptr(),
        );
        let (st, ks, ps, out) = (state.as_mut_ptr(), keys.as_mut_ptr(), probs.as_mut_ptr(), tokens.as_mut_ptr());
        // SAFETY: the buffers hold what the sizes passed say, and outlive the launch.
        m.launch(Launch::rows(seqs as u32, threads), &|| unsafe {
            kernel(l, vocab as u32, sn, tp, kp, pp, rp, st, ks, ps, out)
        });
        for s in 0..seqs {
            let mut want_logits = logits[s * vocab..(s + 1) * vocab].to_vec();
            let want = cpu[s].sample(&mut want_logits, &history[s]);
            assert_eq!(tokens[s], want, "step {step}, {:?}: token", configs[s]);
            assert_bits(
                &format!("step {step}, sequence {s}: penalised logits"),
                &got_logits[s * vocab..(s + 1) * vocab],
                &want_logits,
            );
            history[s].push(want);
        }
    }
    // The sampled sequences really sampled: not every step chose the same token.
    for (s, h) in history.iter().enumerate().skip(1) {
        let distinct: std::collections::HashSet<_> = h[4..].iter().collect();
        assert!(distinct.len() > 3, "{:?} chose only {distinct:?}", configs[s]);
    }
}
