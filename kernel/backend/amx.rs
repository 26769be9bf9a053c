//! bf16 matrix products on Intel AMX (Sapphire Rapids and later): the
//! opt-in reduced-precision path for encoders.
//!
//! A tile multiply (`tdpbf16ps`) takes 16 rows × 32 bf16 of activations and
//! 32 × 16 bf16 of weights into 16 × 16 f32 accumulators: 16,384 FLOPs in
//! one instruction, many times what AVX-512 FMAs reach on the same core.
//! Weights are converted and laid out once at load in the tile order the
//! instruction reads (pairs of consecutive `k` side by side, zero-padded to
//! whole tiles); activations are rounded to bf16 per call. Accumulation is
//! f32, so the error is that of bf16 inputs alone.
//!
//! Stable Rust has no AMX intrinsics, so the few tile instructions are
//! inline assembly; Linux hands out the tile state only after the process
//! asks for it (`arch_prctl`), which [`available`] does once.

#[cfg(target_arch = "x86_64")]
use std::arch::asm;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::packed::Out;

/// Tile edge: rows of every tile; f32 columns of a result tile.
const EDGE: usize = 16;
/// `k` values per tile multiply (bf16 pairs × 16 columns).
const KB: usize = 32;
/// Rows and columns of one block of results (2 × 2 result tiles).
const BLOCK: usize = 2 * EDGE;
/// Row blocks per task.
const CHUNK: usize = 4;

/// A `[k, n]` weight as bf16 tiles: for each 16-column block, for each
/// 32-row step of `k`, a 16 × 32 tile with `w[k0 + 2r + t][c0 + j]` at
/// `[r][2j + t]`.
#[derive(Debug, Clone)]
pub struct AmxWeights {
    pub k: usize,
    pub n: usize,
    /// `k` rounded up to whole tile steps.
    k_padded: usize,
    /// 16-column blocks, rounded up to an even count (tasks take pairs).
    column_blocks: usize,
    tiles: Vec<u16>,
}

use super::half::f32_to_bf16 as to_bf16;

impl AmxWeights {
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        let k_padded = k.div_ceil(KB) * KB;
        let column_blocks = n.div_ceil(BLOCK) * 2;
        let steps = k_padded / KB;
        let mut tiles = vec![0u16; column_blocks * steps * EDGE * KB];
        for cb in 0..column_blocks {
            for step in 0..steps {
                let tile = &mut tiles[(cb * steps + step) * EDGE * KB..][..EDGE * KB];
                for r in 0..EDGE {
                    for j in 0..EDGE {
                        for t in 0..2 {
                            let (row, col) = (step * KB + 2 * r + t, cb * EDGE + j);
                            if row < k && col < n {
                                tile[r * KB + 2 * j + t] = to_bf16(w[row * n + col]);
                            }
                        }
                    }
                }
            }
        }
        AmxWeights { k, n, k_padded, column_blocks, tiles }
    }

    /// A weight stored as `n` rows of `k` inputs (ggml's block formats, one
    /// row per output), expanded by `row(j, values)` into tiles for one
    /// product. Prefill runs each quantized matrix once over hundreds of
    /// rows, so expanding it per call costs a few percent of the product and
    /// keeps the model in its compact form between calls.
    pub fn from_rows(k: usize, n: usize, row: &(dyn Fn(usize, &mut [f32]) + Sync)) -> Self {
        let k_padded = k.div_ceil(KB) * KB;
        let column_blocks = n.div_ceil(BLOCK) * 2;
        let steps = k_padded / KB;
        let block_len = steps * EDGE * KB;
        let mut tiles: Vec<u16> = Vec::with_capacity(column_blocks * block_len);
        let dst = Out(tiles.as_mut_ptr().cast());
        (0..column_blocks).into_par_iter().for_each(|cb| {
            let dst = dst;
            // 16 outputs' rows, zero past `k` and past `n` (the tiles' padding).
            let mut values = vec![0f32; EDGE * k_padded];
            for (j, values) in values.chunks_exact_mut(k_padded).enumerate() {
                if cb * EDGE + j < n {
                    row(cb * EDGE + j, &mut values[..k]);
                }
            }
            for step in 0..steps {
                // SAFETY: tile (cb, step) lies inside the capacity and only
                // this task writes it; `values` holds 16 rows of k_padded.
                unsafe {
                    let tile = std::slice::from_raw_parts_mut(
                        dst.0.cast::<u16>().add((cb * steps + step) * EDGE * KB),
                        EDGE * KB,
                    );
                    transpose_into_tile(&values[step * KB..], k_padded, tile);
                }
            }
        });
        // SAFETY: every tile of every column block was written above.
        unsafe { tiles.set_len(column_blocks * block_len) };
        AmxWeights { k, n, k_padded, column_blocks, tiles }
    }

    fn tile(&self, column_block: usize, step: usize) -> *const u16 {
        let steps = self.k_padded / KB;
        self.tiles[(column_block * steps + step) * EDGE * KB..].as_ptr()
    }
}

