//! Finding out, without a panic, whether this machine can run the CUDA
//! backend. cudarc loads libcuda, NVRTC and cuBLAS at run time and panics on
//! the first call into a library it cannot find, so each library is looked
//! for before anything calls into it.

use super::error::CudaError;

/// A GPU the driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor): (9, 0) is Hopper.
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
}

impl GpuInfo {
    /// The real architecture NVRTC compiles for, `sm_90` on Hopper.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

/// What the machine offers.
#[derive(Debug, Clone)]
pub enum Probe {
    Gpus(Vec<GpuInfo>),
    /// Why there is no CUDA here, in words for the log.
    Missing(String),
}

// The `cuda` feature links these libraries (candle's training backend);
// otherwise cudarc loads them and `is_culib_present` asks first.
#[cfg(not(feature = "cuda"))]
fn present(library: Library) -> bool {
    // SAFETY: is_culib_present only tries to open the library.
    unsafe {
        match library {
            Library::Driver => cudarc::driver::sys::is_culib_present(),
            Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            Library::Cublas => cudarc::cublas::sys::is_culib_present(),
        }
    }
}

#[cfg(feature = "cuda")]
fn present(_: Library) -> bool {
    true
}

#[derive(Debug, Clone, Copy)]
enum Library {
    Driver,
    Nvrtc,
    Cublas,
}

impl Library {
    fn missing(self) -> String {
        match self {
            Library::Driver => "libcuda (the NVIDIA driver) is not installed or not on the library path".into(),
            Library::Nvrtc => "libnvrtc is not on the library path (NVIDIA's nvidia-cuda-nvrtc wheel for CUDA 13 \
                               provides it: add its lib folder to LD_LIBRARY_PATH)"
                .into(),
            Library::Cublas => "libcublas is not on the library path (NVIDIA's nvidia-cublas wheel for CUDA 13 \
                                provides it: add its lib folder to LD_LIBRARY_PATH)"
                .into(),
        }
    }
}

/// NVRTC alone: enough to compile kernels, with or without a GPU.
pub fn require_nvrtc() -> Result<(), CudaError> {
    if present(Library::Nvrtc) { Ok(()) } else { Err(CudaError::Unavailable(Library::Nvrtc.missing())) }
}

/// Everything the backend needs, then the GPUs the driver answers for.
pub fn probe() -> Probe {
    for library in [Library::Driver, Library::Nvrtc, Library::Cublas] {
        if !present(library) {
            return Probe::Missing(library.missing());
        }
    }
    match gpus() {
        Ok(gpus) if gpus.is_empty() => Probe::Missing("the driver reports no GPU".into()),
        Ok(gpus) => Probe::Gpus(gpus),
        Err(e) => Probe::Missing(e.to_string()),
    }
}

fn gpus() -> Result<Vec<GpuInfo>, CudaError> {
    use cudarc::driver::{result, sys::CUdevice_attribute as A};
    result::init().map_err(CudaError::driver("cuInit"))?;
    let count = result::device::get_count().map_err(CudaError::driver("cuDeviceGetCount"))?;
    (0..count.max(0) as usize)
        .map(|ordinal| {
            let device = result::device::get(ordinal as i32).map_err(CudaError::driver("cuDeviceGet"))?;
            let attribute = |a| {
                // SAFETY: device came from cuDeviceGet after cuInit.
                unsafe { result::device::get_attribute(device, a) }.map_err(CudaError::driver("cuDeviceGetAttribute"))
            };
            let compute_capability = (
                attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            );
            let name = result::device::get_name(device).map_err(CudaError::driver("cuDeviceGetName"))?;
            // SAFETY: as above.
            let memory_bytes =
                unsafe { result::device::total_mem(device) }.map_err(CudaError::driver("cuDeviceTotalMem"))?;
            Ok(GpuInfo { ordinal, name, compute_capability, memory_bytes })
        })
        .collect()
}
