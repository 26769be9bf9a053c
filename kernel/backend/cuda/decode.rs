//! The decoder's ops on a GPU: block-quantized products and embeddings,
//! rotary embeddings, SwiGLU, the fused residual norm, the gated shared
//! expert and mixture-of-experts routing and products (the paged KV cache
//! is `paged_kv`). Launch contracts are in `kernels-cu/{quant_matvec,
//! dequantize, decoder, moe}.cu`; shapes were checked by `Device`.
//! `sampling.cu` has no launcher yet: the engine samples on the host.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::{
    CudaDevice, CudaError,
    kernels::KernelId,
    ops::{launch, u32_of},
};
use crate::backend::{Precision, RopeStyle, quant::GgmlType};

/// Activation rows a product reads per weight block (the matvec kernels' group).
const MATVEC_GROUP: usize = 8;
/// Output columns per matvec block (its four warps).
const MATVEC_COLUMNS: u32 = 4;
/// Above this many rows a product expands the weights to tiles for cuBLAS
/// instead of reading blocks per eight rows. Not yet measured on a GPU:
/// llama.cpp switches near here.
const PREFILL_ROWS: usize = 32;
const ELEMENTWISE_BLOCK: u32 = 256;
const MAX_STRIDE_BLOCKS: u32 = 4_096;
const MAX_GRID_YZ: usize = 65_535;
/// Query heads per KV head that one paged-attention block serves.
pub const MAX_GROUP: usize = 8;
/// Experts the router and the plan kernels hold.
pub const MAX_EXPERTS: usize = 256;

fn stride_grid(n: usize) -> LaunchConfig {
    let blocks = (n.div_ceil(ELEMENTWISE_BLOCK as usize) as u32).clamp(1, MAX_STRIDE_BLOCKS);
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ELEMENTWISE_BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn unsupported(op: &'static str, detail: String) -> CudaError {
    CudaError::Unsupported { op, detail }
}

fn matvec_kernel(dtype: GgmlType) -> KernelId {
    match dtype {
        GgmlType::F32 => KernelId::MatvecF32,
        GgmlType::F16 => KernelId::MatvecF16,
        GgmlType::Bf16 => KernelId::MatvecBf16,
        GgmlType::Q4_0 => KernelId::MatvecQ4_0,
        GgmlType::Q4_1 => KernelId::MatvecQ4_1,
        GgmlType::Q8_0 => KernelId::MatvecQ8_0,
        GgmlType::Q4K => KernelId::MatvecQ4K,
        GgmlType::Q5K => KernelId::MatvecQ5K,
        GgmlType::Q6K => KernelId::MatvecQ6K,
    }
}

fn dequantize_kernel(dtype: GgmlType) -> KernelId {
    match dtype {
        GgmlType::F32 => KernelId::DequantizeF32,
        GgmlType::F16 => KernelId::DequantizeF16,
        GgmlType::Bf16 => KernelId::DequantizeBf16,
        GgmlType::Q4_0 => KernelId::DequantizeQ4_0,
        GgmlType::Q4_1 => KernelId::DequantizeQ4_1,
        GgmlType::Q8_0 => KernelId::DequantizeQ8_0,
        GgmlType::Q4K => KernelId::DequantizeQ4K,
        GgmlType::Q5K => KernelId::DequantizeQ5K,
        GgmlType::Q6K => KernelId::DequantizeQ6K,
    }
}

/// A weight stack's matrices for a grouped product: `table` holds
/// (expert, first row, rows ≤ 8) per group, `count` of them, and matrices
/// lie `expert_bytes` apart.
pub(crate) struct Groups<'a> {
    pub table: &'a CudaSlice<u32>,
    pub count: usize,
    pub expert_bytes: usize,
}

/// Activations quantized for one weight type's block products.
struct QuantizedRows {
    q: Option<CudaSlice<i8>>,
    d: Option<CudaSlice<f32>>,
    /// Q4_1's per-block sums (f32) or the K-quants' 16-value sums (i16).
    s: Option<CudaSlice<f32>>,
    bsums: Option<CudaSlice<i16>>,
}

impl CudaDevice {
    fn address<T>(&self, buffer: &CudaSlice<T>) -> u64 {
        buffer.device_ptr(&self.stream).0
    }