/// One weight tile from 16 outputs' rows of 32 consecutive inputs each
/// (`rows[j · stride..][..32]`): `tile[r][2j + t] = bf16(rows[j][2r + t])`.
fn transpose_into_tile(rows: &[f32], stride: usize, tile: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
        assert!(rows.len() >= (EDGE - 1) * stride + KB && tile.len() >= EDGE * KB);
        // SAFETY: the features are present; the bounds are checked above.
        unsafe { transpose_into_tile_avx512(rows.as_ptr(), stride, tile.as_mut_ptr()) };
        return;
    }
    for r in 0..EDGE {
        for j in 0..EDGE {
            for t in 0..2 {
                tile[r * KB + 2 * j + t] = to_bf16(rows[j * stride + 2 * r + t]);
            }
        }
    }
}

/// Each output's 32 values become one register of 16 bf16 pairs; a 16 × 16
/// transpose of 32-bit pairs then gives the tile's rows.
///
/// # Safety
/// AVX-512F and AVX-512 BF16; `rows` holds 16 rows of 32 at `stride`, `tile` 512 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn transpose_into_tile_avx512(rows: *const f32, stride: usize, tile: *mut u16) {
    use std::arch::x86_64::*;
    // SAFETY: (for the whole body) loads and stores stay inside the bounds the caller gives.
    unsafe {
        let mut r = [_mm512_setzero_si512(); EDGE];
        for (j, r) in r.iter_mut().enumerate() {
            let low = _mm512_loadu_ps(rows.add(j * stride));
            let high = _mm512_loadu_ps(rows.add(j * stride + EDGE));
            *r = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low));
        }
        // Within each 128-bit lane: rows in fours, 32-bit then 64-bit interleaves.
        let mut t = [_mm512_setzero_si512(); EDGE];
        for q in 0..4 {
            let (a, b, c, d) = (r[4 * q], r[4 * q + 1], r[4 * q + 2], r[4 * q + 3]);
            let (ab_lo, ab_hi) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
            let (cd_lo, cd_hi) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
            t[4 * q] = _mm512_unpacklo_epi64(ab_lo, cd_lo);
            t[4 * q + 1] = _mm512_unpackhi_epi64(ab_lo, cd_lo);
            t[4 * q + 2] = _mm512_unpacklo_epi64(ab_hi, cd_hi);
            t[4 * q + 3] = _mm512_unpackhi_epi64(ab_hi, cd_hi);
        }
        // t[4q + i], lane L, is column 4L + i of rows 4q..4q + 4: gather the
        // four row groups' lanes.
        for i in 0..4 {
            let p = _mm512_shuffle_i32x4::<0x88>(t[i], t[4 + i]);
            let q = _mm512_shuffle_i32x4::<0xDD>(t[i], t[4 + i]);
            let p2 = _mm512_shuffle_i32x4::<0x88>(t[8 + i], t[12 + i]);
            let q2 = _mm512_shuffle_i32x4::<0xDD>(t[8 + i], t[12 + i]);
            _mm512_storeu_si512(tile.add(i * KB).cast(), _mm512_shuffle_i32x4::<0x88>(p, p2));
            _mm512_storeu_si512(tile.add((8 + i) * KB).cast(), _mm512_shuffle_i32x4::<0xDD>(p, p2));
            _mm512_storeu_si512(tile.add((4 + i) * KB).cast(), _mm512_shuffle_i32x4::<0x88>(q, q2));
            _mm512_storeu_si512(tile.add((12 + i) * KB).cast(), _mm512_shuffle_i32x4::<0xDD>(q, q2));
        }
    }
}

/// Whether this processor and kernel run AMX bf16 (asks Linux for the tile
/// state on the first call).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(request_tiles)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tiles() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call; it fails cleanly on kernels without AMX support.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tiles() -> bool {
    false
}

