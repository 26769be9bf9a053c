//! The compute layer: a small set of coarse, fused ops that model code is
//! written against, and a closed set of devices that implement them. The CPU
//! backend is the executable specification; a CUDA backend implements the
//! same ops over device-resident buffers and is tested against it.
//!
//! Activations are *ragged*: a batch of sequences is packed into one
//! `[total_tokens, hidden]` matrix with a [`SeqLayout`] giving each
//! sequence's offset, so no FLOP is spent on padding.

mod amx;
mod cpu;
mod cpu_decode;
pub mod cuda;
mod experts;
pub mod half;
pub mod kv_pages;
mod packed;
pub mod quant;
mod quant_x86;
mod select;
mod team;

pub use experts::{Routing, StackedExperts};
use quant::GgmlType;
pub use select::DeviceChoice;
pub use team::set_compute_threads;

use crate::error::{Error, Result};

/// A weight matrix kept in a ggml block format: `n` rows (outputs) of `k`
/// values (inputs), each row whole blocks. `linear_quantized` reads it in place.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    dtype: GgmlType,
    k: usize,
    n: usize,
    bytes: QuantBytes,
    /// How products over many rows (a prompt) run: F32 is llama.cpp's block
    /// arithmetic; Bf16 expands a block-quantized weight to bf16 tiles.
    prefill: Precision,
}

impl QuantMatrix {
    /// The same weight with products over many rows in `prefill` (which
    /// applies to block-quantized types only: float weights keep f32).
    pub fn with_prefill(self, prefill: Precision) -> Self {
        QuantMatrix { prefill, ..self }
    }

    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }

    /// (inputs, outputs)
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Stacks matrices of the same type and width into one (their outputs
    /// side by side): one pass computes Q, K and V, or gate and up.
    pub fn concat_outputs(parts: Vec<QuantMatrix>) -> Result<QuantMatrix> {
        let first = parts.first().ok_or_else(|| Error::Internal("concat_outputs: no matrices".into()))?;
        let (dtype, k) = (first.dtype, first.k);
        if parts.iter().any(|p| p.dtype != dtype || p.k != k) {
            return Err(Error::Internal("concat_outputs: matrices differ in type or width".into()));
        }
        let n = parts.iter().map(|p| p.n).sum();
        let prefill = first.prefill;
        let bytes = if parts.iter().all(|p| matches!(p.bytes, QuantBytes::Host(_))) {
            QuantBytes::Host(parts.iter().flat_map(|p| p.bytes.host().iter().copied()).collect())
        } else {
            let gpu: Vec<&cudarc::driver::CudaSlice<u8>> =
                parts.iter().map(|p| p.bytes.gpu()).collect::<Result<_>>()?;
            QuantBytes::Cuda(std::sync::Arc::new(cuda::concat_bytes(&gpu)?))
        };
        Ok(QuantMatrix { dtype, k, n, bytes, prefill })
    }

    /// Outputs `range` (whole rows, in place): one expert of a stacked set.
    fn rows(&self, range: std::ops::Range<usize>) -> QuantRows<'_> {
        let row = self.dtype.row_bytes(self.k);
        QuantRows {
            dtype: self.dtype,
            k: self.k,
            n: range.len(),
            bytes: &self.bytes.host()[range.start * row..range.end * row],
            prefill: self.prefill,
        }
    }

    fn all(&self) -> QuantRows<'_> {
        self.rows(0..self.n)
    }

    /// Row `j` expanded to f32 (embedding lookups read rows this way).
    pub fn dequantize_row(&self, j: usize) -> Vec<f32> {
        let row = self.dtype.row_bytes(self.k);
        let mut out = vec![0f32; self.k];
        quant::dequantize_row(self.dtype, &self.bytes.host()[j * row..(j + 1) * row], &mut out);
        out
    }
}

/// Where a [`QuantMatrix`]'s blocks live: host memory, or one buffer on a
/// GPU (shared by clones: weights are never written).
#[derive(Clone)]
enum QuantBytes {
    Host(Vec<u8>),
    Cuda(std::sync::Arc<cudarc::driver::CudaSlice<u8>>),
}

impl std::fmt::Debug for QuantBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantBytes::Host(b) => write!(f, "Host({} bytes)", b.len()),
            QuantBytes::Cuda(b) => write!(f, "Cuda({} bytes)", b.len()),
        }
    }
}

impl QuantBytes {
    fn host(&self) -> &[u8] {
        match self {
            QuantBytes::Host(bytes) => bytes,
            QuantBytes::Cuda(_) => panic!("a CUDA matrix reached a CPU op"),
        }
    }

    fn gpu(&self) -> Result<&cudarc::driver::CudaSlice<u8>> {
        match self {
            QuantBytes::Cuda(bytes) => Ok(bytes),
            QuantBytes::Host(_) => Err(Error::Internal("a host matrix reached a CUDA op".into())),
        }
    }
}

