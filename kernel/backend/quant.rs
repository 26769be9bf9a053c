//! ggml's block-quantized weight formats, read in place: dequantization (the
//! reference), activation quantization, and the block dot products a
//! quantized matrix product is made of. Matches ggml's CPU path
//! (`ggml-quants.c`, `ggml-cpu/quants.c`): activations are quantized per
//! block to 8 bits (Q8_0 for Q4_0/Q8_0 weights, Q8_1 for Q4_1, Q8_K for the
//! K-quants) and the block products are integer sums, so results agree with
//! llama.cpp up to float summation order.
//!
//! Blocks (d, m: f16 scale and minimum; QK = 32 values, QK_K = 256):
//!
//! | type | bytes / block | layout                                                         |
//! | ---- | ------------- | -------------------------------------------------------------- |
//! | Q4_0 | 18 / 32       | d, 16 bytes of nibbles: low nibbles are values 0–15, high 16–31; x = (q − 8)·d |
//! | Q4_1 | 20 / 32       | d, m, nibbles as Q4_0; x = q·d + m                              |
//! | Q8_0 | 34 / 32       | d, 32 × i8; x = q·d                                             |
//! | Q4_K | 144 / 256     | d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks, 128 bytes of nibbles |
//! | Q5_K | 176 / 256     | as Q4_K plus 32 bytes of fifth bits                             |
//! | Q6_K | 210 / 256     | 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 × i8 scales, d |

use super::half::{f16_to_f32, f32_to_f16};

/// Tensor element types aitl reads (ggml's type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

