//! Sentence embeddings from a sentence-transformers folder: tokenizer
//! (`tokenizer.json`), BERT-family encoder, pooling (`1_Pooling/config.json`:
//! mean or CLS), optional L2 normalisation (`modules.json` lists
//! `Normalize`), truncation at `max_seq_length` (`sentence_bert_config.json`).
//! Mirrors sentence-transformers' `SentenceTransformer.encode`.

use std::path::Path;

use serde::Deserialize;
use sha2::Digest;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::bert::{BertEncoder, EncoderInput};
use crate::{
    backend::{Device, SeqLayout},
    error::{Error, Result},
};

/// Most tokens in one forward pass (see [`SentenceEmbedder::embed_tokens`]).
pub const FORWARD_TOKENS: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
}

/// One text as token ids.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

pub struct SentenceEmbedder {
    encoder: BertEncoder,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: usize,
    version: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Internal(format!("cannot read {}: {e}", path.display()))),
    }
}

impl SentenceEmbedder {
    pub fn load(device: &Device, dir: &Path) -> Result<Self> {
        let encoder = BertEncoder::load(device, dir)?;
        let modules: Vec<Module> = read_json(&dir.join("modules.json"))?.unwrap_or_default();
        let pooling_dir = modules.iter().find(|m| m.kind.ends_with("Pooling")).map_or("1_Pooling", |m| m.path.as_str());
        let pooling = match read_json::<PoolingConfig>(&dir.join(pooling_dir).join("config.json"))? {
            None => Pooling::Mean,
            Some(p) if p.pooling_mode_max_tokens || p.pooling_mode_mean_sqrt_len_tokens => {
                return Err(Error::InvalidArgument(format!(
                    "{}: only mean and CLS pooling are supported",
                    dir.display()
                )));
            }
            Some(p) if p.pooling_mode_cls_token && !p.pooling_mode_mean_tokens => Pooling::Cls,
            Some(p) if p.pooling_mode_mean_tokens && !p.pooling_mode_cls_token => Pooling::Mean,
            Some(_) => {
                return Err(Error::InvalidArgument(format!(
                    "{}: set exactly one of mean or CLS pooling",
                    dir.display()
                )));
            }
        };
        let normalize = modules.is_empty() || modules.iter().any(|m| m.kind.ends_with("Normalize"));
        let max_positions = encoder.config().max_position_embeddings;
        let max_seq_length = read_json::<SentenceBertConfig>(&dir.join("sentence_bert_config.json"))?
            .and_then(|c| c.max_seq_length)
            .unwrap_or(512)
            .min(max_positions);
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| Error::InvalidArgument(format!("{}/tokenizer.json: {e}", dir.display())))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::InvalidArgument(format!("tokenizer truncation: {e}")))?;
        // Batches are ragged: no padding, ever.
        tokenizer.with_padding(None);
        let version = model_version(dir)?;
        Ok(SentenceEmbedder { encoder, tokenizer, pooling, normalize, max_seq_length, version })
    }

    /// `{folder name}@{first 12 hex digits of the weights' SHA-256}`: names
    /// the exact weights, so annotations are attributed to what served them.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn dimension(&self) -> usize {
        self.encoder.config().hidden_size
    }

    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    pub fn tokenize(&self, text: &str) -> Result<Tokens> {
        let encoding =
            self.tokenizer.encode(text, true).map_err(|e| Error::InvalidArgument(format!("tokenizer: {e}")))?;
        Ok(Tokens { ids: encoding.get_ids().to_vec(), type_ids: encoding.get_type_ids().to_vec() })
    }

    /// Embeds one ragged batch; one vector per input, in input order. Runs
    /// forward passes of at most [`FORWARD_TOKENS`] tokens: activations stay
    /// small enough for the allocator to recycle instead of mapping (and
    /// faulting in) fresh pages for every op.
    pub fn embed_tokens(&self, device: &Device, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(batch.len());
        let mut start = 0;
        while start < batch.len() {
            let mut end = start + 1;
            let mut tokens = batch[start].ids.len();
            while end < batch.len() && tokens + batch[end].ids.len() <= FORWARD_TOKENS {
                tokens += batch[end].ids.len();
                end += 1;
            }
            out.extend(self.forward(device, &batch[start..end])?);
            start = end;
        }
        Ok(out)
    }

    fn forward(&self, device: &Device, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let lengths: Vec<usize> = batch.iter().map(|t| t.ids.len()).collect();
        let input = EncoderInput {
            ids: batch.iter().flat_map(|t| t.ids.iter().copied()).collect(),
            type_ids: batch.iter().flat_map(|t| t.type_ids.iter().copied()).collect(),
            layout: SeqLayout::from_lengths(&lengths),
        };
        let hidden = self.encoder.forward(device, &input)?;
        let mut pooled = match self.pooling {
            Pooling::Mean => device.mean_pool(&hidden, &input.layout)?,
            Pooling::Cls => device.first_rows(&hidden, &input.layout)?,
        };
        if self.normalize {
            device.l2_normalize(&mut pooled);
        }
        let width = pooled.cols();
        Ok(pooled.to_host().chunks_exact(width).map(<[f32]>::to_vec).collect())
    }

    /// Tokenizes and embeds texts, grouping similar lengths into batches of
    /// at most `token_budget` tokens.
    pub fn embed(&self, device: &Device, texts: &[&str], token_budget: usize) -> Result<Vec<Vec<f32>>> {
        let tokens: Vec<Tokens> = texts.iter().map(|t| self.tokenize(t)).collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| tokens[i].ids.len());
        let mut out = vec![Vec::new(); texts.len()];
        let mut start = 0;
        while start < order.len() {
            let mut end = start;
            let mut used = 0;
            while end < order.len() && (end == start || used + tokens[order[end]].ids.len() <= token_budget) {
                used += tokens[order[end]].ids.len();
                end += 1;
            }
            let batch: Vec<&Tokens> = order[start..end].iter().map(|&i| &tokens[i]).collect();
            for (vector, &i) in self.embed_tokens(device, &batch)?.into_iter().zip(&order[start..end]) {
                out[i] = vector;
            }
            start = end;
        }
        Ok(out)
    }
}

fn model_version(dir: &Path) -> Result<String> {
    let weights = dir.join("model.safetensors");
    let mut file = std::fs::File::open(&weights).map_err(|e| Error::NotFound(format!("{}: {e}", weights.display())))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::Internal(format!("{}: {e}", weights.display())))?;
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    Ok(format!("{name}@{hex}"))
}