/// Borrowed consecutive rows of a [`QuantMatrix`], what the kernels read.
#[derive(Debug, Clone, Copy)]
struct QuantRows<'a> {
    dtype: GgmlType,
    k: usize,
    n: usize,
    bytes: &'a [u8],
    prefill: Precision,
}

/// A dense row-major f32 tensor on a device.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

#[derive(Debug, Clone)]
enum Storage {
    Cpu(Vec<f32>),
    /// A `[k, n]` weight, row-major and in the AVX-512 kernel's panel layout.
    CpuPacked {
        plain: Vec<f32>,
        packed: packed::PackedWeights,
    },
    /// A `[k, n]` weight, row-major and as AMX bf16 tiles (products round
    /// both operands to bf16).
    CpuAmx {
        plain: Vec<f32>,
        tiles: amx::AmxWeights,
    },
    /// On a GPU, queued on its device's stream.
    Cuda(cuda::Buffer),
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Size of the last dimension.
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Copies the values to the host (a device sync on GPU backends; call
    /// it once per request, never inside a forward pass).
    pub fn to_host(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::Cpu(data) | Storage::CpuPacked { plain: data, .. } | Storage::CpuAmx { plain: data, .. } => {
                Ok(data.clone())
            }
            Storage::Cuda(buffer) => {
                // An empty tensor's buffer holds one unread element.
                let mut values = buffer.to_host()?;
                values.truncate(self.shape.iter().product());
                Ok(values)
            }
        }
    }

    /// The host values of a CPU tensor. Model code runs on one device, so
    /// a GPU tensor here is a bug in the backend, not an input error.
    fn cpu(&self) -> &[f32] {
        match &self.storage {
            Storage::Cpu(data) | Storage::CpuPacked { plain: data, .. } | Storage::CpuAmx { plain: data, .. } => data,
            Storage::Cuda(_) => panic!("a CUDA tensor reached a CPU op"),
        }
    }

    /// The f32 buffer of a GPU activation (same invariant as [`Tensor::cpu`]).
    fn gpu(&self) -> Result<&cudarc::driver::CudaSlice<f32>> {
        match &self.storage {
            Storage::Cuda(cuda::Buffer::F32(data)) => Ok(data),
            Storage::Cuda(cuda::Buffer::Bf16(_)) => {
                Err(Error::Internal("a bf16 weight used where an f32 activation belongs".into()))
            }
            _ => Err(Error::Internal("a host tensor reached a CUDA op".into())),
        }
    }

    fn gpu_mut(&mut self) -> Result<&mut cudarc::driver::CudaSlice<f32>> {
        match &mut self.storage {
            Storage::Cuda(cuda::Buffer::F32(data)) => Ok(data),
            _ => Err(Error::Internal("a host tensor or a weight reached an in-place CUDA op".into())),
        }
    }

    fn cpu_mut(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::Cpu(data) => data,
            // In-place ops take activations; a weight changed here would
            // leave its packed copy stale.
            Storage::CpuPacked { .. } | Storage::CpuAmx { .. } => unreachable!("weights are never modified in place"),
            Storage::Cuda(_) => panic!("a CUDA tensor reached a CPU op"),
        }
    }
}

/// One sequence's rows of a step's attention: `rows` new positions after
/// `past` earlier ones, all already in `cache`.
pub struct CachedRows<'a> {
    pub cache: &'a KvLayer,
    pub past: usize,
    pub rows: usize,
}

/// One layer's keys and values for one sequence, grown as tokens are
/// appended. Owned by whoever schedules the sequence; a clone is a fork
/// (on a GPU it shares the pages instead of copying them).
#[derive(Debug, Clone)]
pub struct KvLayer {
    width: usize,
    storage: KvStorage,
}

#[derive(Debug, Clone)]
enum KvStorage {
    /// `[positions, width]` each, f32.
    Host { k: Vec<f32>, v: Vec<f32>, len: usize },
    /// Pages of a pool on the GPU, f16.
    Paged { pool: std::sync::Arc<cuda::paged_kv::KvPool>, table: kv_pages::PageTable },
}

impl KvLayer {
    pub fn new(width: usize) -> Self {
        KvLayer { width, storage: KvStorage::Host { k: Vec::new(), v: Vec::new(), len: 0 } }
    }

