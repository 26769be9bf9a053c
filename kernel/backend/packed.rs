//! Matrix products against weights packed once at load, for AVX-512.
//!
//! General GEMM libraries pack the right-hand matrix on every call; for
//! inference the right-hand side is a weight that never changes, and at small
//! batch sizes that per-call packing costs more than the arithmetic. Here
//! weights are packed at load into panels of [`NR`] columns (`k × NR`
//! contiguous, the last panel zero-padded), and a 12 × 32 register-blocked
//! micro-kernel streams them with rows of the activations broadcast straight
//! from memory. Bias is the accumulators' initial value; the activation runs
//! on each tile while it is still in L1.
//!
//! Work splits over rows in blocks of [`MC`] (each block reads every panel
//! once) and, when there are too few rows to keep both cores busy, over
//! column panels.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

/// Columns per panel: two 16-lane registers.
pub const NR: usize = 32;
/// Rows per micro-kernel call: 12 × 2 accumulators + 2 panel registers fit in 32.
const MR: usize = 12;
/// Rows per parallel task.
const MC: usize = 96;

/// A `[k, n]` weight in panel order.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    pub k: usize,
    pub n: usize,
    panels: Vec<f32>,
}

impl PackedWeights {
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        let count = n.div_ceil(NR);
        let mut panels = vec![0f32; count * k * NR];
        for p in 0..count {
            let cols = (n - p * NR).min(NR);
            for kk in 0..k {
                let dst = &mut panels[(p * k + kk) * NR..][..cols];
                dst.copy_from_slice(&w[kk * n + p * NR..][..cols]);
            }
        }
        PackedWeights { k, n, panels }
    }

    /// Back to row-major `[k, n]` (tests check the layout round-trips).
    #[cfg(test)]
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.k * self.n];
        for p in 0..self.n.div_ceil(NR) {
            let cols = (self.n - p * NR).min(NR);
            for kk in 0..self.k {
                w[kk * self.n + p * NR..][..cols].copy_from_slice(&self.panels[(p * self.k + kk) * NR..][..cols]);
            }
        }
        w
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.panels[p * self.k * NR..(p + 1) * self.k * NR]
    }
}

/// Whether this processor runs the packed path.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Output pointer shared by tasks that write disjoint tiles (here and in
/// the AMX kernel).
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: tasks write disjoint regions (distinct rows or distinct columns).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `out[m, n] = x[m, k] · w + bias`, then `epilogue` on each finished tile
/// (`rows` of `cols` values at row stride `n`). Requires [`available`].
pub fn matmul(
    x: &[f32],
    w: &PackedWeights,
    bias: Option<&[f32]>,
    m: usize,
    out: &mut [f32],
    epilogue: &(dyn Fn(&mut [f32]) + Sync),
) {
    assert!(available(), "packed matmul needs AVX-512");
    let (k, n) = (w.k, w.n);
    assert!(x.len() >= m * k && out.len() >= m * n && bias.is_none_or(|b| b.len() >= n));
    let panels = n.div_ceil(NR);
    let row_blocks = m.div_ceil(MC);
    let threads = rayon::current_num_threads();
    let dst = Out(out.as_mut_ptr());
    // Too few row blocks for the cores: give each task a share of the panels.
    let panel_groups = if row_blocks >= 2 * threads || m * n * k < (1 << 20) { 1 } else { threads.min(panels) };
    let task = |task: usize, panel_groups: usize| {
        let (block, group) = (task / panel_groups, task % panel_groups);
        let rows = block * MC..((block + 1) * MC).min(m);
        let per_group = panels.div_ceil(panel_groups);
        let panel_range = group * per_group..((group + 1) * per_group).min(panels);
        let dst = dst;
        for p in panel_range {
            let cols = (n - p * NR).min(NR);
            let mut r = rows.start;
            while r < rows.end {
                let mr = (rows.end - r).min(MR);
                // SAFETY: rows r..r+mr and columns p·NR..p·NR+cols lie inside
                // x (m×k), the panel (k×NR) and out (m×n); this task alone
                // writes them. AVX-512 is present (asserted above).
                unsafe {
                    let bias = bias.map(|b| b.as_ptr().add(p * NR));
                    kernel(
                        x.as_ptr().add(r * k),
                        k,
                        w.panel(p).as_ptr(),
                        k,
                        bias,
                        dst.0.add(r * n + p * NR),
                        n,
                        mr,
                        cols,
                    );
                    for row in 0..mr {
                        epilogue(std::slice::from_raw_parts_mut(dst.0.add((r + row) * n + p * NR), cols));
                    }
                }
                r += mr;
            }
        }
    };
    if row_blocks == 1 && panel_groups > 1 {
        // A few rows (a query): the weights' read is the work, split over
        // the awake team's members (see team.rs), which start at once where
        // rayon's sleeping workers would first be woken.
        let team = super::team::Team::global();
        let parts = team.chunks_for(panels);
        team.run(parts, &|part| task(part, parts));
    } else {
        (0..row_blocks * panel_groups).into_par_iter().for_each(|t| task(t, panel_groups));
    }
}

