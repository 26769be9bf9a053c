//! Run-time compilation with NVRTC, to CUBIN for the GPU's own architecture
//! (no PTX left for the driver to JIT at start), cached on disk. The cache
//! key is the source's SHA-256, the architecture and NVRTC's version, so a
//! changed kernel, GPU or compiler never loads a stale binary.

use std::{
    ffi::{CStr, CString, c_char, c_int},
    path::{Path, PathBuf},
};

use cudarc::nvrtc::sys;
use sha2::{Digest, Sha256};

use super::{error::CudaError, kernels::KernelFamily, probe};

/// Options every family compiles with. No fast-math: the kernels are
/// checked against the CPU backend's f32 arithmetic (erf, exp, division).
const OPTIONS: &[&str] = &["--std=c++17", "-lineinfo"];

/// A compiled family: its PTX (what ptxas reads for the resource report)
/// and, for a real architecture (`sm_XY`), the CUBIN the driver loads.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub ptx: String,
    pub cubin: Option<Vec<u8>>,
    /// NVRTC's log: warnings, or with `--ptxas-options=-v` the resource use.
    pub log: String,
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    probe::require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (require_nvrtc); the out-pointers are valid.
    check("nvrtcVersion", unsafe { sys::nvrtcVersion(&mut major, &mut minor) })?;
    Ok((major, minor))
}

/// The architectures this NVRTC compiles for, as `sm_XY` numbers.
pub fn supported_archs() -> Result<Vec<i32>, CudaError> {
    probe::require_nvrtc()?;
    let mut count: c_int = 0;
    // SAFETY: NVRTC is loaded; count is a valid out-pointer.
    check("nvrtcGetNumSupportedArchs", unsafe { sys::nvrtcGetNumSupportedArchs(&mut count) })?;
    let mut archs = vec![0 as c_int; count.max(0) as usize];
    // SAFETY: archs has the `count` slots NVRTC writes.
    check("nvrtcGetSupportedArchs", unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) })?;
    Ok(archs)
}

/// Compiles `family` for `arch` (`"sm_90"` gives PTX and CUBIN,
/// `"compute_90"` PTX only). `extra` options follow the defaults.
pub fn compile(family: &KernelFamily, arch: &str, extra: &[&str]) -> Result<Compiled, CudaError> {
    probe::require_nvrtc()?;
    let failed = |log: String| CudaError::Compile { family: family.name, arch: arch.to_string(), log };
    let source = CString::new(family.source()).map_err(|_| failed("the source holds a NUL byte".into()))?;
    let name = CString::new(family.name).map_err(|_| failed("the name holds a NUL byte".into()))?;
    let program = Program::new(&source, &name)?;
    let arch_option = format!("--gpu-architecture={arch}");
    let options: Vec<CString> = OPTIONS
        .iter()
        .copied()
        .chain([arch_option.as_str()])
        .chain(extra.iter().copied())
        .map(|o| CString::new(o).map_err(|_| failed(format!("option {o:?} holds a NUL byte"))))
        .collect::<Result<_, _>>()?;
    let pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: program is live; pointers holds options.len() valid C strings.
    let status = unsafe { sys::nvrtcCompileProgram(program.0, pointers.len() as c_int, pointers.as_ptr()) };
    let log = program.log()?;
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(failed(if log.is_empty() { format!("{status:?}") } else { log }));
    }
    let ptx = String::from_utf8_lossy(&program.output(sys::nvrtcGetPTXSize, sys::nvrtcGetPTX)?)
        .trim_end_matches('\0')
        .to_string();
    let cubin =
        if arch.starts_with("sm_") { Some(program.output(sys::nvrtcGetCUBINSize, sys::nvrtcGetCUBIN)?) } else { None };
    Ok(Compiled { ptx, cubin, log })
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Program {
    fn new(source: &CStr, name: &CStr) -> Result<Self, CudaError> {
        let mut program = std::ptr::null_mut();
        // SAFETY: source and name are valid C strings; no headers are passed.
        check("nvrtcCreateProgram", unsafe {
            sys::nvrtcCreateProgram(&mut program, source.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null())
        })?;
        Ok(Program(program))
    }

    fn log(&self) -> Result<String, CudaError> {
        let bytes = self.output(sys::nvrtcGetProgramLogSize, sys::nvrtcGetProgramLog)?;
        Ok(String::from_utf8_lossy(&bytes).trim_end_matches('\0').trim().to_string())
    }

    /// One of the program's outputs through its size and copy functions.
    fn output(
        &self,
        size: unsafe fn(sys::nvrtcProgram, *mut usize) -> sys::nvrtcResult,
        copy: unsafe fn(sys::nvrtcProgram, *mut c_char) -> sys::nvrtcResult,
    ) -> Result<Vec<u8>, CudaError> {
        let mut len = 0usize;
        // SAFETY: the program is live; len is a valid out-pointer.
        check("nvrtc output size", unsafe { size(self.0, &mut len) })?;
        let mut bytes = vec![0u8; len];
        // SAFETY: bytes has the `len` bytes NVRTC writes.
        check("nvrtc output", unsafe { copy(self.0, bytes.as_mut_ptr().cast()) })?;
        Ok(bytes)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once.
        unsafe {
            sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn check(call: &'static str, status: sys::nvrtcResult) -> Result<(), CudaError> {
    if status == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver { call, detail: format!("{status:?}") })
    }
}

/// CUBINs on disk, one file per (source, architecture, NVRTC version).
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        KernelCache { dir: dir.into() }
    }

    /// `$AITL_KERNEL_CACHE`, else `$XDG_CACHE_HOME/aitl/kernels`, else
    /// `~/.cache/aitl/kernels`, else a folder under the system's temp dir.
    pub fn default_location() -> Self {
        let dir = std::env::var_os("AITL_KERNEL_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("aitl/kernels")))
            .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/aitl/kernels")))
            .unwrap_or_else(|| std::env::temp_dir().join("aitl-kernels"));
        KernelCache::new(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `family`'s CUBIN for `arch` under NVRTC `version` lives.
    pub fn path(&self, family: &KernelFamily, arch: &str, version: (i32, i32)) -> PathBuf {
        let mut hash = Sha256::new();
        hash.update(family.source().as_bytes());
        for option in OPTIONS {
            hash.update(option.as_bytes());
        }
        let digest: String = hash.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
        let stem = family.name.trim_end_matches(".cu");
        self.dir.join(format!("{stem}-{digest}-{arch}-nvrtc{}.{}.cubin", version.0, version.1))
    }

    /// The family's CUBIN for `arch`: from the cache, or compiled and stored
    /// (written to a temporary name and renamed, so a reader never sees half
    /// a file). Returns whether it was compiled now.
    pub fn cubin(&self, family: &KernelFamily, arch: &str) -> Result<(Vec<u8>, bool), CudaError> {
        let path = self.path(family, arch, nvrtc_version()?);
        if let Ok(bytes) = std::fs::read(&path) {
            return Ok((bytes, false));
        }
        let compiled = compile(family, arch, &[])?;
        let cubin = compiled.cubin.ok_or_else(|| CudaError::Compile {
            family: family.name,
            arch: arch.to_string(),
            log: "no CUBIN for a virtual architecture".into(),
        })?;
        // The cache only saves time: a read-only disk still serves.
        if std::fs::create_dir_all(&self.dir).is_ok() {
            let partial = path.with_extension(format!("partial-{}", std::process::id()));
            if std::fs::write(&partial, &cubin).is_ok() && std::fs::rename(&partial, &path).is_err() {
                let _ = std::fs::remove_file(&partial);
            }
        }
        Ok((cubin, true))
    }
}