/// Tile configuration (palette 1): tiles 0–3 are 16 × 16 f32 results,
/// 4–5 activations and 6–7 weights, all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// `x[m, k] · w + bias` (`[m, n]`), then `epilogue` on each finished row
/// segment (the columns one task computed). Requires [`available`].
pub fn matmul(
    x: &[f32],
    w: &AmxWeights,
    bias: Option<&[f32]>,
    m: usize,
    epilogue: &(dyn Fn(&mut [f32]) + Sync),
) -> Vec<f32> {
    assert!(available(), "AMX matmul needs AMX-BF16 and the tile state");
    let (k, n, kp) = (w.k, w.n, w.k_padded);
    assert!(x.len() >= m * k && bias.is_none_or(|b| b.len() >= n));
    // Not zeroed: every element is written below before anything reads it
    // (zeroing cost a twentieth of an encoder batch).
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // Activations in bf16, rows padded to whole result blocks and columns to whole tile steps.
    let row_blocks = m.div_ceil(BLOCK);
    let mut xb = vec![0u16; row_blocks * BLOCK * kp];
    xb.par_chunks_mut(kp * BLOCK).zip(x.par_chunks(k * BLOCK)).for_each(|(dst, src)| {
        for (dst, src) in dst.chunks_mut(kp).zip(src.chunks(k)) {
            super::cpu::to_bf16_row(src, dst);
        }
    });
    let column_pairs = w.column_blocks / 2;
    // A task takes up to CHUNK row blocks and, for each pair of column
    // blocks, runs them all: the pair's weight tiles (kp / 16 KB) are read
    // from memory once and then from L1.
    let chunks = row_blocks.div_ceil(CHUNK);
    let threads = rayon::current_num_threads();
    // Few chunks: split the columns too, so every core works.
    let groups = if chunks >= 2 * threads { 1 } else { threads.min(column_pairs).max(1) };
    let dst = Out(out.as_mut_ptr());
    let task = |task: usize, groups: usize| {
        let dst = dst;
        let (chunk, group) = (task / groups, task % groups);
        let per_group = column_pairs.div_ceil(groups);
        let pairs = group * per_group..((group + 1) * per_group).min(column_pairs);
        if pairs.is_empty() {
            return;
        }
        let blocks = chunk * CHUNK..((chunk + 1) * CHUNK).min(row_blocks);
        let mut results = [0f32; BLOCK * BLOCK];
        // SAFETY: AMX is available; the tile configuration is loaded before
        // the tile instructions and released after them, on this thread.
        unsafe { configure() };
        for pair in pairs.clone() {
            let (c0, cols) = (pair * BLOCK, (n.saturating_sub(pair * BLOCK)).min(BLOCK));
            for block in blocks.clone() {
                // SAFETY: xb holds BLOCK rows of kp values from block·BLOCK;
                // the weight tiles of column blocks 2·pair and 2·pair + 1 exist.
                unsafe { block_product(xb[block * BLOCK * kp..].as_ptr(), kp, w, 2 * pair, &mut results) };
                let rows = block * BLOCK..((block + 1) * BLOCK).min(m);
                for (r, row) in rows.enumerate() {
                    let computed = &mut results[r * BLOCK..][..cols];
                    if let Some(b) = bias {
                        computed.iter_mut().zip(&b[c0..]).for_each(|(v, b)| *v += b);
                    }
                    // SAFETY: row < m and columns c0..c0 + cols < n, inside
                    // `out`'s capacity; only this task writes them.
                    unsafe { std::ptr::copy_nonoverlapping(computed.as_ptr(), dst.0.add(row * n + c0), cols) };
                }
            }
        }
        // SAFETY: as above.
        unsafe { release() };
        // The epilogue over whole row segments (vectorises better than per tile).
        let columns = (pairs.start * BLOCK).min(n)..(pairs.end * BLOCK).min(n);
        for row in blocks.start * BLOCK..(blocks.end * BLOCK).min(m) {
            // SAFETY: this task's rows and columns, written above.
            epilogue(unsafe { std::slice::from_raw_parts_mut(dst.0.add(row * n + columns.start), columns.len()) });
        }
    };
    if chunks == 1 {
        // One block of rows (a query or two): the weights' read is the work,
        // split over the awake team's members (see team.rs), which start at
        // once where rayon's sleeping workers would first be woken.
        let team = super::team::Team::global();
        let parts = team.chunks_for(column_pairs);
        team.run(parts, &|part| task(part, parts));
    } else {
        (0..chunks * groups).into_par_iter().for_each(|t| task(t, groups));
    }
    // SAFETY: the tasks wrote every row < m and column < n.
    unsafe { out.set_len(m * n) };
    out
}

/// # Safety
/// AMX must be available (the process holds the tile state).
#[cfg(target_arch = "x86_64")]
unsafe fn configure() {
    // SAFETY: CONFIG is a valid palette-1 configuration, 64 bytes, aligned.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly)) };
}