    /// `rows` rows of `k` as a weight type's products read them.
    fn quantize_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        dtype: GgmlType,
    ) -> Result<QuantizedRows, CudaError> {
        let none = QuantizedRows { q: None, d: None, s: None, bsums: None };
        let per = match dtype {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => return Ok(none),
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        };
        let blocks = rows * k / per;
        let mut q = self.alloc::<i8>(rows * k)?;
        let mut d = self.alloc::<f32>(blocks)?;
        let count = u32_of("quantize_rows", blocks)?;
        let cfg =
            LaunchConfig { grid_dim: (count.div_ceil(8).max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        if per == 32 {
            let mut s = self.alloc::<f32>(blocks)?;
            launch!(self, KernelId::QuantizeQ8_1, cfg, x, &mut q, &mut d, &mut s, &count)?;
            Ok(QuantizedRows { q: Some(q), d: Some(d), s: Some(s), bsums: None })
        } else {
            let mut bsums = self.alloc::<i16>(blocks * 16)?;
            launch!(self, KernelId::QuantizeQ8K, cfg, x, &mut q, &mut d, &mut bsums, &count)?;
            Ok(QuantizedRows { q: Some(q), d: Some(d), s: None, bsums: Some(bsums) })
        }
    }

    /// `x[rows, k] · wᵀ` for `n` weight rows of `dtype` (or, with `groups`,
    /// each group's rows against its own matrix of a stack), each result row
    /// scaled by `row_scale` when given.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matvec(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaSlice<u8>,
        dtype: GgmlType,
        (k, n): (usize, usize),
        groups: Option<&Groups<'_>>,
        row_scale: Option<&CudaSlice<f32>>,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let op = "matvec";
        let mut out = self.alloc::<f32>(rows * n)?;
        if rows == 0 || n == 0 {
            return Ok(out);
        }
        let grid_y = groups.map_or(rows.div_ceil(MATVEC_GROUP), |g| g.count);
        if grid_y > MAX_GRID_YZ {
            return Err(unsupported(op, format!("{grid_y} row groups exceed a grid's {MAX_GRID_YZ}")));
        }
        let a = self.quantize_rows(x, rows, k, dtype)?;
        let aux = match (&a.s, &a.bsums) {
            (Some(s), _) => self.address(s),
            (_, Some(b)) => self.address(b),
            _ => 0,
        };
        let (xq, xd) = (self.optional(a.q.as_ref()), self.optional(a.d.as_ref()));
        let table = groups.map_or(0, |g| self.address(g.table));
        let expert_bytes = groups.map_or(0, |g| g.expert_bytes as u64);
        let scale = self.optional(row_scale);
        let (nu, ku, rows_u) = (u32_of(op, n)?, u32_of(op, k)?, u32_of(op, rows)?);
        let cfg = LaunchConfig {
            grid_dim: (nu.div_ceil(MATVEC_COLUMNS), grid_y as u32, 1),
            block_dim: (MATVEC_COLUMNS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            matvec_kernel(dtype),
            cfg,
            w,
            &expert_bytes,
            &table,
            x,
            &xq,
            &xd,
            &aux,
            &scale,
            &mut out,
            &nu,
            &ku,
            &rows_u
        )?;
        Ok(out)
    }

    /// `x[m, k] · wᵀ` for a ggml weight of `n` rows. Decoding (≤ 32 rows)
    /// reads blocks per eight rows, as does a prompt in `Precision::F32`
    /// (llama.cpp's arithmetic); a prompt in bf16 expands block-quantized
    /// weights to bf16 tiles for the tensor cores; float weights stay f32
    /// (cuBLAS over the weights as f32 rows), as on the CPU.
    pub(crate) fn linear_quantized(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &CudaSlice<u8>,
        (dtype, prefill): (GgmlType, Precision),
        (k, n): (usize, usize),
    ) -> Result<CudaSlice<f32>, CudaError> {
        if m <= PREFILL_ROWS || (dtype.is_quantized() && prefill == Precision::F32) {
            return self.matvec(x, m, w, dtype, (k, n), None, None);
        }
        let dim = |d: usize| {
            i32::try_from(d).map_err(|_| unsupported("linear_quantized", format!("{d} exceeds cuBLAS's 32-bit sizes")))
        };
        let dims = (dim(m)?, dim(k)?, dim(n)?);
        let mut out = self.alloc::<f32>(m * n)?;
        if dtype.is_quantized() {
            let tiles = self.dequantize_bf16(w, dtype, (k, n))?;
            let x16 = self.convert(x, m * k, KernelId::F32ToBf16)?;
            self.gemm_bf16_rows(&tiles, &x16, &mut out, dims)?;
        } else {
            let mut rows = self.alloc::<f32>(n * k)?;
            self.dequantize_into(w, dtype, None, (n, k), false, &mut rows)?;
            self.gemm_f32_rows(&rows, x, &mut out, dims)?;
        }
        Ok(out)
    }

    /// Rows `ids` (or the first `count` rows) of a block-quantized matrix
    /// expanded into `out`: f32 values, or bf16 bits when `bf16`.
    #[allow(clippy::too_many_arguments)]
    fn dequantize_into<T: cudarc::driver::DeviceRepr>(
        &self,
        w: &CudaSlice<u8>,
        dtype: GgmlType,
        ids: Option<&CudaSlice<u32>>,
        (count, k): (usize, usize),
        bf16: bool,
        out: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        if count == 0 || k == 0 {
            return Ok(());
        }
        let (count_u, ku, flag) = (u32_of("dequantize", count)?, u32_of("dequantize", k)?, bf16 as u32);
        let ids = self.optional(ids);
        // Blocks stride over the rows past the grid's 65,535 (a large vocabulary).
        let rows = count_u.min(MAX_GRID_YZ as u32);
        let cfg = LaunchConfig { grid_dim: (ku.div_ceil(256), rows, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, dequantize_kernel(dtype), cfg, w, &ids, out, &flag, &count_u, &ku)
    }

    /// A whole block-quantized matrix (`n` rows of `k`) as bf16 tiles.
    fn dequantize_bf16(
        &self,
        w: &CudaSlice<u8>,
        dtype: GgmlType,
        (k, n): (usize, usize),
    ) -> Result<CudaSlice<u16>, CudaError> {
        let mut out = self.alloc::<u16>(n * k)?;
        self.dequantize_into(w, dtype, None, (n, k), true, &mut out)?;
        Ok(out)
    }

    /// Rows `ids` of a block-quantized table as f32 (token embeddings).
    pub(crate) fn embed_quantized(
        &self,
        table: &CudaSlice<u8>,
        dtype: GgmlType,
        k: usize,
        ids: &[u32],
    ) -> Result<CudaSlice<f32>, CudaError> {
        let mut out = self.alloc::<f32>(ids.len() * k)?;
        if !ids.is_empty() {
            let uploaded = self.upload(ids)?;
            self.dequantize_into(table, dtype, Some(&uploaded), (ids.len(), k), false, &mut out)?;
        }
        Ok(out)
    }

    /// Rotary embeddings in place; row `t` of `x` is at `positions[t]`.
    pub(crate) fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &[u32],
        (heads, head_dim): (usize, usize),
        base: f32,
        style: RopeStyle,
    ) -> Result<(), CudaError> {
        let pairs = positions.len() * heads * head_dim / 2;
        if pairs == 0 {
            return Ok(());
        }
        let uploaded = self.upload(positions)?;
        let op = "rope";
        let (rows, h, d) = (u32_of(op, positions.len())?, u32_of(op, heads)?, u32_of(op, head_dim)?);
        // The CPU's step, computed the same way so the angles agree to the bit.
        let step = base.powf(-2.0 / head_dim as f32);
        let neox = u32::from(style == RopeStyle::Neox);
        launch!(self, KernelId::Rope, stride_grid(pairs), x, &uploaded, &rows, &h, &d, &step, &neox)
    }

    /// `gate ← silu(gate) · up` over `n` values.
    pub(crate) fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>, n: usize) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let count = u32_of("silu_mul", n)?;
        launch!(self, KernelId::SiluMul, stride_grid(n), gate, up, &count)
    }

    /// `x[r] += sigmoid(gate[r]) · y[r]`.
    pub(crate) fn add_gated(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        rows: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        if rows * width == 0 {
            return Ok(());
        }
        let (r, w) = (u32_of("add_gated", rows)?, u32_of("add_gated", width)?);
        launch!(self, KernelId::AddGated, stride_grid(rows * width), x, y, gate, &r, &w)
    }

    /// `h += delta`, then the RMSNorm of `h`.
    pub(crate) fn add_rms_norm(
        &self,
        h: &mut CudaSlice<f32>,
        delta: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        (rows, width): (usize, usize),
        eps: f32,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let mut out = self.alloc::<f32>(rows * width)?;
        if rows > 0 {
            let (r, w) = (u32_of("add_rms_norm", rows)?, u32_of("add_rms_norm", width)?);
            let cfg = LaunchConfig {
                grid_dim: (r.min(MAX_STRIDE_BLOCKS), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, KernelId::AddRmsNorm, cfg, h, delta, gamma, &mut out, &r, &w, &eps)?;
        }
        Ok(out)
    }
}