    /// An empty sequence in a GPU layer's page pool.
    pub fn paged(pool: &std::sync::Arc<cuda::paged_kv::KvPool>) -> Self {
        KvLayer { width: pool.width(), storage: KvStorage::Paged { pool: pool.clone(), table: pool.table() } }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        match &self.storage {
            KvStorage::Host { len, .. } => *len,
            KvStorage::Paged { table, .. } => table.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the rows of `k` and `v` (`[new, width]`).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        if k.cols() != self.width || v.shape != k.shape {
            return Err(Error::Internal("kv cache: rows do not fit".into()));
        }
        match &mut self.storage {
            KvStorage::Host { k: keys, v: values, len } => {
                keys.extend_from_slice(k.cpu());
                values.extend_from_slice(v.cpu());
                *len += k.rows();
                Ok(())
            }
            KvStorage::Paged { pool, table } => pool.append(table, k.gpu()?, v.gpu()?, k.rows()),
        }
    }

    /// Drops positions from `len` on (a candidate forking from a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        let width = self.width;
        match &mut self.storage {
            KvStorage::Host { k, v, len: held } => {
                *held = (*held).min(len);
                k.truncate(*held * width);
                v.truncate(*held * width);
            }
            KvStorage::Paged { table, .. } => table.truncate(len),
        }
    }
}

/// Where each sequence of a ragged batch lives: sequence `i` is rows
/// `offsets[i]..offsets[i + 1]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqLayout {
    offsets: Vec<usize>,
}

impl SeqLayout {
    pub fn from_lengths(lengths: &[usize]) -> Self {
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0);
        for len in lengths {
            offsets.push(offsets.last().expect("non-empty") + len);
        }
        SeqLayout { offsets }
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn total_tokens(&self) -> usize {
        *self.offsets.last().expect("non-empty")
    }

    pub fn range(&self, seq: usize) -> std::ops::Range<usize> {
        self.offsets[seq]..self.offsets[seq + 1]
    }
}

/// Host-side similarity scan: `out[i] = query · rows[i]` for row-major
/// `rows` of `query.len()` columns (vector search over host memory).
pub fn dot_rows(query: &[f32], rows: &[f32], out: &mut [f32]) {
    cpu::dot_rows(query, rows, out)
}

/// Epilogue fused into a matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    /// Exact GELU, `x * Φ(x)` with the error function (BERT's "gelu").
    Gelu,
    Tanh,
}

/// Shapes for multi-head self-attention over a fused QKV projection.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub head_dim: usize,
}

/// How rotary embeddings pair a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama.cpp's Llama layout (GGUF permutes Q/K for it).
    Normal,
    /// Halves (i, i + d/2): Hugging Face's `rotate_half`.
    Neox,
}

/// The arithmetic of matrix products against weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The reference arithmetic: f32 for float weights; for block-quantized
    /// weights, llama.cpp's (activations quantized per block).
    #[default]
    F32,
    /// Operands rounded to bf16, sums in f32, on a bf16 matrix unit (Intel
    /// AMX); where the device has none, the reference arithmetic. For a
    /// decoder's quantized weights this applies to prompts only.
    Bf16,
}

impl Precision {
    /// What products in `self` actually run as on `device`.
    pub fn effective(self, device: &Device) -> Precision {
        match (self, device) {
            (Precision::Bf16, Device::Cpu) if amx::available() => Precision::Bf16,
            (Precision::Bf16, Device::Cuda(_)) => Precision::Bf16,
            _ => Precision::F32,
        }
    }
}

/// Up to this many rows, `linear` uses the pre-packed kernel.
const PACKED_MAX_ROWS: usize = 64;

/// Makes glibc's malloc keep freed memory for reuse. A forward pass
/// allocates and frees activations of megabytes per op; by default each one
/// is a fresh `mmap` whose pages the kernel faults in and zeroes again, which
/// cost a tenth of an encoder batch's time.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator thresholds.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}

/// The devices aitl runs on. Chosen at run time ([`Device::select`]); model
/// code is the same.
#[derive(Debug, Clone)]
pub enum Device {
    Cpu,
    Cuda(std::sync::Arc<cuda::CudaDevice>),
}

