//! The backend's ops on a GPU: kernel launches and cuBLAS calls over
//! [`Buffer`]s. Shapes are checked by `Device` before these run; what is
//! checked here is what only the GPU path needs (a head size with a kernel,
//! sizes that fit a kernel's 32-bit indices).

use cudarc::{
    cublas::{Gemm, GemmConfig, sys as blas},
    driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg},
};

use super::{Buffer, CudaDevice, CudaError, kernels::KernelId};
use crate::backend::{Activation, AttentionShape, SeqLayout};

/// Threads per block of the row-wise kernels (their launch contracts).
const ROW_BLOCK: u32 = 256;
/// Attention's block (its launch contract: 128 / SPLIT query rows).
const ATTENTION_BLOCK: u32 = 128;
/// The most blocks a grid may have along y or z.
const MAX_GRID_YZ: u32 = 65_535;
/// Grid-stride kernels need no more blocks than this to fill a GPU.
const MAX_STRIDE_BLOCKS: u32 = 4_096;

/// Launches `$id` with `$cfg` and the arguments in order (each a reference
/// to a `CudaSlice` or a plain value).
macro_rules! launch {
    ($gpu:expr, $id:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let id: KernelId = $id;
        let mut builder = $gpu.stream.launch_builder($gpu.function(id));
        $( builder.arg($arg); )*
        // SAFETY: each kernel's arguments follow its launch contract in
        // kernels-cu (types, order, sizes), which `Device` checked.
        unsafe { builder.launch($cfg) }.map(|_| ()).map_err(|e| CudaError::Driver { call: id.entry(), detail: e.to_string() })
    }};
}

pub(crate) use launch;