/// # Safety
/// As for [`configure`].
#[cfg(target_arch = "x86_64")]
unsafe fn release() {
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// A 32 × 32 block of results: 32 activation rows (`a`, row stride `kp`
/// bf16) times column blocks `cb` and `cb + 1` of `w`, into `results`
/// (row-major, 32 f32 per row).
///
/// # Safety
/// The tile configuration is loaded; `a` holds 32 rows of `kp` values.
#[cfg(target_arch = "x86_64")]
unsafe fn block_product(a: *const u16, kp: usize, w: &AmxWeights, cb: usize, results: &mut [f32; BLOCK * BLOCK]) {
    let stride = kp * 2;
    let tile_stride = KB * 2;
    // SAFETY: every load reads 16 rows of 64 bytes inside `a` or a weight
    // tile; the stores write 16 rows of 64 bytes inside `results`.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        for step in 0..kp / KB {
            let a0 = a.add(step * KB);
            let a1 = a.add(EDGE * kp + step * KB);
            asm!(
                "tileloadd tmm4, [{a0} + {stride} * 1]",
                "tileloadd tmm5, [{a1} + {stride} * 1]",
                "tileloadd tmm6, [{b0} + {tile_stride} * 1]",
                "tileloadd tmm7, [{b1} + {tile_stride} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) w.tile(cb, step),
                b1 = in(reg) w.tile(cb + 1, step),
                stride = in(reg) stride,
                tile_stride = in(reg) tile_stride,
                options(nostack, readonly),
            );
        }
        let c = results.as_mut_ptr();
        let row_stride = BLOCK * 4;
        asm!(
            "tilestored [{c00} + {s} * 1], tmm0",
            "tilestored [{c01} + {s} * 1], tmm1",
            "tilestored [{c10} + {s} * 1], tmm2",
            "tilestored [{c11} + {s} * 1], tmm3",
            c00 = in(reg) c,
            c01 = in(reg) c.add(EDGE),
            c10 = in(reg) c.add(EDGE * BLOCK),
            c11 = in(reg) c.add(EDGE * BLOCK + EDGE),
            s = in(reg) row_stride,
            options(nostack),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn configure() {}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn release() {}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_product(_: *const u16, _: usize, _: &AmxWeights, _: usize, _: &mut [f32; BLOCK * BLOCK]) {
    unreachable!("AMX runs only where `available` is true")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_bf16(v: u16) -> f32 {
        f32::from_bits(u32::from(v) << 16)
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    /// Rows expanded straight into tiles (the transposing path) give the
    /// same tiles, bit for bit, as packing the transposed matrix.
    #[test]
    fn tiles_from_rows_equal_tiles_packed_from_columns() {
        for (k, n) in [(1, 1), (32, 16), (40, 17), (64, 96), (576, 192), (100, 70)] {
            let rows: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1.3e-3).collect();
            let columns: Vec<f32> = (0..k * n).map(|i| rows[(i % n) * k + i / n]).collect();
            let from_rows = AmxWeights::from_rows(k, n, &|j, out| out.copy_from_slice(&rows[j * k..(j + 1) * k]));
            let packed = AmxWeights::pack(&columns, k, n);
            assert_eq!((from_rows.k_padded, from_rows.column_blocks), (packed.k_padded, packed.column_blocks));
            assert!(from_rows.tiles == packed.tiles, "k {k}, n {n}");
        }
    }

    /// Against the same product in f64 over the bf16-rounded inputs: only
    /// the f32 accumulation may differ.
    #[test]
    fn amx_matmul_matches_a_reference_over_bf16_inputs_on_odd_shapes() {
        if !available() {
            eprintln!("no AMX here: skipped");
            return;
        }
        // 300 rows: several tasks of row blocks (rayon); the others one (the awake team).
        for (m, k, n) in [(1, 1, 1), (13, 7, 33), (32, 64, 32), (70, 384, 1152), (33, 40, 17), (300, 64, 96)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.37).collect();
            let w: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.21).collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let packed = AmxWeights::pack(&w, k, n);
            let out = matmul(&x, &packed, Some(&bias), m, &|_| {});
            for i in 0..m {
                for j in 0..n {
                    let want = f64::from(bias[j])
                        + (0..k)
                            .map(|kk| {
                                f64::from(from_bf16(to_bf16(x[i * k + kk])))
                                    * f64::from(from_bf16(to_bf16(w[kk * n + j])))
                            })
                            .sum::<f64>();
                    let got = f64::from(out[i * n + j]);
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "({m},{k},{n}) at ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