impl Device {
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }

    /// What the device is, for logs and responses: `cpu`, or
    /// `cuda:0 (NVIDIA H200, sm_90)`.
    pub fn label(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(gpu) => gpu.label(),
        }
    }

    /// Whether this device has an attention kernel for heads of `head_dim`
    /// (the CPU has one for every size), so a model can refuse to load
    /// rather than fail every request.
    pub fn supports_attention(&self, head_dim: usize) -> bool {
        match self {
            Device::Cpu => true,
            Device::Cuda(_) => cuda::kernels::KernelId::attention(head_dim).is_some(),
        }
    }

    /// Waits for queued work (a no-op on the CPU): for timings.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(gpu) => Ok(gpu.synchronize()?),
        }
    }

    fn wrap(&self, shape: &[usize], buffer: cudarc::driver::CudaSlice<f32>) -> Tensor {
        Tensor { shape: shape.to_vec(), storage: Storage::Cuda(cuda::Buffer::F32(buffer)) }
    }

    /// Uploads host values.
    pub fn tensor(&self, shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        keep_freed_memory();
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            return Err(Error::Internal(format!(
                "tensor of shape {shape:?} needs {expected} values, got {}",
                data.len()
            )));
        }
        match self {
            Device::Cpu => Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cpu(data) }),
            Device::Cuda(gpu) => Ok(self.wrap(shape, gpu.upload(&data)?)),
        }
    }

    /// A `[k, n]` weight for [`Device::linear`], laid out once for the
    /// fastest kernel this device has.
    pub fn weight(&self, k: usize, n: usize, data: Vec<f32>) -> Result<Tensor> {
        self.weight_in(Precision::F32, k, n, data)
    }

    /// As [`Device::weight`], for products in `precision` (bf16 where this
    /// device has a bf16 matrix unit, else f32).
    pub fn weight_in(&self, precision: Precision, k: usize, n: usize, data: Vec<f32>) -> Result<Tensor> {
        if let Device::Cuda(gpu) = self {
            if data.len() != k * n {
                return Err(Error::Internal(format!("weight of {k}×{n} needs {} values, got {}", k * n, data.len())));
            }
            let buffer = match precision {
                Precision::F32 => cuda::Buffer::F32(gpu.upload(&data)?),
                Precision::Bf16 => {
                    let bits: Vec<u16> = data.iter().map(|&v| half::f32_to_bf16(v)).collect();
                    cuda::Buffer::Bf16(gpu.upload(&bits)?)
                }
            };
            return Ok(Tensor { shape: vec![k, n], storage: Storage::Cuda(buffer) });
        }
        let plain = self.tensor(&[k, n], data)?;
        match self {
            Device::Cpu if precision == Precision::Bf16 && amx::available() => {
                let tiles = amx::AmxWeights::pack(plain.cpu(), k, n);
                let Storage::Cpu(plain) = plain.storage else { unreachable!("tensor() makes plain storage") };
                Ok(Tensor { shape: vec![k, n], storage: Storage::CpuAmx { plain, tiles } })
            }
            Device::Cpu if packed::available() => {
                let packed = packed::PackedWeights::pack(plain.cpu(), k, n);
                let Storage::Cpu(plain) = plain.storage else { unreachable!("tensor() makes plain storage") };
                Ok(Tensor { shape: vec![k, n], storage: Storage::CpuPacked { plain, packed } })
            }
            _ => Ok(plain),
        }
    }

    /// Keeps `bytes` (`n` rows of `k` values of `dtype`) as a weight for
    /// [`Device::linear_quantized`].
    pub fn quant_matrix(&self, dtype: GgmlType, k: usize, n: usize, bytes: Vec<u8>) -> Result<QuantMatrix> {
        if !k.is_multiple_of(dtype.block_values()) || bytes.len() != n * dtype.row_bytes(k) {
            return Err(Error::Internal(format!(
                "quantized matrix {n}×{k} of {dtype:?} does not fit {} bytes",
                bytes.len()
            )));
        }
        let bytes = match self {
            Device::Cpu => QuantBytes::Host(bytes),
            Device::Cuda(gpu) => QuantBytes::Cuda(std::sync::Arc::new(gpu.upload(&bytes)?)),
        };
        Ok(QuantMatrix { dtype, k, n, bytes, prefill: Precision::F32 })
    }

    /// `x[m, k] · wᵀ` for a block-quantized `w` of `n` rows: activations are
    /// quantized per row as ggml does for that weight type, then each output
    /// is one block dot product (both cores split the outputs). A prompt's
    /// many rows against a weight in bf16 prefill run on AMX tiles instead.
    pub fn linear_quantized(&self, x: &Tensor, w: &QuantMatrix) -> Result<Tensor> {
        let (m, k) = (x.rows(), x.cols());
        if k != w.k {
            return Err(Error::Internal(format!(
                "linear_quantized: x {:?} does not fit {}×{} weights",
                x.shape, w.n, w.k
            )));
        }
        let out = match self {
            Device::Cpu => cpu::linear_quantized(x.cpu(), w.all(), m),
            Device::Cuda(gpu) => {
                let out = gpu.linear_quantized(x.gpu()?, m, w.bytes.gpu()?, (w.dtype, w.prefill), (k, w.n))?;
                return Ok(self.wrap(&[m, w.n], out));
            }
        };
        self.tensor(&[m, w.n], out)
    }

    /// Rows `ids` of a block-quantized table, expanded to f32 (a decoder's
    /// token embeddings).
    pub fn embed_quantized(&self, table: &QuantMatrix, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= table.n) {
            return Err(Error::InvalidArgument(format!("token id {bad} is outside the vocabulary of {}", table.n)));
        }
        match self {
            Device::Cpu => {
                let rows = ids.iter().flat_map(|&id| table.dequantize_row(id as usize)).collect();
                self.tensor(&[ids.len(), table.k], rows)
            }
            Device::Cuda(gpu) => {
                Ok(self
                    .wrap(&[ids.len(), table.k], gpu.embed_quantized(table.bytes.gpu()?, table.dtype, table.k, ids)?))
            }
        }
    }

    /// `x[m, k] · w[k, n] + bias[n]`, then `act`. `w` is stored `[k, n]`.
    pub fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        let (m, k, n) = (x.rows(), x.cols(), w.cols());
        if w.rows() != k || bias.is_some_and(|b| b.cols() != n) {
            return Err(Error::Internal(format!(
                "linear: x {:?}, w {:?}, bias {:?} do not fit",
                x.shape,
                w.shape,
                bias.map(|b| b.shape.clone())
            )));
        }
        if let Device::Cuda(gpu) = self {
            let Storage::Cuda(weight) = &w.storage else {
                return Err(Error::Internal("linear: a host weight on CUDA".into()));
            };
            let bias = bias.map(Tensor::gpu).transpose()?;
            return Ok(self.wrap(&[m, n], gpu.linear(x.gpu()?, (m, k, n), weight, bias, act)?));
        }
        let out = match &w.storage {
            Storage::CpuAmx { tiles, .. } => {
                amx::matmul(x.cpu(), tiles, bias.map(|b| b.cpu()), m, &|row| cpu::activate(row, act))
            }
            // Few rows: the weight read dominates, and it is packed already.
            Storage::CpuPacked { packed, .. } if m <= PACKED_MAX_ROWS => {
                let mut out = vec![0f32; m * n];
                packed::matmul(x.cpu(), packed, bias.map(|b| b.cpu()), m, &mut out, &|tile| cpu::activate(tile, act));
                out
            }
            // Many rows: the gemm crate's cache blocking wins (benches/matmul.rs).
            Storage::Cpu(w) | Storage::CpuPacked { plain: w, .. } => {
                let mut out = vec![0f32; m * n];
                cpu::linear(x.cpu(), w, bias.map(|b| b.cpu()), act, m, k, n, &mut out);
                out
            }
            Storage::Cuda(_) => return Err(Error::Internal("linear: a CUDA weight on the CPU".into())),
        };
        self.tensor(&[m, n], out)
    }

    /// Copies of consecutive column groups of a 2-D tensor, `widths` wide
    /// (Q, K and V of a fused projection).
    pub fn split_columns(&self, x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
        let (rows, cols) = (x.rows(), x.cols());
        if x.shape.len() != 2 || widths.iter().sum::<usize>() != cols {
            return Err(Error::Internal(format!("split_columns: {widths:?} of {:?}", x.shape)));
        }
        let mut start = 0;
        widths
            .iter()
            .map(|&w| {
                let part = match self {
                    Device::Cpu => {
                        let data = x.cpu().chunks_exact(cols).flat_map(|row| row[start..start + w].iter().copied());
                        self.tensor(&[rows, w], data.collect())
                    }
                    Device::Cuda(gpu) => Ok(self.wrap(&[rows, w], gpu.copy_columns(x.gpu()?, rows, cols, start, w)?)),
                };
                start += w;
                part
            })
            .collect()
    }

    /// A copy of rows `range` of a 2-D tensor.
    pub fn slice_rows(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        let width = x.cols();
        if x.shape.len() != 2 || range.end > x.rows() || range.start > range.end {
            return Err(Error::Internal(format!("slice_rows: {range:?} of {:?}", x.shape)));
        }
        let rows = range.len();
        match self {
            Device::Cpu => self.tensor(&[rows, width], x.cpu()[range.start * width..range.end * width].to_vec()),
            Device::Cuda(gpu) => Ok(self.wrap(&[rows, width], gpu.slice_rows(x.gpu()?, width, range)?)),
        }
    }

    /// Rows `rows` of a 2-D tensor, in that order (CLS pooling, the last row
    /// of each sequence).
    pub fn gather_rows(&self, x: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let width = x.cols();
        if x.shape.len() != 2 || rows.iter().any(|&r| r as usize >= x.rows()) {
            return Err(Error::Internal(format!("gather_rows: a row outside {:?}", x.shape)));
        }
        match self {
            Device::Cpu => {
                let data = rows.iter().flat_map(|&r| x.cpu()[r as usize * width..(r as usize + 1) * width].iter());
                self.tensor(&[rows.len(), width], data.copied().collect())
            }
            Device::Cuda(gpu) => Ok(self.wrap(&[rows.len(), width], gpu.gather_rows(x.gpu()?, rows, width)?)),
        }
    }

    /// `LayerNorm(x + residual)` over the last dimension, in place in `x`.
    pub fn add_layer_norm(
        &self,
        x: &mut Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<()> {
        let width = x.cols();
        if gamma.cols() != width || beta.cols() != width || residual.is_some_and(|r| r.shape != x.shape) {
            return Err(Error::Internal("add_layer_norm: shapes do not fit".into()));
        }
        match self {
            Device::Cpu => {
                cpu::add_layer_norm(x.cpu_mut(), residual.map(|r| r.cpu()), gamma.cpu(), beta.cpu(), eps, width)
            }
            Device::Cuda(gpu) => {
                let rows = x.rows();
                let residual = residual.map(Tensor::gpu).transpose()?;
                gpu.add_layer_norm(x.gpu_mut()?, residual, gamma.gpu()?, beta.gpu()?, rows, width, eps)?
            }
        }
        Ok(())
    }

    fn check_embed(table: &Tensor, ids: &[u32], extra: &[(&Tensor, &[u32])]) -> Result<()> {
        let width = table.cols();
        let fits = |t: &Tensor, some: &[u32]| t.cols() == width && some.iter().all(|&i| (i as usize) < t.rows());
        if !fits(table, ids) || extra.iter().any(|(t, some)| some.len() != ids.len() || !fits(t, some)) {
            return Err(Error::InvalidArgument("token id outside the embedding table".into()));
        }
        Ok(())
    }

    /// Gathers rows of `table` (`[vocab, width]`) by `ids` and adds the rows
    /// of each `extra` table gathered by its own ids: BERT's word + position +
    /// token-type embedding.
    pub fn embed(&self, table: &Tensor, ids: &[u32], extra: &[(&Tensor, &[u32])]) -> Result<Tensor> {
        Self::check_embed(table, ids, extra)?;
        let width = table.cols();
        match self {
            Device::Cpu => {
                let mut out = vec![0f32; ids.len() * width];
                let extra: Vec<(&[f32], &[u32])> = extra.iter().map(|(t, i)| (t.cpu(), *i)).collect();
                cpu::embed(table.cpu(), ids, &extra, width, &mut out);
                self.tensor(&[ids.len(), width], out)
            }
            Device::Cuda(gpu) => {
                let mut out = gpu.gather_rows(table.gpu()?, ids, width)?;
                for (t, i) in extra {
                    gpu.add(&mut out, &gpu.gather_rows(t.gpu()?, i, width)?, ids.len() * width)?;
                }
                Ok(self.wrap(&[ids.len(), width], out))
            }
        }
    }

    /// [`Device::embed`] then [`Device::add_layer_norm`]: one kernel on a GPU.
    pub fn embed_layer_norm(
        &self,
        table: &Tensor,
        ids: &[u32],
        extra: &[(&Tensor, &[u32])],
        (gamma, beta): (&Tensor, &Tensor),
        eps: f32,
    ) -> Result<Tensor> {
        match self {
            Device::Cuda(gpu) if extra.len() <= 2 => {
                Self::check_embed(table, ids, extra)?;
                let width = table.cols();
                if gamma.cols() != width || beta.cols() != width {
                    return Err(Error::Internal("embed_layer_norm: shapes do not fit".into()));
                }
                let extra = extra.iter().map(|(t, i)| Ok((t.gpu()?, *i))).collect::<Result<Vec<_>>>()?;
                let out = gpu.embed_layer_norm(table.gpu()?, ids, &extra, gamma.gpu()?, beta.gpu()?, width, eps)?;
                Ok(self.wrap(&[ids.len(), width], out))
            }
            _ => {
                let mut x = self.embed(table, ids, extra)?;
                self.add_layer_norm(&mut x, None, gamma, beta, eps)?;
                Ok(x)
            }
        }
    }

    /// Bidirectional multi-head attention within each sequence. `qkv` is
    /// `[tokens, 3 · heads · head_dim]` (Q, K, V blocks side by side); the
    /// result is `[tokens, heads · head_dim]`.
    pub fn attention(&self, qkv: &Tensor, layout: &SeqLayout, shape: AttentionShape) -> Result<Tensor> {
        let hidden = shape.heads * shape.head_dim;
        if qkv.cols() != 3 * hidden || qkv.rows() != layout.total_tokens() {
            return Err(Error::Internal(format!("attention: qkv {:?} does not fit {shape:?}", qkv.shape)));
        }
        match self {
            Device::Cpu => {
                let mut out = vec![0f32; qkv.rows() * hidden];
                cpu::attention(qkv.cpu(), layout, shape, &mut out);
                self.tensor(&[qkv.rows(), hidden], out)
            }
            Device::Cuda(gpu) => Ok(self.wrap(&[qkv.rows(), hidden], gpu.attention(qkv.gpu()?, layout, shape)?)),
        }
    }

    /// Mean of each sequence's rows (`[sequences, width]`).
    pub fn mean_pool(&self, x: &Tensor, layout: &SeqLayout) -> Result<Tensor> {
        let width = x.cols();
        if x.rows() != layout.total_tokens() {
            return Err(Error::Internal(format!("mean_pool: {:?} does not fit the layout", x.shape)));
        }
        match self {
            Device::Cpu => {
                let mut out = vec![0f32; layout.len() * width];
                cpu::mean_pool(x.cpu(), layout, width, &mut out);
                self.tensor(&[layout.len(), width], out)
            }
            Device::Cuda(gpu) => Ok(self.wrap(&[layout.len(), width], gpu.mean_pool(x.gpu()?, layout, width)?)),
        }
    }

    /// The first row of each sequence (`[sequences, width]`): CLS pooling.
    pub fn first_rows(&self, x: &Tensor, layout: &SeqLayout) -> Result<Tensor> {
        let starts: Vec<u32> = (0..layout.len()).map(|seq| layout.range(seq).start as u32).collect();
        self.gather_rows(x, &starts)
    }

    /// `x / rms(x) · gamma` per row.
    pub fn rms_norm(&self, x: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
        if gamma.cols() != x.cols() {
            return Err(Error::Internal("rms_norm: shapes do not fit".into()));
        }
        match self {
            Device::Cpu => {
                let mut out = vec![0f32; x.cpu().len()];
                cpu_decode::rms_norm(x.cpu(), gamma.cpu(), eps, &mut out);
                self.tensor(x.shape(), out)
            }
            Device::Cuda(gpu) => {
                Ok(self.wrap(x.shape(), gpu.rms_norm(x.gpu()?, gamma.gpu()?, x.rows(), x.cols(), eps)?))
            }
        }
    }

    /// `h += delta`, then [`Device::rms_norm`] of `h`: a decoder layer's
    /// residual add and the next norm, one pass over the rows on a GPU.
    pub fn add_rms_norm(&self, h: &mut Tensor, delta: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
        if h.shape != delta.shape || gamma.cols() != h.cols() {
            return Err(Error::Internal("add_rms_norm: shapes do not fit".into()));
        }
        match self {
            Device::Cpu => {
                self.add(h, delta)?;
                self.rms_norm(h, gamma, eps)
            }
            Device::Cuda(gpu) => {
                let (rows, width) = (h.rows(), h.cols());
                let out = gpu.add_rms_norm(h.gpu_mut()?, delta.gpu()?, gamma.gpu()?, (rows, width), eps)?;
                Ok(self.wrap(&[rows, width], out))
            }
        }
    }

    /// Rotary position embeddings in place; row `t` of `x` (`heads` heads of
    /// `head_dim`) is at `positions[t]`.
    pub fn rope(&self, x: &mut Tensor, positions: &[u32], head_dim: usize, base: f32, style: RopeStyle) -> Result<()> {
        if x.rows() != positions.len() || !x.cols().is_multiple_of(head_dim) || !head_dim.is_multiple_of(2) {
            return Err(Error::Internal(format!("rope: {:?} does not fit {} positions", x.shape, positions.len())));
        }
        let heads = x.cols() / head_dim;
        match self {
            Device::Cpu => cpu_decode::rope(x.cpu_mut(), positions, heads, head_dim, base, style),
            Device::Cuda(gpu) => gpu.rope(x.gpu_mut()?, positions, (heads, head_dim), base, style)?,
        }
        Ok(())
    }

    /// `gate ← silu(gate) · up` (SwiGLU), in place.
    pub fn silu_mul(&self, gate: &mut Tensor, up: &Tensor) -> Result<()> {
        if gate.shape != up.shape {
            return Err(Error::Internal("silu_mul: shapes do not fit".into()));
        }
        match self {
            Device::Cpu => cpu_decode::silu_mul(gate.cpu_mut(), up.cpu()),
            Device::Cuda(gpu) => {
                let n = gate.shape.iter().product();
                gpu.silu_mul(gate.gpu_mut()?, up.gpu()?, n)?
            }
        }
        Ok(())
    }

    /// `x += y`.
    pub fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        if x.shape != y.shape {
            return Err(Error::Internal("add: shapes do not fit".into()));
        }
        match self {
            Device::Cpu => x.cpu_mut().iter_mut().zip(y.cpu()).for_each(|(a, b)| *a += b),
            Device::Cuda(gpu) => {
                let n = x.shape.iter().product();
                gpu.add(x.gpu_mut()?, y.gpu()?, n)?
            }
        }
        Ok(())
    }

    /// `x[r] += bias` for every row `r` (Qwen's Q, K and V biases).
    pub fn add_bias(&self, x: &mut Tensor, bias: &Tensor) -> Result<()> {
        let width = x.cols();
        if bias.shape != [width] {
            return Err(Error::Internal(format!("add_bias: bias {:?} for rows of {width}", bias.shape)));
        }
        match self {
            Device::Cpu => {
                let bias = bias.cpu().to_vec();
                x.cpu_mut().chunks_exact_mut(width).for_each(|row| row.iter_mut().zip(&bias).for_each(|(a, b)| *a += b))
            }
            Device::Cuda(gpu) => {
                let rows = x.rows();
                gpu.bias_act(x.gpu_mut()?, Some(bias.gpu()?), rows, width, Activation::None)?
            }
        }
        Ok(())
    }

    /// `x[r] += sigmoid(gate[r]) · y[r]`, `gate` one logit per row: a gated
    /// always-on expert (Qwen-MoE's shared expert).
    pub fn add_gated(&self, x: &mut Tensor, y: &Tensor, gate: &Tensor) -> Result<()> {
        if x.shape != y.shape || gate.shape != [x.rows(), 1] {
            return Err(Error::Internal("add_gated: shapes do not fit".into()));
        }
        let width = x.cols();
        match self {
            Device::Cpu => {
                let gate = gate.cpu().to_vec();
                x.cpu_mut().chunks_exact_mut(width).zip(y.cpu().chunks_exact(width)).zip(gate).for_each(
                    |((row, y), g)| {
                        let g = 1.0 / (1.0 + (-g).exp());
                        row.iter_mut().zip(y).for_each(|(a, b)| *a += g * b)
                    },
                )
            }
            Device::Cuda(gpu) => {
                let rows = x.rows();
                gpu.add_gated(x.gpu_mut()?, y.gpu()?, gate.gpu()?, rows, width)?
            }
        }
        Ok(())
    }

    /// Causal grouped-query attention for the sequences of one step: `q`
    /// (`[Σ rows, heads · head_dim]`) stacks each sequence's rows, at its
    /// positions `past..past + rows`, over its KV cache, whose first
    /// `past + rows` rows are filled. `ggml_order` keeps ggml's summation
    /// order in every score (llama.cpp's results to the bit); otherwise a
    /// prompt's many rows take a blocked kernel, f32 as well.
    pub fn cached_attention(
        &self,
        q: &Tensor,
        sequences: &[CachedRows<'_>],
        shape: AttentionShape,
        kv_heads: usize,
        ggml_order: bool,
    ) -> Result<Tensor> {
        let fits = |s: &CachedRows| s.cache.width == kv_heads * shape.head_dim && s.cache.len() >= s.past + s.rows;
        if q.cols() != shape.heads * shape.head_dim
            || kv_heads == 0
            || !shape.heads.is_multiple_of(kv_heads)
            || sequences.iter().map(|s| s.rows).sum::<usize>() != q.rows()
            || !sequences.iter().all(fits)
        {
            return Err(Error::Internal(format!("cached_attention: q {:?} does not fit the caches", q.shape)));
        }
        match self {
            Device::Cuda(_) => {
                let mut pool = None;
                let mut paged = Vec::with_capacity(sequences.len());
                for s in sequences {
                    let KvStorage::Paged { pool: p, table } = &s.cache.storage else {
                        return Err(Error::Internal("cached_attention: a host KV cache reached a CUDA op".into()));
                    };
                    if let Some(first) = pool
                        && !std::sync::Arc::ptr_eq(first, p)
                    {
                        return Err(Error::Internal(
                            "cached_attention: the sequences' caches are in different pools".into(),
                        ));
                    }
                    pool = Some(p);
                    paged.push(cuda::paged_kv::PagedRows { table, past: s.past, rows: s.rows });
                }
                let Some(pool) = pool else { return self.tensor(q.shape(), Vec::new()) };
                let attended = pool.attention(q.gpu()?, &paged, (shape.heads, kv_heads, shape.head_dim))?;
                return Ok(self.wrap(q.shape(), attended));
            }
            Device::Cpu => {
                let mut host = Vec::with_capacity(sequences.len());
                for s in sequences {
                    let KvStorage::Host { k, v, .. } = &s.cache.storage else {
                        return Err(Error::Internal("cached_attention: a GPU KV cache reached a CPU op".into()));
                    };
                    host.push(cpu_decode::Sequence { k, v, past: s.past, rows: s.rows });
                }
                let mut out = vec![0f32; q.cpu().len()];
                cpu_decode::cached_attention(q.cpu(), &host, shape, kv_heads, ggml_order, &mut out);
                self.tensor(q.shape(), out)
            }
        }
    }

    /// Scales each row to unit L2 norm, in place.
    pub fn l2_normalize(&self, x: &mut Tensor) -> Result<()> {
        let width = x.cols();
        match self {
            Device::Cpu => cpu::l2_normalize(x.cpu_mut(), width),
            Device::Cuda(gpu) => {
                let rows = x.rows();
                gpu.l2_normalize(x.gpu_mut()?, rows, width)?
            }
        }
        Ok(())
    }
}
