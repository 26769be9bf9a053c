//! Reading a Hugging Face / sentence-transformers model folder: optional JSON
//! side files, the tokenizer, and the version string that names the weights.

use std::path::Path;

use serde::Deserialize;
use sha2::Digest;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

/// A JSON file of the folder, or None when it is absent.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Internal(format!("cannot read {}: {e}", path.display()))),
    }
}

/// `tokenizer.json`, truncating at `max_length` (if given) and never
/// padding: batches are ragged.
pub fn tokenizer(dir: &Path, max_length: Option<usize>) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| Error::InvalidArgument(format!("{}/tokenizer.json: {e}", dir.display())))?;
    let truncation = max_length.map(|max_length| TruncationParams {
        max_length,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
        direction: TruncationDirection::Right,
    });
    tokenizer.with_truncation(truncation).map_err(|e| Error::InvalidArgument(format!("tokenizer truncation: {e}")))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// `{folder name}@{first 12 hex digits of the weights' SHA-256}`: names the
/// exact weights, so annotations are attributed to what served them.
pub fn model_version(dir: &Path) -> Result<String> {
    let hex = digest_prefix(&dir.join("model.safetensors"))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    Ok(format!("{name}@{hex}"))
}

/// The first 12 hex digits of a file's SHA-256.
pub fn digest_prefix(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::NotFound(format!("{}: {e}", path.display())))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    Ok(hasher.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect())
}
