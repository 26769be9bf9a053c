//! The CUDA backend: the same ops as the CPU backend, over device-resident
//! buffers, with hand-written kernels from `kernels-cu/` (compiled at run
//! time by NVRTC for the GPU's own architecture) and cuBLAS for matrix
//! products. cudarc loads every CUDA library at run time, so this compiles
//! and runs on machines without CUDA; [`probe`] says whether one is usable.
//!
//! Work is queued on one stream per device, in the order ops are called, so
//! buffers are freed (stream-ordered, from the driver's memory pool, which
//! keeps freed blocks for reuse: the workspace) only after the kernels that
//! read them. Nothing in a forward pass waits for the GPU; `to_host` does.

pub mod compile;
mod decode;
pub mod error;
pub mod kernels;
mod ops;
pub mod paged_kv;
pub mod probe;
pub mod search;

use std::{collections::HashMap, sync::Arc};

use cudarc::{
    cublas::CudaBlas,
    driver::{CudaContext, CudaFunction, CudaSlice, CudaStream},
    nvrtc::Ptx,
};

pub use compile::KernelCache;
pub(crate) use decode::{ExpertWeights, concat_bytes};
pub use error::CudaError;
use kernels::KernelId;
pub use probe::{GpuInfo, Probe, probe};

/// One GPU with its stream, cuBLAS handle and loaded kernels.
pub struct CudaDevice {
    info: GpuInfo,
    stream: Arc<CudaStream>,
    /// cuBLAS allows one host thread at a time on a handle, and the
    /// embedder's and the cross-encoder's workers share this device.
    blas: std::sync::Mutex<CudaBlas>,
    functions: HashMap<KernelId, CudaFunction>,
    /// Families compiled now rather than read from the cache (for the log).
    compiled_now: Vec<&'static str>,
    /// Fill new buffers with NaN (`AITL_CUDA_POISON`), for tests.
    poison: bool,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({})", self.label())
    }
}

/// A buffer on the GPU: activations are f32; a weight may be kept as bf16
/// for products in bf16.
#[derive(Clone)]
pub enum Buffer {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Buffer::F32(s) => write!(f, "Buffer::F32({})", s.len()),
            Buffer::Bf16(s) => write!(f, "Buffer::Bf16({})", s.len()),
        }
    }
}

impl Buffer {
    /// The values, as f32, on the host (waits for the buffer's stream).
    pub fn to_host(&self) -> Result<Vec<f32>, CudaError> {
        let values = match self {
            Buffer::F32(s) => download(s)?,
            Buffer::Bf16(s) => download(s)?.into_iter().map(super::half::bf16_to_f32).collect(),
        };
        Ok(values)
    }
}

/// Makes the device's memory pool keep what is freed instead of returning
/// it at each synchronization: activations are allocated and freed per op
/// (stream-ordered), so after the first batch of a size every allocation is
/// served from the pool, a workspace that grows to the largest batch.
fn keep_freed_memory(context: &CudaContext) -> Result<(), CudaError> {
    use cudarc::driver::sys;
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the device handle comes from a live context; pool and
    // threshold are valid for the calls' writes and reads.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
            .result()
            .map_err(CudaError::driver("cuDeviceGetDefaultMemPool"))?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(CudaError::driver("cuMemPoolSetAttribute"))
    }
}

/// A buffer's values on the host, once its stream has finished writing them.
pub(crate) fn download<T: cudarc::driver::DeviceRepr>(buffer: &CudaSlice<T>) -> Result<Vec<T>, CudaError> {
    let values = buffer.stream().clone_dtoh(buffer).map_err(CudaError::driver("cuMemcpyDtoHAsync"))?;
    // A copy to pageable memory returns when done; the wait also reports
    // an earlier kernel's failure here rather than at some later call.
    buffer.stream().synchronize().map_err(CudaError::driver("cuStreamSynchronize"))?;
    Ok(values)
}

impl CudaDevice {
    /// Opens GPU `ordinal`: a context, a stream, cuBLAS, and every kernel
    /// family compiled for its architecture (or read from `cache`). Fails,
    /// without a panic, where any of that is missing.
    pub fn open(ordinal: usize, cache: &KernelCache) -> Result<CudaDevice, CudaError> {
        let gpus = match probe() {
            Probe::Gpus(gpus) => gpus,
            Probe::Missing(why) => return Err(CudaError::Unavailable(why)),
        };
        let count = gpus.len();
        let info = gpus.into_iter().find(|g| g.ordinal == ordinal).ok_or_else(|| {
            CudaError::Unavailable(format!("there is no GPU cuda:{ordinal}; the driver reports {count}"))
        })?;
        let context = CudaContext::new(ordinal).map_err(CudaError::driver("cuDevicePrimaryCtxRetain"))?;
        // One stream per device orders every op, so cudarc's per-buffer
        // events (for work spread over streams) would only cost time.
        // SAFETY: no buffer of this context exists yet.
        unsafe { context.disable_event_tracking() };
        keep_freed_memory(&context)?;
        let stream = context.new_stream().map_err(CudaError::driver("cuStreamCreate"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(CudaError::blas("cublasCreate"))?;
        let arch = info.arch();
        let mut modules = HashMap::new();
        let mut compiled_now = Vec::new();
        for (index, family) in kernels::FAMILIES.iter().enumerate() {
            let (cubin, fresh) = cache.cubin(family, &arch)?;
            if fresh {
                compiled_now.push(family.name);
            }
            let module = context.load_module(Ptx::from_binary(cubin)).map_err(CudaError::driver("cuModuleLoadData"))?;
            modules.insert(index, module);
        }
        let functions = KernelId::ALL
            .iter()
            .map(|&id| {
                let module = &modules[&(id.family() as usize)];
                module.load_function(id.entry()).map(|f| (id, f)).map_err(CudaError::driver("cuModuleGetFunction"))
            })
            .collect::<Result<_, _>>()?;
        let poison = std::env::var_os("AITL_CUDA_POISON").is_some();
        Ok(CudaDevice { info, stream, blas: std::sync::Mutex::new(blas), functions, compiled_now, poison })
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// `cuda:0 (NVIDIA H200, sm_90)`.
    pub fn label(&self) -> String {
        format!("cuda:{} ({}, {})", self.info.ordinal, self.info.name, self.info.arch())
    }

    /// The kernel families NVRTC compiled when this device opened (the rest
    /// came from the cache).
    pub fn compiled_now(&self) -> &[&'static str] {
        &self.compiled_now
    }

    /// Waits until the GPU has done all queued work, and reports a kernel's
    /// failure if one failed.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(CudaError::driver("cuStreamSynchronize"))
    }

    fn function(&self, id: KernelId) -> &CudaFunction {
        // Every KernelId is loaded in `open`.
        &self.functions[&id]
    }
}
