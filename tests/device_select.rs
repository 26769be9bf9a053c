//! Choosing the device: `auto` takes a GPU only when one answers and its
//! kernels compile, `cuda` fails with a reason a person can act on, and a
//! server told to use a GPU it does not have refuses to start instead of
//! panicking. On a machine without libcuda (CI) this checks the CPU
//! fallback; on a GPU machine the same tests check the GPU is taken.

mod common;

use aitl::backend::{
    Device, DeviceChoice,
    cuda::{CudaError, KernelCache, Probe, probe},
};
use aitl::error::Error;

fn cache() -> (tempfile::TempDir, KernelCache) {
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::new(dir.path().join("kernels"));
    (dir, cache)
}

#[test]
fn probing_never_panics_and_auto_follows_it() {
    let (_dir, cache) = cache();
    let probed = probe();
    let (device, why) = Device::select(DeviceChoice::Auto, &cache).unwrap();
    common::say(&format!("probe: {probed:?}; auto chose {} because {why}", device.label()));
    match probed {
        Probe::Missing(reason) => {
            assert!(matches!(device, Device::Cpu));
            assert!(why.contains(&reason), "the log line gives the reason: {why}");
            assert!(!reason.is_empty());
        }
        Probe::Gpus(gpus) => {
            assert!(!gpus.is_empty());
            assert!(gpus.iter().all(|g| g.compute_capability.0 >= 5 && g.memory_bytes > 0), "{gpus:?}");
            // Auto may still fall back (a kernel that does not compile), and says so.
            match &device {
                Device::Cuda(gpu) => assert_eq!(gpu.info(), &gpus[0]),
                Device::Cpu => assert!(why.contains("could not be used"), "{why}"),
            }
        }
    }
}

#[test]
fn cuda_without_a_gpu_is_unavailable_with_the_reason() {
    let (_dir, cache) = cache();
    let choice = match probe() {
        // No GPU here: GPU 0 is missing.
        Probe::Missing(_) => DeviceChoice::Cuda(0),
        // A GPU machine: one past the last GPU is missing.
        Probe::Gpus(gpus) => DeviceChoice::Cuda(gpus.len()),
    };
    let err = Device::select(choice, &cache).err().expect("no such GPU");
    let message = err.to_string();
    assert!(matches!(err, Error::Cuda(CudaError::Unavailable(_))), "{err:?}");
    assert!(message.starts_with("CUDA is not available: "), "{message}");
    assert!(message.contains("libcuda") || message.contains("no GPU"), "names what is missing: {message}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    // Never the CPU in disguise, and the cache stays empty.
    assert!(!cache.dir().join("x").exists());
}

#[test]
fn the_setting_parses_from_config_files() {
    let config: aitl::config::Config = toml::from_str("device = \"cuda:1\"").unwrap();
    assert_eq!(config.device, DeviceChoice::Cuda(1));
    assert_eq!(aitl::config::Config::default().device, DeviceChoice::Auto);
    let err = toml::from_str::<aitl::config::Config>("device = \"gpu\"").unwrap_err().to_string();
    assert!(err.contains("cuda:N"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_asked_for_a_missing_gpu_refuses_to_start() {
    if let Probe::Gpus(gpus) = probe() {
        common::say(&format!(
            "a_server_asked_for_a_missing_gpu: {} GPUs here, asking for cuda:{}",
            gpus.len(),
            gpus.len()
        ));
    }
    let missing = match probe() {
        Probe::Missing(_) => 0,
        Probe::Gpus(gpus) => gpus.len(),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config_with_embedder(dir.path());
    config.device = DeviceChoice::Cuda(missing);
    let err = aitl::server::start(config).await.err().expect("the server must not start").to_string();
    assert!(err.contains("CUDA is not available"), "{err}");
}
