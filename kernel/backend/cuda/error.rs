//! What can go wrong on a GPU, with the foreign libraries' own detail kept.

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable GPU, driver or CUDA library here.
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    /// A driver, NVRTC or cuBLAS call failed.
    #[error("CUDA call {call} failed: {detail}")]
    Driver { call: &'static str, detail: String },
    /// NVRTC rejected a kernel family; `log` is NVRTC's whole log.
    #[error("NVRTC could not compile {family} for {arch}:\n{log}")]
    Compile { family: &'static str, arch: String, log: String },
    /// An op the CUDA backend does not have yet, or a shape it has no kernel for.
    #[error("{op} is not supported on CUDA: {detail}")]
    Unsupported { op: &'static str, detail: String },
}

impl CudaError {
    pub(super) fn driver(call: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
        move |e| CudaError::Driver { call, detail: e.to_string() }
    }

    pub(super) fn blas(call: &'static str) -> impl FnOnce(cudarc::cublas::result::CublasError) -> CudaError {
        move |e| CudaError::Driver { call, detail: format!("{e:?}") }
    }
}