/// Byte buffers end to end in a new buffer, on the first one's stream (a
/// fused projection's stacked matrices).
pub(crate) fn concat_bytes(parts: &[&CudaSlice<u8>]) -> Result<CudaSlice<u8>, CudaError> {
    let first = parts.first().ok_or_else(|| unsupported("concat_bytes", "no buffers".into()))?;
    let stream = first.stream().clone();
    let total = parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = stream.alloc_zeros::<u8>(total.max(1)).map_err(CudaError::driver("cuMemAllocAsync"))?;
    let mut at = 0;
    for part in parts {
        stream
            .memcpy_dtod(*part, &mut out.slice_mut(at..at + part.len()))
            .map_err(CudaError::driver("cuMemcpyDtoDAsync"))?;
        at += part.len();
    }
    Ok(out)
}

/// A stack of experts' SwiGLU weights on the GPU, as `StackedExperts`
/// holds them: expert e is rows e·ffn.. of gate and up, e·hidden.. of down.
pub(crate) struct ExpertWeights<'a> {
    pub dtype: GgmlType,
    pub count: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub gate: &'a CudaSlice<u8>,
    pub up: &'a CudaSlice<u8>,
    pub down: &'a CudaSlice<u8>,
}

impl CudaDevice {
    /// Each of `tokens` rows of router logits to its `used` best experts:
    /// (experts, weights), `used` per token, on the device.
    pub(crate) fn moe_route(
        &self,
        logits: &CudaSlice<f32>,
        (tokens, count, used): (usize, usize, usize),
        normalize: bool,
    ) -> Result<(CudaSlice<u32>, CudaSlice<f32>), CudaError> {
        if count > MAX_EXPERTS {
            return Err(unsupported("moe_route", format!("{count} experts; the router kernel holds {MAX_EXPERTS}")));
        }
        let mut experts = self.alloc::<u32>(tokens * used)?;
        let mut weights = self.alloc::<f32>(tokens * used)?;
        if tokens > 0 {
            let op = "moe_route";
            let (t, c, u, n) = (u32_of(op, tokens)?, u32_of(op, count)?, u32_of(op, used)?, normalize as u32);
            let cfg = LaunchConfig { grid_dim: (t.div_ceil(4), 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            launch!(self, KernelId::MoeRoute, cfg, logits, &mut experts, &mut weights, &t, &c, &u, &n)?;
        }
        Ok((experts, weights))
    }

    /// `Σ weight · down_e(silu(gate_e · x) ⊙ up_e · x)` over each token's
    /// routed experts, without a host sync: the pairs are sorted by expert
    /// on the device, each group of up to eight of an expert's rows shares
    /// one read of its weights, the down product applies the routing weight,
    /// and the rows are summed back in token order.
    pub(crate) fn experts_swiglu(
        &self,
        x: &CudaSlice<f32>,
        tokens: usize,
        (experts, weights, used): (&CudaSlice<u32>, &CudaSlice<f32>, usize),
        w: &ExpertWeights<'_>,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let op = "experts_swiglu";
        let pairs = tokens * used;
        let mut out = self.alloc::<f32>(tokens * w.hidden)?;
        if pairs == 0 {
            return Ok(out);
        }
        if w.count > MAX_EXPERTS {
            return Err(unsupported(op, format!("{} experts; the plan kernel holds {MAX_EXPERTS}", w.count)));
        }
        let max_groups = pairs.div_ceil(MATVEC_GROUP) + w.count.min(pairs);
        let mut sorted = self.alloc::<u32>(pairs)?;
        let mut position = self.alloc::<u32>(pairs)?;
        let mut sorted_token = self.alloc::<u32>(pairs)?;
        let mut sorted_weight = self.alloc::<f32>(pairs)?;
        let mut table = self.alloc::<u32>(max_groups * 3)?;
        let (p, c, u, g) = (u32_of(op, pairs)?, u32_of(op, w.count)?, u32_of(op, used)?, u32_of(op, max_groups)?);
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(
            self,
            KernelId::MoePlan,
            one,
            experts,
            weights,
            &p,
            &c,
            &u,
            &mut sorted,
            &mut position,
            &mut sorted_token,
            &mut sorted_weight,
            &mut table,
            &g
        )?;
        // Each pair's token row, in the sorted order.
        let mut rows = self.alloc::<f32>(pairs * w.hidden)?;
        let hidden = u32_of(op, w.hidden)?;
        let gather = LaunchConfig { grid_dim: (p.min(65_535), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, KernelId::GatherRows, gather, x, &sorted_token, &mut rows, &p, &hidden)?;
        let groups = |expert_rows: usize, k: usize| Groups {
            table: &table,
            count: max_groups,
            expert_bytes: expert_rows * w.dtype.row_bytes(k),
        };
        let up_groups = groups(w.ffn, w.hidden);
        let mut gate = self.matvec(&rows, pairs, w.gate, w.dtype, (w.hidden, w.ffn), Some(&up_groups), None)?;
        let up = self.matvec(&rows, pairs, w.up, w.dtype, (w.hidden, w.ffn), Some(&up_groups), None)?;
        self.silu_mul(&mut gate, &up, pairs * w.ffn)?;
        let down_groups = groups(w.hidden, w.ffn);
        let down =
            self.matvec(&gate, pairs, w.down, w.dtype, (w.ffn, w.hidden), Some(&down_groups), Some(&sorted_weight))?;
        let (t, accumulate) = (u32_of(op, tokens)?, 0u32);
        launch!(
            self,
            KernelId::MoeCombine,
            stride_grid(tokens * w.hidden),
            &down,
            &position,
            &mut out,
            &t,
            &u,
            &hidden,
            &accumulate
        )?;
        Ok(out)
    }
}
