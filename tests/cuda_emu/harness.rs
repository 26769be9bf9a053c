//! The CUDA emulator's side in Rust, shared by the emulated kernel tests:
//! each `.cu` of `kernels-cu/` built as a host library with `shim.h`, its
//! entry points looked up, launches run over the emulated grid, and the
//! inputs and comparisons the tests share.

// Each test binary that includes this uses only some of the helpers.
#![allow(dead_code)]

use std::{
    ffi::{CStr, c_char, c_void},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
};

use aitl::backend::{Device, Tensor};
use libloading::Library;
use rand::{Rng, rngs::StdRng};

/// One `.cu` per op family, each built into its own library (a module on
/// the device).
pub const FAMILIES: [&str; 12] = [
    "attention",
    "decoder",
    "dequantize",
    "elementwise",
    "embeddings",
    "layer_norm",
    "layout",
    "moe",
    "pooling",
    "quant_matvec",
    "sampling",
    "vector_search",
];

/// |got − want| ≤ F32_TOLERANCE · max(1, |want|) for f32 arithmetic.
pub const F32_TOLERANCE: f32 = 1e-5;

// ---- building and launching ------------------------------------------------

pub struct Module {
    name: &'static str,
    library: Library,
}

/// Grid and block of one launch (blocks are one-dimensional here).
#[derive(Clone, Copy)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub shared_bytes: u64,
}

impl Launch {
    pub fn new(grid: (u32, u32, u32), block: u32) -> Self {
        Launch { grid, block, shared_bytes: 0 }
    }

    pub fn rows(grid: u32, block: u32) -> Self {
        Launch::new((grid, 1, 1), block)
    }
}

type LaunchFn = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32, u32, u32, u32, u32, u64) -> i32;
type LastErrorFn = unsafe extern "C" fn() -> *const c_char;

impl Module {
    /// The entry point `name` as the function type `F`.
    pub fn kernel<F: Copy>(&self, name: &str) -> F {
        // SAFETY: every `F` used below is the C signature of the entry point
        // as declared in its .cu file; the library lives as long as the
        // process (it is kept in a static), so the pointer stays valid.
        unsafe { *self.library.get::<F>(name).unwrap_or_else(|e| panic!("{}: no symbol {name}: {e}", self.name)) }
    }

    /// Runs `body` as every thread of the grid: it calls the kernel with its
    /// arguments, and the emulator supplies threadIdx, blockIdx and the rest.
    pub fn launch(&self, launch: Launch, body: &dyn Fn()) {
        extern "C" fn trampoline(argument: *mut c_void) {
            // SAFETY: `argument` is the `&&dyn Fn()` passed to aitl_emu_launch
            // below, which only calls back during the launch.
            let body = unsafe { &*(argument as *const &dyn Fn()) };
            body();
        }
        let run: LaunchFn = self.kernel("aitl_emu_launch");
        let (x, y, z) = launch.grid;
        let argument = &body as *const &dyn Fn() as *mut c_void;
        // SAFETY: the launcher's signature is as declared in shim.h; `body`
        // outlives the call.
        let failed = unsafe { run(trampoline, argument, x, y, z, launch.block, 1, 1, launch.shared_bytes) };
        if failed != 0 {
            let last_error: LastErrorFn = self.kernel("aitl_emu_last_error");
            // SAFETY: the shim returns a NUL-terminated string owned by this thread's state.
            let message = unsafe { CStr::from_ptr(last_error()) }.to_string_lossy().into_owned();
            panic!("{}: launch failed: {message}", self.name);
        }
    }
}

fn manifest_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub fn module(name: &str) -> &'static Module {
    static MODULES: OnceLock<Vec<Module>> = OnceLock::new();
    MODULES.get_or_init(build_modules).iter().find(|m| m.name == name).expect("a known family")
}

/// Newer than every input, so compiling it again would change nothing.
fn is_fresh(library: &Path, inputs: &[PathBuf]) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match modified(library) {
        Some(built) => inputs.iter().all(|i| modified(i).is_some_and(|m| m < built)),
        None => false,
    }
}

/// A family's library, and the compiler building it (into a temporary
/// path) when it was stale.
struct Job {
    name: &'static str,
    library: PathBuf,
    compiling: Option<(Child, PathBuf)>,
}

fn build_modules() -> Vec<Module> {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_emu");
    std::fs::create_dir_all(&out_dir).expect("creates the emulator's build folder");
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let (kernels, shim) = (manifest_path("kernels-cu"), manifest_path("tests/cuda_emu/shim.h"));
    // All stale families compile at once; the two cores overlap them.
    let jobs: Vec<Job> = FAMILIES
        .into_iter()
        .map(|name| {
            let source = kernels.join(format!("{name}.cu"));
            let library = out_dir.join(format!("{name}.so"));
            if is_fresh(&library, &[source.clone(), kernels.join("common.cuh"), shim.clone()]) {
                return Job { name, library, compiling: None };
            }
            // Built under a private name and renamed, so a concurrent run never
            // loads a half-written library.
            let partial = out_dir.join(format!("{name}.{}.so", std::process::id()));
            let child = Command::new(&compiler)
                .args(["-x", "c++", "-std=c++17", "-O2", "-fPIC", "-shared", "-DAITL_EMULATED", "-include"])
                .arg(&shim)
                .arg("-I")
                .arg(&kernels)
                .arg("-o")
                .arg(&partial)
                .arg(&source)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "the emulated CUDA kernel tests need a C++17 compiler, and running `{compiler}` failed: {e}. \
                         Install one (Debian: apt-get install g++) or point CXX at it."
                    )
                });
            Job { name, library, compiling: Some((child, partial)) }
        })
        .collect();
    jobs.into_iter()
        .map(|Job { name, library, compiling }| {
            if let Some((child, partial)) = compiling {
                let output = child.wait_with_output().expect("waits for the compiler");
                assert!(
                    output.status.success(),
                    "compiling kernels-cu/{name}.cu for the emulator failed:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
                std::fs::rename(&partial, &library).expect("moves the library into place");
            }
            // SAFETY: the library was built just now from kernels-cu/ and the
            // shim; loading it runs no code beyond the C++ runtime's set-up.
            let library =
                unsafe { Library::new(&library) }.unwrap_or_else(|e| panic!("loading {}: {e}", library.display()));
            Module { name, library }
        })
        .collect()
}

// ---- inputs and comparisons --------------------------------------------------

pub fn uniform(rng: &mut StdRng, len: usize, low: f32, high: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(low..high)).collect()
}

pub fn tensor(shape: &[usize], data: Vec<f32>) -> Tensor {
    Device::Cpu.tensor(shape, data).expect("shape fits")
}

/// Row offsets as the kernels take them (`cu_seqlens`).
pub fn offsets(lengths: &[usize]) -> Vec<u32> {
    std::iter::once(0)
        .chain(lengths.iter().scan(0u32, |end, &len| {
            *end += len as u32;
            Some(*end)
        }))
        .collect()
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let error = (g - w).abs() / w.abs().max(1.0);
        // Written as a negation so a NaN (an unwritten element) fails.
        if !(error <= F32_TOLERANCE || g == w) {
            panic!("{what}: element {i}: got {g}, want {w} (relative error {error:e} > {F32_TOLERANCE:e})");
        }
    }
}

#[track_caller]
pub fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: got {g}, want {w}");
    }
}

pub fn nan(len: usize) -> Vec<f32> {
    vec![f32::NAN; len]
}

pub fn or_null<T>(slice: Option<&[T]>) -> *const T {
    slice.map_or(std::ptr::null(), |s| s.as_ptr())
}
