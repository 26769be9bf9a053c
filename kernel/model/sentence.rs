//! Sentence embeddings from a sentence-transformers folder: tokenizer
//! (`tokenizer.json`), BERT-family encoder, pooling (`1_Pooling/config.json`:
//! mean or CLS), optional L2 normalisation (`modules.json` lists
//! `Normalize`), truncation at `max_seq_length` (`sentence_bert_config.json`).
//! Mirrors sentence-transformers' `SentenceTransformer.encode`.

use std::path::Path;

use serde::Deserialize;
use tokenizers::Tokenizer;

pub use super::bert::Tokens;
use super::{
    bert::{BertEncoder, EncoderInput, forward_chunks},
    hf_folder::{self, read_json},
};
use crate::{
    backend::{Device, Precision},
    error::{Error, Result},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
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

impl SentenceEmbedder {
    pub fn load(device: &Device, dir: &Path) -> Result<Self> {
        Self::load_in(device, dir, Precision::F32)
    }

    /// Loads with the encoder's matrix products in `precision`.
    pub fn load_in(device: &Device, dir: &Path, precision: Precision) -> Result<Self> {
        let encoder = BertEncoder::load_in(device, dir, precision)?;
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
        let tokenizer = hf_folder::tokenizer(dir, Some(max_seq_length))?;
        let version = hf_folder::model_version(dir)?;
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

    /// Embeds one ragged batch; one vector per input, in input order.
    pub fn embed_tokens(&self, device: &Device, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(batch.len());
        for chunk in forward_chunks(batch) {
            out.extend(self.forward(device, chunk)?);
        }
        Ok(out)
    }

    fn forward(&self, device: &Device, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let input = EncoderInput::of(batch);
        let hidden = self.encoder.forward(device, &input)?;
        let mut pooled = match self.pooling {
            Pooling::Mean => device.mean_pool(&hidden, &input.layout)?,
            Pooling::Cls => device.first_rows(&hidden, &input.layout)?,
        };
        if self.normalize {
            device.l2_normalize(&mut pooled)?;
        }
        let width = pooled.cols();
        Ok(pooled.to_host()?.chunks_exact(width).map(<[f32]>::to_vec).collect())
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
