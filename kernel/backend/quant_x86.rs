//! AVX-512 VNNI block dot products for the formats of the default generator
//! (Q4_1 weights × Q8_1 activations, Q8_0 × Q8_0): one 32-value block per
//! 256-bit register, `vpdpbusd` for the integer products, one float
//! accumulator per row and a single horizontal sum at its end (as ggml's
//! AVX paths do). The portable code in `quant.rs` is the reference.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Bytes ahead of the current block to prefetch (a prefetch of an address
/// past the row's end is harmless: it never faults).
const PREFETCH_AHEAD: usize = 3072;

/// Whether this processor has the instructions (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn half(bytes: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn hsum(v: __m256) -> f32 {
    let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
}

/// `Σ_blocks d_w·d_x·Σ(q_w·q_x) + m_w·s_x` over one Q4_1 row.
///
/// # Safety
/// [`available`] must be true; `row` holds `d.len()` blocks and `q` 32 per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_1(row: &[u8], d: &[f32], s: &[f32], q: &[i8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut minimums = 0f32;
    let nibble = _mm_set1_epi8(0x0F);
    for (b, block) in row.chunks_exact(20).enumerate() {
        // Weights stream from memory once per token: ask for the next lines early.
        _mm_prefetch::<_MM_HINT_T0>(block.as_ptr().wrapping_add(PREFETCH_AHEAD).cast());
        // SAFETY: the block has 16 bytes of nibbles at 4 and the activations 32 bytes at b·32.
        let packed = unsafe { _mm_loadu_si128(block.as_ptr().add(4).cast()) };
        let low = _mm_and_si128(packed, nibble);
        let high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
        let weights = _mm256_set_m128i(high, low);
        let x = unsafe { _mm256_loadu_si256(q.as_ptr().add(b * 32).cast()) };
        let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), weights, x);
        let scale = _mm256_set1_ps(half(block, 0) * d[b]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
        minimums += half(block, 2) * s[b];
    }
    hsum(acc) + minimums
}

/// `Σ_blocks d_w·d_x·Σ(q_w·q_x)` over one Q8_0 row: the weight's signs move
/// onto the activations so `vpdpbusd` sees an unsigned operand.
///
/// # Safety
/// As [`dot_q4_1`], with 34-byte blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q8_0(row: &[u8], d: &[f32], q: &[i8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (b, block) in row.chunks_exact(34).enumerate() {
        _mm_prefetch::<_MM_HINT_T0>(block.as_ptr().wrapping_add(PREFETCH_AHEAD).cast());
        // SAFETY: 32 weight bytes at 2 of the block, 32 activations at b·32.
        let w = unsafe { _mm256_loadu_si256(block.as_ptr().add(2).cast()) };
        let x = unsafe { _mm256_loadu_si256(q.as_ptr().add(b * 32).cast()) };
        let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        let scale = _mm256_set1_ps(half(block, 0) * d[b]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
    }
    hsum(acc)
}

/// One Q4_1 row expanded to f32 (`out.len()` values): `d·q + m` per value,
/// as the portable `dequantize_row` computes it, 16 at a time.
///
/// # Safety
/// [`available`] must be true; `row` holds `out.len() / 32` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn dequantize_q4_1(row: &[u8], out: &mut [f32]) {
    let nibble = _mm_set1_epi8(0x0F);
    for (block, values) in row.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let (d, m) = (_mm512_set1_ps(half(block, 0)), _mm512_set1_ps(half(block, 2)));
        // SAFETY: 16 bytes of nibbles at 4 of the block; 32 values to store.
        unsafe {
            let packed = _mm_loadu_si128(block.as_ptr().add(4).cast());
            let low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(packed, nibble)));
            let high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble)));
            _mm512_storeu_ps(values.as_mut_ptr(), _mm512_fmadd_ps(low, d, m));
            _mm512_storeu_ps(values.as_mut_ptr().add(16), _mm512_fmadd_ps(high, d, m));
        }
    }
}

/// `R` activation rows against one Q4_1 weight row: each weight block is
/// unpacked once for all of them (a prompt's rows, or sequences decoded
/// together); per row, the same arithmetic as [`dot_q4_1`].
///
/// # Safety
/// As [`dot_q4_1`], for each of the activation rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_1_rows<const R: usize>(row: &[u8], d: [&[f32]; R], s: [&[f32]; R], q: [&[i8]; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut minimums = [0f32; R];
    let nibble = _mm_set1_epi8(0x0F);
    for (b, block) in row.chunks_exact(20).enumerate() {
        _mm_prefetch::<_MM_HINT_T0>(block.as_ptr().wrapping_add(PREFETCH_AHEAD).cast());
        // SAFETY: as in dot_q4_1, for each row.
        let packed = unsafe { _mm_loadu_si128(block.as_ptr().add(4).cast()) };
        let low = _mm_and_si128(packed, nibble);
        let high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
        let weights = _mm256_set_m128i(high, low);
        let (dw, mw) = (half(block, 0), half(block, 2));
        for r in 0..R {
            let x = unsafe { _mm256_loadu_si256(q[r].as_ptr().add(b * 32).cast()) };
            let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), weights, x);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(dw * d[r][b]), acc[r]);
            minimums[r] += mw * s[r][b];
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]) + minimums[r];
    }
    out
}

/// `R` activation rows against one Q8_0 weight row; per row, the same
/// arithmetic as [`dot_q8_0`].
///
/// # Safety
/// As [`dot_q8_0`], for each of the activation rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q8_0_rows<const R: usize>(row: &[u8], d: [&[f32]; R], q: [&[i8]; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, block) in row.chunks_exact(34).enumerate() {
        _mm_prefetch::<_MM_HINT_T0>(block.as_ptr().wrapping_add(PREFETCH_AHEAD).cast());
        // SAFETY: as in dot_q8_0, for each row.
        let w = unsafe { _mm256_loadu_si256(block.as_ptr().add(2).cast()) };
        let magnitude = _mm256_sign_epi8(w, w);
        let dw = half(block, 0);
        for r in 0..R {
            let x = unsafe { _mm256_loadu_si256(q[r].as_ptr().add(b * 32).cast()) };
            let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), magnitude, _mm256_sign_epi8(x, w));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(dw * d[r][b]), acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}