pub const QK: usize = 32;
pub const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Bf16 => 30,
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => QK,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::Bf16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of `values` values (a whole number of blocks).
    pub fn row_bytes(self, values: usize) -> usize {
        values / self.block_values() * self.block_bytes()
    }

    pub fn is_quantized(self) -> bool {
        self.block_values() > 1
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

fn bf16_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_bits((u16::from_le_bytes([bytes[at], bytes[at + 1]]) as u32) << 16)
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

/// The four quants (offset removed) built from byte `l` of a Q6_K
/// half-block: values l, l+32, l+64 and l+96 of it.
#[inline(always)]
fn q6k_quads(ql: &[u8], qh: &[u8], l: usize) -> [i32; 4] {
    [
        ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32,
        ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32,
        ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32,
        ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32,
    ]
}

/// Expands one row (`out.len()` values, whole blocks) to f32: the reference
/// every kernel is tested against.
pub fn dequantize_row(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) {
    dequantize_row_inline(dtype, bytes, out)
}

/// [`dequantize_row`]'s body, inlined into the CPU backend's copies for each
/// instruction set (prefill expands every weight once per product).
#[inline(always)]
pub(super) fn dequantize_row_inline(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let per = dtype.block_values();
    for (b, values) in out.chunks_exact_mut(per).enumerate() {
        let block = &bytes[b * dtype.block_bytes()..(b + 1) * dtype.block_bytes()];
        match dtype {
            GgmlType::F32 => values[0] = f32::from_le_bytes(block.try_into().expect("4 bytes")),
            GgmlType::F16 => values[0] = f16_at(block, 0),
            GgmlType::Bf16 => values[0] = bf16_at(block, 0),
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let d = f16_at(block, 0);
                let (m, qs, offset) = match dtype {
                    GgmlType::Q4_0 => (0.0, &block[2..18], 8.0),
                    _ => (f16_at(block, 2), &block[4..20], 0.0),
                };
                for j in 0..16 {
                    values[j] = ((qs[j] & 0xF) as f32 - offset) * d + m;
                    values[j + 16] = ((qs[j] >> 4) as f32 - offset) * d + m;
                }
            }
            GgmlType::Q8_0 => {
                let d = f16_at(block, 0);
                for (v, &q) in values.iter_mut().zip(&block[2..34]) {
                    *v = q as i8 as f32 * d;
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let scales = &block[4..16];
                let (qh, qs) = match dtype {
                    GgmlType::Q5K => (Some(&block[16..48]), &block[48..176]),
                    _ => (None, &block[16..144]),
                };
                for chunk in 0..4 {
                    let q = &qs[chunk * 32..chunk * 32 + 32];
                    for half in 0..2 {
                        let (sc, m) = scale_min_k4(chunk * 2 + half, scales);
                        let (scale, min) = (d * sc as f32, dmin * m as f32);
                        let bit = 1u8 << (chunk * 2 + half);
                        for l in 0..32 {
                            let low = if half == 0 { q[l] & 0xF } else { q[l] >> 4 };
                            let high = qh.map_or(0, |qh| if qh[l] & bit != 0 { 16 } else { 0 });
                            values[chunk * 64 + half * 32 + l] = scale * (low + high) as f32 - min;
                        }
                    }
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
                let d = f16_at(block, 208);
                for half in 0..2 {
                    let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
                    let sc = &scales[half * 8..];
                    for l in 0..32 {
                        let is = l / 16;
                        let [q1, q2, q3, q4] = q6k_quads(ql, qh, l);
                        let y = &mut values[half * 128..];
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// One row of activations quantized for a weight type's block products.
#[derive(Debug, Clone)]
pub enum QuantizedActivations {
    /// F32/F16/BF16 weights read activations as they are.
    Plain(Vec<f32>),
    /// Per 32 values: scale (f16-rounded, as stored by ggml), the sum of the
    /// quants times the scale (Q8_1's `s`, f16-rounded), and the quants.
    Q8 { d: Vec<f32>, s: Vec<f32>, q: Vec<i8> },
    /// Per 256 values: scale, the quants, and sums of each 16 quants.
    Q8K { d: Vec<f32>, q: Vec<i8>, bsums: Vec<i16> },
}

/// Round half to even for |x| < 2²²: ggml's `nearest_int`, and what the x86
/// paths' `_mm256_round_ps` give; branch free where `round_ties_even` would
/// call libm's `rintf` on baseline x86-64.
#[inline(always)]
fn nearest(x: f32) -> f32 {
    (x + 12_582_912.0) - 12_582_912.0
}

fn round_f16(x: f32) -> f32 {
    f16_to_f32(f32_to_f16(x))
}

/// Quantizes `x` (whole blocks) the way ggml does for `weight`'s dot products.
pub fn quantize_activations(weight: GgmlType, x: &[f32]) -> QuantizedActivations {
    match weight {
        GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => QuantizedActivations::Plain(x.to_vec()),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            let blocks = x.len() / QK;
            let (mut d, mut s, mut q) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks), vec![0i8; x.len()]);
            for (values, quants) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)) {
                let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                // As ggml's x86 path: 127/amax, rounding half to even.
                let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let mut sum = 0i32;
                for (out, v) in quants.iter_mut().zip(values) {
                    *out = nearest(v * inverse) as i8;
                    sum += *out as i32;
                }
                d.push(round_f16(scale));
                s.push(round_f16(sum as f32 * scale));
            }
            QuantizedActivations::Q8 { d, s, q }
        }
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            let blocks = x.len() / QK_K;
            let (mut d, mut q, mut bsums) = (Vec::with_capacity(blocks), vec![0i8; x.len()], vec![0i16; blocks * 16]);
            for (b, values) in x.chunks_exact(QK_K).enumerate() {
                // The value of largest magnitude, with its sign: it maps to -127.
                let max = values.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                if max == 0.0 {
                    d.push(0.0);
                    continue;
                }
                let inverse = -127.0 / max;
                let quants = &mut q[b * QK_K..(b + 1) * QK_K];
                for (out, v) in quants.iter_mut().zip(values) {
                    *out = nearest(inverse * v).min(127.0) as i8;
                }
                for (j, sum) in bsums[b * 16..(b + 1) * 16].iter_mut().enumerate() {
                    *sum = quants[j * 16..(j + 1) * 16].iter().map(|&v| v as i16).sum();
                }
                d.push(1.0 / inverse);
            }
            QuantizedActivations::Q8K { d, q, bsums }
        }
    }
}

fn dot_i8(a: impl Iterator<Item = i32>, b: &[i8]) -> i32 {
    a.zip(b).map(|(x, &y)| x * y as i32).sum()
}

/// `row · x` for one weight row (`dtype`, whole blocks) and activations
/// quantized for that type.
pub fn vec_dot(dtype: GgmlType, row: &[u8], x: &QuantizedActivations) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::quant_x86::available()
        && let QuantizedActivations::Q8 { d, s, q } = x
        && row.len() == d.len() * dtype.block_bytes()
        && q.len() == d.len() * QK
    {
        match dtype {
            // SAFETY: the instructions are present and the lengths were checked above.
            GgmlType::Q4_1 => return unsafe { super::quant_x86::dot_q4_1(row, d, s, q) },
            GgmlType::Q8_0 => return unsafe { super::quant_x86::dot_q8_0(row, d, q) },
            _ => {}
        }
    }
    vec_dot_portable(dtype, row, x)
}

/// `row · x` for `R` activation rows at once; the same numbers as `R`
/// [`vec_dot`] calls, faster where a kernel shares the weight unpacking.
pub fn vec_dot_rows<const R: usize>(dtype: GgmlType, row: &[u8], x: [&QuantizedActivations; R]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if super::quant_x86::available() && matches!(dtype, GgmlType::Q4_1 | GgmlType::Q8_0) {
        let blocks = row.len() / dtype.block_bytes();
        let parts = x.map(|a| match a {
            QuantizedActivations::Q8 { d, s, q } if d.len() == blocks && q.len() == blocks * QK => {
                Some((d.as_slice(), s.as_slice(), q.as_slice()))
            }
            _ => None,
        });
        if parts.iter().all(Option::is_some) {
            let parts = parts.map(|p| p.expect("checked"));
            let (d, s, q) = (parts.map(|p| p.0), parts.map(|p| p.1), parts.map(|p| p.2));
            // SAFETY: the instructions are present and every row's lengths were checked above.
            return unsafe {
                match dtype {
                    GgmlType::Q4_1 => super::quant_x86::dot_q4_1_rows(row, d, s, q),
                    _ => super::quant_x86::dot_q8_0_rows(row, d, q),
                }
            };
        }
    }
    x.map(|a| vec_dot(dtype, row, a))
}

/// The reference block dot products (any processor).
pub fn vec_dot_portable(dtype: GgmlType, row: &[u8], x: &QuantizedActivations) -> f32 {
    let bytes = dtype.block_bytes();
    match (dtype, x) {
        (GgmlType::F32, QuantizedActivations::Plain(x)) => {
            row.chunks_exact(4).zip(x).map(|(w, v)| f32::from_le_bytes(w.try_into().expect("4")) * v).sum()
        }
        (GgmlType::F16, QuantizedActivations::Plain(x)) => {
            x.iter().enumerate().map(|(i, v)| f16_at(row, 2 * i) * v).sum()
        }
        (GgmlType::Bf16, QuantizedActivations::Plain(x)) => {
            x.iter().enumerate().map(|(i, v)| bf16_at(row, 2 * i) * v).sum()
        }
        (GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0, QuantizedActivations::Q8 { d, s, q }) => {
            let mut sum = 0f32;
            for (b, block) in row.chunks_exact(bytes).enumerate() {
                let xq = &q[b * QK..(b + 1) * QK];
                let dw = f16_at(block, 0);
                sum += match dtype {
                    GgmlType::Q8_0 => dw * d[b] * dot_i8(block[2..34].iter().map(|&w| w as i8 as i32), xq) as f32,
                    GgmlType::Q4_0 => {
                        let qs = &block[2..18];
                        let low = dot_i8(qs.iter().map(|&w| (w & 0xF) as i32 - 8), &xq[..16]);
                        let high = dot_i8(qs.iter().map(|&w| (w >> 4) as i32 - 8), &xq[16..]);
                        dw * d[b] * (low + high) as f32
                    }
                    _ => {
                        let qs = &block[4..20];
                        let low = dot_i8(qs.iter().map(|&w| (w & 0xF) as i32), &xq[..16]);
                        let high = dot_i8(qs.iter().map(|&w| (w >> 4) as i32), &xq[16..]);
                        dw * d[b] * (low + high) as f32 + f16_at(block, 2) * s[b]
                    }
                };
            }
            sum
        }
        (GgmlType::Q4K | GgmlType::Q5K, QuantizedActivations::Q8K { d, q, bsums }) => {
            let mut sum = 0f32;
            for (b, block) in row.chunks_exact(bytes).enumerate() {
                let xq = &q[b * QK_K..(b + 1) * QK_K];
                let scales = &block[4..16];
                let (qh, qs) = match dtype {
                    GgmlType::Q5K => (Some(&block[16..48]), &block[48..176]),
                    _ => (None, &block[16..144]),
                };
                let (mut sumi, mut mins) = (0i32, 0i32);
                for sub in 0..8 {
                    let (sc, m) = scale_min_k4(sub, scales);
                    let (chunk, half) = (sub / 2, sub % 2);
                    let quants = &qs[chunk * 32..chunk * 32 + 32];
                    let bit = 1u8 << sub;
                    let weights = quants.iter().enumerate().map(|(l, &w)| {
                        let low = if half == 0 { w & 0xF } else { w >> 4 };
                        (low + qh.map_or(0, |qh| if qh[l] & bit != 0 { 16 } else { 0 })) as i32
                    });
                    sumi += sc as i32 * dot_i8(weights, &xq[sub * 32..sub * 32 + 32]);
                    mins += m as i32 * (bsums[b * 16 + 2 * sub] as i32 + bsums[b * 16 + 2 * sub + 1] as i32);
                }
                sum += d[b] * f16_at(block, 0) * sumi as f32 - d[b] * f16_at(block, 2) * mins as f32;
            }
            sum
        }
        (GgmlType::Q6K, QuantizedActivations::Q8K { d, q, .. }) => {
            let mut sum = 0f32;
            for (b, block) in row.chunks_exact(bytes).enumerate() {
                let xq = &q[b * QK_K..(b + 1) * QK_K];
                let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
                let mut sumi = 0i32;
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[half * 64..], &qh[half * 32..], &scales[half * 8..]);
                    let x = &xq[half * 128..];
                    for l in 0..32 {
                        let is = l / 16;
                        let [q1, q2, q3, q4] = q6k_quads(ql, qh, l);
                        sumi += (sc[is] as i8) as i32 * q1 * x[l] as i32
                            + (sc[is + 2] as i8) as i32 * q2 * x[l + 32] as i32
                            + (sc[is + 4] as i8) as i32 * q3 * x[l + 64] as i32
                            + (sc[is + 6] as i8) as i32 * q4 * x[l + 96] as i32;
                    }
                }
                sum += d[b] * f16_at(block, 208) * sumi as f32;
            }
            sum
        }
        _ => unreachable!("activations are quantized for the weight's own type"),
    }
}