/// Dispatches a tile of `mr ≤ MR` rows to the kernel specialised for it.
///
/// # Safety
/// As for [`tile`]; AVX-512F must be available.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    a: *const f32,
    lda: usize,
    b: *const f32,
    k: usize,
    bias: Option<*const f32>,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    cols: usize,
) {
    macro_rules! rows {
        ($($n:literal)*) => {
            // SAFETY: forwarded from the caller.
            match mr { $($n => unsafe { tile::<$n>(a, lda, b, k, bias, c, ldc, cols) },)* _ => unreachable!("mr ≤ MR") }
        };
    }
    rows!(1 2 3 4 5 6 7 8 9 10 11 12)
}

/// One `R × NR` tile: `R` rows of `a` (row stride `lda`) times a `k × NR`
/// panel, plus bias, stored to `c` (row stride `ldc`, first `cols` columns).
///
/// # Safety
/// `a` must hold `R` rows of `k` values, `b` `k × NR` values, `bias` (if
/// any) `cols` values, `c` `R` rows of `cols` writable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    k: usize,
    bias: Option<*const f32>,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    let mask_lo: __mmask16 = if cols >= 16 { 0xffff } else { ((1u32 << cols) - 1) as __mmask16 };
    let mask_hi: __mmask16 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        ((1u32 << (cols - 16)) - 1) as __mmask16
    } else {
        0
    };
    let (init_lo, init_hi) = match bias {
        // SAFETY: bias holds `cols` values; masked loads read no more.
        Some(bias) => unsafe { (_mm512_maskz_loadu_ps(mask_lo, bias), _mm512_maskz_loadu_ps(mask_hi, bias.add(16))) },
        None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
    };
    let mut acc = [[init_lo, init_hi]; R];
    for kk in 0..k {
        // SAFETY: kk < k; the panel row is NR = 32 values.
        let (b_lo, b_hi) = unsafe { (_mm512_loadu_ps(b.add(kk * NR)), _mm512_loadu_ps(b.add(kk * NR + 16))) };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r < R of `a` has k values.
            let x = unsafe { _mm512_set1_ps(*a.add(r * lda + kk)) };
            acc[0] = _mm512_fmadd_ps(x, b_lo, acc[0]);
            acc[1] = _mm512_fmadd_ps(x, b_hi, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row r of `c` has `cols` writable values; stores are masked.
        unsafe {
            _mm512_mask_storeu_ps(c.add(r * ldc), mask_lo, acc[0]);
            _mm512_mask_storeu_ps(c.add(r * ldc + 16), mask_hi, acc[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const R: usize>(
    _: *const f32,
    _: usize,
    _: *const f32,
    _: usize,
    _: Option<*const f32>,
    _: *mut f32,
    _: usize,
    _: usize,
) {
    unreachable!("the packed path runs only where `available` is true")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_matmul_matches_naive_on_odd_shapes() {
        if !available() {
            return;
        }
        for (m, k, n) in [(1, 1, 1), (13, 7, 33), (12, 64, 32), (100, 384, 70), (200, 5, 1)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let w: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let packed = PackedWeights::pack(&w, k, n);
            assert_eq!(packed.unpack(), w);
            let mut out = vec![f32::NAN; m * n];
            matmul(&x, &packed, Some(&bias), m, &mut out, &|_| {});
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = bias[j] + (0..k).map(|kk| x[i * k + kk] * w[kk * n + j]).sum::<f32>();
                    assert!(
                        (out[i * n + j] - want).abs() < 1e-4,
                        "({m},{k},{n}) at ({i},{j}): {} vs {want}",
                        out[i * n + j]
                    );
                }
            }
        }
    }
}