fn grid(blocks: u32, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

fn stride_grid(n: usize) -> LaunchConfig {
    grid((n.div_ceil(ROW_BLOCK as usize) as u32).min(MAX_STRIDE_BLOCKS), ROW_BLOCK)
}

/// A count that a kernel takes as a grid's y or z dimension.
fn grid_yz(op: &'static str, n: usize) -> Result<u32, CudaError> {
    match u32::try_from(n) {
        Ok(n) if n <= MAX_GRID_YZ => Ok(n),
        _ => Err(CudaError::Unsupported {
            op,
            detail: format!("{n} exceeds the {MAX_GRID_YZ} blocks a grid dimension holds"),
        }),
    }
}

/// A size as a kernel's `u32`.
pub(super) fn u32_of(op: &'static str, n: usize) -> Result<u32, CudaError> {
    u32::try_from(n).map_err(|_| CudaError::Unsupported { op, detail: format!("{n} elements exceed 32-bit indexing") })
}

impl CudaDevice {
    /// A kernel's optional buffer argument: its device address, or 0 for
    /// none. Work on the one stream runs in order and buffers are freed in
    /// stream order, so the address stays valid for the launch that takes it.
    pub(crate) fn optional<T>(&self, buffer: Option<&CudaSlice<T>>) -> u64 {
        buffer.map_or(0, |b| b.device_ptr(&self.stream).0)
    }

    /// Host values to a new buffer (an empty one is a buffer of one
    /// element that nothing reads: the driver allocates no zero bytes).
    pub(crate) fn upload<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>, CudaError> {
        if data.is_empty() {
            return self.alloc(0);
        }
        self.stream.clone_htod(data).map_err(CudaError::driver("cuMemcpyHtoDAsync"))
    }

    pub(crate) fn download<T: cudarc::driver::DeviceRepr>(&self, data: &CudaSlice<T>) -> Result<Vec<T>, CudaError> {
        super::download(data)
    }

    /// An uninitialised buffer: every kernel that fills one writes all of
    /// it. With `AITL_CUDA_POISON` set (the parity tests) it is filled with
    /// 0xff bytes first, NaN as f32, so an element a kernel skips shows.
    pub(crate) fn alloc<T: cudarc::driver::DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>, CudaError> {
        // SAFETY: the callers' kernels write all n elements before any read.
        let buffer = unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(CudaError::driver("cuMemAllocAsync"))?;
        if self.poison {
            let (ptr, _sync) = buffer.device_ptr(&self.stream);
            // SAFETY: ptr is the buffer just allocated, of n.max(1) elements.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    ptr,
                    0xff,
                    n.max(1) * std::mem::size_of::<T>(),
                    self.stream.cu_stream(),
                )
            }
            .map_err(CudaError::driver("cuMemsetD8Async"))?;
        }
        Ok(buffer)
    }

    /// Rows `range` of a `[rows, width]` buffer, copied.
    pub(crate) fn slice_rows(
        &self,
        x: &CudaSlice<f32>,
        width: usize,
        range: std::ops::Range<usize>,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let view = x.slice(range.start * width..range.end * width);
        if view.len() == 0 {
            return self.alloc(0);
        }
        self.stream.clone_dtod(&view).map_err(CudaError::driver("cuMemcpyDtoDAsync"))
    }

    /// Columns `start..start + out_width` of a `[rows, width]` buffer.
    pub(crate) fn copy_columns(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        start: usize,
        out_width: usize,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let mut out = self.alloc::<f32>(rows * out_width)?;
        if rows * out_width > 0 {
            let cfg = LaunchConfig {
                grid_dim: ((out_width as u32).div_ceil(ROW_BLOCK), u32_of("copy_columns", rows)?.min(MAX_GRID_YZ), 1),
                block_dim: (ROW_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let op = "copy_columns";
            let (rows, width, start, out_width) =
                (u32_of(op, rows)?, u32_of(op, width)?, u32_of(op, start)?, u32_of(op, out_width)?);
            launch!(self, KernelId::CopyColumns, cfg, x, &mut out, &rows, &width, &start, &out_width)?;
        }
        Ok(out)
    }

    /// `out[i] = x[rows[i]]`.
    pub(crate) fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: &[u32],
        width: usize,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let mut out = self.alloc::<f32>(rows.len() * width)?;
        if !rows.is_empty() && width > 0 {
            let indices = self.upload(rows)?;
            let (count, width) = (u32_of("gather_rows", rows.len())?, u32_of("gather_rows", width)?);
            launch!(self, KernelId::GatherRows, grid(count, ROW_BLOCK), x, &indices, &mut out, &count, &width)?;
        }
        Ok(out)
    }

    /// `x[m, k] · w[k, n] + bias`, then `act`. cuBLAS is column-major, so it
    /// computes the transposed product `wᵀ · xᵀ = (x · w)ᵀ`, which is the
    /// row-major result as stored.
    pub(crate) fn linear(
        &self,
        x: &CudaSlice<f32>,
        (m, k, n): (usize, usize, usize),
        w: &Buffer,
        bias: Option<&CudaSlice<f32>>,
        act: Activation,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let mut out = self.alloc::<f32>(m * n)?;
        if m == 0 || n == 0 {
            return Ok(out);
        }
        let dim = |d: usize| {
            i32::try_from(d).map_err(|_| CudaError::Unsupported {
                op: "linear",
                detail: format!("{d} exceeds cuBLAS's 32-bit sizes"),
            })
        };
        let (mi, ki, ni) = (dim(m)?, dim(k)?, dim(n)?);
        match w {
            Buffer::F32(w) => self.sgemm(w, false, x, &mut out, (mi, ki, ni))?,
            Buffer::Bf16(w) => {
                let x16 = self.convert(x, m * k, KernelId::F32ToBf16)?;
                self.gemm_bf16(w, &x16, &mut out, (mi, ki, ni))?;
            }
        }
        self.bias_act(&mut out, bias, m, n, act)?;
        Ok(out)
    }

    /// `out = x · wᵀ` in f32 for a weight stored as `n` rows of `k` (a float
    /// ggml matrix).
    pub(crate) fn gemm_f32_rows(
        &self,
        w: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        dims: (i32, i32, i32),
    ) -> Result<(), CudaError> {
        self.sgemm(w, true, x, out, dims)
    }

    /// `out[m, n] = x[m, k] · w` in f32, `w` stored `[k, n]`, or `[n, k]`
    /// (transposed) when `w_rows`; column-major as in [`CudaDevice::linear`].
    fn sgemm(
        &self,
        w: &CudaSlice<f32>,
        w_rows: bool,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        (m, k, n): (i32, i32, i32),
    ) -> Result<(), CudaError> {
        let cfg = GemmConfig {
            transa: if w_rows { blas::cublasOperation_t::CUBLAS_OP_T } else { blas::cublasOperation_t::CUBLAS_OP_N },
            transb: blas::cublasOperation_t::CUBLAS_OP_N,
            m: n,
            n: m,
            k,
            alpha: 1.0f32,
            lda: if w_rows { k } else { n },
            ldb: k,
            beta: 0.0f32,
            ldc: n,
        };
        let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: w is [k, n] (or [n, k] with w_rows), x is [m, k] and out is
        // [m, n], as the leading dimensions say.
        unsafe { blas.gemm(cfg, w, x, out) }.map_err(CudaError::blas("cublasSgemm"))
    }

    /// f32 values as bf16 (`F32ToBf16`) or f16 (`F32ToF16`) bits.
    pub(crate) fn convert(&self, x: &CudaSlice<f32>, n: usize, id: KernelId) -> Result<CudaSlice<u16>, CudaError> {
        let mut out = self.alloc::<u16>(n)?;
        let count = u32_of("convert", n)?;
        launch!(self, id, stride_grid(n), x, &mut out, &count)?;
        Ok(out)
    }

    /// bf16 operands, f32 sums and result (cublasGemmEx, column-major as in
    /// [`CudaDevice::linear`]), for a weight stored `[k, n]`.
    fn gemm_bf16(
        &self,
        w: &CudaSlice<u16>,
        x: &CudaSlice<u16>,
        out: &mut CudaSlice<f32>,
        (m, k, n): (i32, i32, i32),
    ) -> Result<(), CudaError> {
        self.gemm_bf16_with(w, false, x, out, (m, k, n))
    }

    /// As [`CudaDevice::gemm_bf16`] for a weight stored as `n` rows of `k`
    /// (a dequantized ggml matrix): `out = x · wᵀ`.
    pub(crate) fn gemm_bf16_rows(
        &self,
        w: &CudaSlice<u16>,
        x: &CudaSlice<u16>,
        out: &mut CudaSlice<f32>,
        (m, k, n): (i32, i32, i32),
    ) -> Result<(), CudaError> {
        self.gemm_bf16_with(w, true, x, out, (m, k, n))
    }

    /// `w_rows`: the weight is `[n, k]` row-major, which column-major cuBLAS
    /// reads as `[k, n]` and transposes; otherwise `[k, n]` row-major, read
    /// as `[n, k]` column-major as it stands.
    fn gemm_bf16_with(
        &self,
        w: &CudaSlice<u16>,
        w_rows: bool,
        x: &CudaSlice<u16>,
        out: &mut CudaSlice<f32>,
        (m, k, n): (i32, i32, i32),
    ) -> Result<(), CudaError> {
        use cudarc::cublas::result::gemm_ex;
        let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (w, _w) = w.device_ptr(&self.stream);
        let (x, _x) = x.device_ptr(&self.stream);
        let (c, _c) = cudarc::driver::DevicePtrMut::device_ptr_mut(out, &self.stream);
        // SAFETY: the pointers are live buffers of [k, n], [m, k] and [m, n]
        // elements of the types named; alpha and beta are host f32 scalars
        // (cuBLAS's default pointer mode) matching the f32 compute type.
        unsafe {
            gemm_ex(
                *blas.handle(),
                if w_rows { blas::cublasOperation_t::CUBLAS_OP_T } else { blas::cublasOperation_t::CUBLAS_OP_N },
                blas::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                w as *const _,
                blas::cudaDataType_t::CUDA_R_16BF,
                if w_rows { k } else { n },
                x as *const _,
                blas::cudaDataType_t::CUDA_R_16BF,
                k,
                (&beta as *const f32).cast(),
                c as *mut _,
                blas::cudaDataType_t::CUDA_R_32F,
                n,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(CudaError::blas("cublasGemmEx"))
    }

    /// `x[r, c] = act(x[r, c] + bias[c])`; nothing to do without either.
    pub(crate) fn bias_act(
        &self,
        x: &mut CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        rows: usize,
        cols: usize,
        act: Activation,
    ) -> Result<(), CudaError> {
        if (bias.is_none() && act == Activation::None) || rows * cols == 0 {
            return Ok(());
        }
        let code: u32 = match act {
            Activation::None => 0,
            Activation::Gelu => 1,
            Activation::Tanh => 2,
        };
        let (r, c) = (u32_of("bias_act", rows)?, u32_of("bias_act", cols)?);
        let bias = self.optional(bias);
        launch!(self, KernelId::BiasAct, stride_grid(rows * cols), x, &bias, &r, &c, &code)
    }

    /// `x += y` over `n` values.
    pub(crate) fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let count = u32_of("add", n)?;
        launch!(self, KernelId::Add, stride_grid(n), x, y, &count)
    }

    /// In place: `LayerNorm(x + residual)` per row.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_layer_norm(
        &self,
        x: &mut CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let (r, w) = (u32_of("add_layer_norm", rows)?, u32_of("add_layer_norm", width)?);
        let residual = self.optional(residual);
        launch!(self, KernelId::AddLayerNorm, grid(r, ROW_BLOCK), x, &residual, gamma, beta, &r, &w, &eps)
    }

    /// `x / rms(x) · gamma` per row.
    pub(crate) fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let mut out = self.alloc::<f32>(rows * width)?;
        if rows > 0 {
            let (r, w) = (u32_of("rms_norm", rows)?, u32_of("rms_norm", width)?);
            launch!(self, KernelId::RmsNorm, grid(r, ROW_BLOCK), x, gamma, &mut out, &r, &w, &eps)?;
        }
        Ok(out)
    }

    /// Word rows plus up to two more tables' rows (BERT's position and token
    /// type), then LayerNorm, in one pass.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn embed_layer_norm(
        &self,
        table: &CudaSlice<f32>,
        ids: &[u32],
        extra: &[(&CudaSlice<f32>, &[u32])],
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        width: usize,
        eps: f32,
    ) -> Result<CudaSlice<f32>, CudaError> {
        if extra.len() > 2 {
            return Err(CudaError::Unsupported {
                op: "embed_layer_norm",
                detail: format!("{} extra tables; the kernel adds at most 2", extra.len()),
            });
        }
        let mut out = self.alloc::<f32>(ids.len() * width)?;
        if ids.is_empty() {
            return Ok(out);
        }
        let (t, w) = (u32_of("embed_layer_norm", ids.len())?, u32_of("embed_layer_norm", width)?);
        let ids = self.upload(ids)?;
        let extra_ids = extra.iter().map(|(_, i)| self.upload(i)).collect::<Result<Vec<_>, _>>()?;
        let table_of = |i: usize| self.optional(extra.get(i).map(|(t, _)| *t));
        let ids_of = |i: usize| self.optional(extra_ids.get(i));
        let (ids1, table1, ids2, table2) = (ids_of(0), table_of(0), ids_of(1), table_of(1));
        launch!(
            self,
            KernelId::EmbedLayerNorm,
            grid(t, ROW_BLOCK),
            &ids,
            table,
            &ids1,
            &table1,
            &ids2,
            &table2,
            gamma,
            beta,
            &mut out,
            &t,
            &w,
            &eps
        )?;
        Ok(out)
    }

    /// Bidirectional attention within each sequence of a ragged batch.
    pub(crate) fn attention(
        &self,
        qkv: &CudaSlice<f32>,
        layout: &SeqLayout,
        shape: AttentionShape,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let kernel = KernelId::attention(shape.head_dim).ok_or_else(|| CudaError::Unsupported {
            op: "attention",
            detail: format!("no kernel for heads of {}; there are kernels for 16, 32, 64 and 128", shape.head_dim),
        })?;
        let tokens = layout.total_tokens();
        let mut out = self.alloc::<f32>(tokens * shape.heads * shape.head_dim)?;
        let max_len = (0..layout.len()).map(|s| layout.range(s).len()).max().unwrap_or(0);
        if tokens == 0 || max_len == 0 {
            return Ok(out);
        }
        let rows_per_block = ATTENTION_BLOCK / split(shape.head_dim);
        let seqs = grid_yz("attention", layout.len())?;
        let heads = grid_yz("attention", shape.heads)?;
        let cu_seqlens = self.upload(&offsets(layout)?)?;
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: ((max_len as u32).div_ceil(rows_per_block), heads, seqs),
            block_dim: (ATTENTION_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, kernel, cfg, qkv, &cu_seqlens, &mut out, &seqs, &heads, &scale)?;
        Ok(out)
    }

    /// Mean of each sequence's rows.
    pub(crate) fn mean_pool(
        &self,
        x: &CudaSlice<f32>,
        layout: &SeqLayout,
        width: usize,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let mut out = self.alloc::<f32>(layout.len() * width)?;
        if layout.is_empty() || width == 0 {
            return Ok(out);
        }
        let seqs = grid_yz("mean_pool", layout.len())?;
        let w = u32_of("mean_pool", width)?;
        let cu_seqlens = self.upload(&offsets(layout)?)?;
        let cfg = LaunchConfig {
            grid_dim: (w.div_ceil(ROW_BLOCK), seqs, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, KernelId::MeanPool, cfg, x, &cu_seqlens, &mut out, &seqs, &w)?;
        Ok(out)
    }

    /// Each row scaled to unit L2 norm, in place.
    pub(crate) fn l2_normalize(&self, x: &mut CudaSlice<f32>, rows: usize, width: usize) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let (r, w) = (u32_of("l2_normalize", rows)?, u32_of("l2_normalize", width)?);
        launch!(self, KernelId::L2Normalize, grid(r, ROW_BLOCK), x, &r, &w)
    }
}

/// Lanes that share one query row in the attention kernel (its contract).
fn split(head_dim: usize) -> u32 {
    match head_dim {
        0..=32 => 1,
        33..=64 => 2,
        _ => 4,
    }
}

/// A layout's sequence offsets as the kernels' `cu_seqlens`.
fn offsets(layout: &SeqLayout) -> Result<Vec<u32>, CudaError> {
    std::iter::once(0).chain((0..layout.len()).map(|s| layout.range(s).end)).map(|o| u32_of("cu_seqlens", o)).collect()
}