/// The activations a quantized row product actually reads, expanded back to
/// f32 (for tests: the kernel must equal the f32 product of this and the
/// dequantized weights up to float rounding).
pub fn dequantize_activations(x: &QuantizedActivations) -> Vec<f32> {
    match x {
        QuantizedActivations::Plain(x) => x.clone(),
        QuantizedActivations::Q8 { d, q, .. } => q.iter().enumerate().map(|(i, &v)| v as f32 * d[i / QK]).collect(),
        QuantizedActivations::Q8K { d, q, .. } => q.iter().enumerate().map(|(i, &v)| v as f32 * d[i / QK_K]).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Device;

    /// Deterministic noise in [-1, 1).
    fn noise(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Random but valid blocks: scales are small finite halves, quants any bits.
    fn random_row(dtype: GgmlType, k: usize, seed: &mut u64) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..dtype.row_bytes(k)).map(|_| (noise(seed).to_bits() >> 7) as u8).collect();
        let half = |seed: &mut u64, scale: f32| f32_to_f16(noise(seed) * scale).to_le_bytes();
        for block in bytes.chunks_exact_mut(dtype.block_bytes()) {
            match dtype {
                GgmlType::F32 => block.copy_from_slice(&noise(seed).to_le_bytes()),
                GgmlType::F16 => block.copy_from_slice(&half(seed, 1.0)),
                GgmlType::Bf16 => block.copy_from_slice(&((noise(seed).to_bits() >> 16) as u16).to_le_bytes()),
                GgmlType::Q4_0 | GgmlType::Q8_0 => block[0..2].copy_from_slice(&half(seed, 0.05)),
                GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K => {
                    block[0..2].copy_from_slice(&half(seed, 0.05));
                    block[2..4].copy_from_slice(&half(seed, 0.05));
                }
                GgmlType::Q6K => block[208..210].copy_from_slice(&half(seed, 0.01)),
            }
        }
        bytes
    }

    const ALL: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    #[test]
    fn quantized_products_match_the_dequantized_f32_reference() {
        let device = Device::Cpu;
        let (m, k, n) = (3, 512, 70);
        let mut seed = 42;
        for dtype in ALL {
            let rows: Vec<Vec<u8>> = (0..n).map(|_| random_row(dtype, k, &mut seed)).collect();
            let w = device.quant_matrix(dtype, k, n, rows.concat()).unwrap();
            let x: Vec<f32> = (0..m * k).map(|_| noise(&mut seed)).collect();
            let got =
                device.linear_quantized(&device.tensor(&[m, k], x.clone()).unwrap(), &w).unwrap().to_host().unwrap();
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                let read = dequantize_activations(&quantize_activations(dtype, xi));
                for (j, row) in rows.iter().enumerate() {
                    let mut wj = vec![0f32; k];
                    dequantize_row(dtype, row, &mut wj);
                    assert_eq!(w.dequantize_row(j), wj);
                    // What the kernel reads, multiplied in f64: equal up to float rounding.
                    let exact: f64 = wj.iter().zip(&read).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let magnitude: f64 = wj.iter().zip(&read).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                    let value = got[i * n + j] as f64;
                    // Q4_1's minimum multiplies Q8_1's block sum `s`, which
                    // ggml stores as a half: allow that rounding (2^-11 relative).
                    let sum_rounding: f64 = match (dtype, &quantize_activations(dtype, xi)) {
                        (GgmlType::Q4_1, QuantizedActivations::Q8 { s, .. }) => row
                            .chunks_exact(dtype.block_bytes())
                            .zip(s)
                            .map(|(block, s)| (f16_at(block, 2) * s).abs() as f64 * 2f64.powi(-11))
                            .sum(),
                        _ => 0.0,
                    };
                    assert!(
                        (value - exact).abs() <= 1e-5 * magnitude.max(1e-3) + sum_rounding,
                        "{dtype:?} [{i},{j}]: kernel {value}, reference {exact}"
                    );
                    // Against unquantized activations: within activation rounding,
                    // half a quantization step per value.
                    let f32_ref: f64 = wj.iter().zip(xi).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let step = match dtype {
                        GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => 0.0,
                        _ => 1.0 / 127.0,
                    };
                    let bound: f64 = wj.iter().map(|a| a.abs() as f64).sum::<f64>() * step * 0.51 + 1e-4 * magnitude;
                    assert!((value - f32_ref).abs() <= bound.max(1e-5), "{dtype:?}: {value} vs f32 {f32_ref}");
                }
            }
        }
    }

    /// A prompt's many rows against a block-quantized weight in bf16 prefill
    /// take the AMX path where the processor has it: bf16 weights and
    /// activations, f32 sums.
    #[test]
    fn prefill_products_on_tiles_match_the_dequantized_f32_reference() {
        if !crate::backend::amx::available() {
            eprintln!("no AMX here: skipped");
            return;
        }
        let bf16 = |v: f32| f32::from_bits(u32::from(crate::backend::half::f32_to_bf16(v)) << 16) as f64;
        let device = Device::Cpu;
        let (m, k, n) = (70, 512, 40);
        let mut seed = 5;
        for dtype in ALL.into_iter().filter(|t| t.is_quantized()) {
            let rows: Vec<Vec<u8>> = (0..n).map(|_| random_row(dtype, k, &mut seed)).collect();
            let w =
                device.quant_matrix(dtype, k, n, rows.concat()).unwrap().with_prefill(crate::backend::Precision::Bf16);
            let x: Vec<f32> = (0..m * k).map(|_| noise(&mut seed)).collect();
            let got =
                device.linear_quantized(&device.tensor(&[m, k], x.clone()).unwrap(), &w).unwrap().to_host().unwrap();
            let mut worst = 0f64;
            for (j, row) in rows.iter().enumerate() {
                let mut wj = vec![0f32; k];
                dequantize_row(dtype, row, &mut wj);
                for i in 0..m {
                    let xi = &x[i * k..(i + 1) * k];
                    let exact: f64 = wj.iter().zip(xi).map(|(a, b)| bf16(*a) * bf16(*b)).sum();
                    let magnitude: f64 = wj.iter().zip(xi).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                    let value = got[i * n + j] as f64;
                    assert!(
                        (value - exact).abs() <= 1e-5 * magnitude.max(1e-3),
                        "{dtype:?} [{i},{j}]: tiles {value}, bf16 reference {exact}"
                    );
                    let f32_ref: f64 = wj.iter().zip(xi).map(|(a, b)| *a as f64 * *b as f64).sum();
                    worst = worst.max((value - f32_ref).abs() / magnitude.max(1e-3));
                }
            }
            // Two bf16 roundings per product, 2^-9 each at most.
            assert!(worst <= 2.0 * 2f64.powi(-9), "{dtype:?}: {worst} of the magnitude from the f32 product");
        }
    }

    /// The prefill path's expansion of a weight (vectorised per type) equals
    /// the reference bit for bit: both compute `d·q + m` with one rounding.
    #[test]
    fn fast_dequantization_equals_the_reference() {
        let mut seed = 11;
        for dtype in ALL {
            let row = random_row(dtype, 512, &mut seed);
            let (mut fast, mut reference) = (vec![0f32; 512], vec![0f32; 512]);
            crate::backend::cpu::dequantize_row(dtype, &row, &mut fast);
            dequantize_row(dtype, &row, &mut reference);
            assert_eq!(fast, reference, "{dtype:?}");
        }
    }

    #[test]
    fn simd_products_equal_the_portable_ones() {
        let mut seed = 7;
        let k = 576;
        for dtype in ALL {
            for _ in 0..20 {
                let row = random_row(dtype, k, &mut seed);
                let x: Vec<f32> = (0..k).map(|_| noise(&mut seed) * 3.0).collect();
                let a = quantize_activations(dtype, &x);
                let (fast, reference) = (vec_dot(dtype, &row, &a), vec_dot_portable(dtype, &row, &a));
                assert!(
                    (fast - reference).abs() <= 1e-5 * reference.abs().max(1.0),
                    "{dtype:?}: {fast} vs {reference}"
                );
                // Several rows sharing the unpacking: each row's number unchanged, to the bit.
                let y: Vec<f32> = (0..k).map(|_| noise(&mut seed)).collect();
                let b = quantize_activations(dtype, &y);
                let single = [fast, vec_dot(dtype, &row, &b)];
                assert_eq!(vec_dot_rows(dtype, &row, [&a, &b]), single, "{dtype:?}");
                assert_eq!(vec_dot_rows(dtype, &row, [&b, &a, &b]), [single[1], single[0], single[1]], "{dtype:?}");
                assert_eq!(vec_dot_rows(dtype, &row, [&a, &b, &a, &b]), [single[0], single[1], single[0], single[1]]);
            }
        }
    }

    #[test]
    fn known_blocks_dequantize_as_ggml_defines() {
        // Q4_1: d = 0.5, m = -1, nibbles j | (15 - j) << 4.
        let mut block = Vec::new();
        block.extend(f32_to_f16(0.5).to_le_bytes());
        block.extend(f32_to_f16(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = vec![0f32; 32];
        dequantize_row(GgmlType::Q4_1, &block, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
        // Q8_0: d = 0.25, quants -16..16.
        let mut block = f32_to_f16(0.25).to_le_bytes().to_vec();
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        dequantize_row(GgmlType::Q8_0, &block, &mut out);
        assert_eq!(out, (0..32).map(|j| (j as f32 - 16.0) * 0.25).collect::<Vec<_>>());
        // Q6_K: every quant 33 (stored 1 above the -32 offset), scales 1..16, d = 1.
        let mut block = vec![0u8; 210];
        block[..128].fill(0x11);
        block[192..208].copy_from_slice(&(1..=16u8).collect::<Vec<_>>());
        block[208..210].copy_from_slice(&f32_to_f16(1.0).to_le_bytes());
        let mut out = vec![0f32; 256];
        dequantize_row(GgmlType::Q6K, &block, &mut out);
        // Value v of the block uses scale index v / 16; (q - 32) = 1 - 32 = -31.
        for (v, value) in out.iter().enumerate() {
            assert_eq!(*value, -31.0 * (v / 16 + 1) as f32, "value {v}");
        }
    }
}
