//! BERT-family encoders (BERT, MiniLM, and the like) from a Hugging Face
//! folder: `config.json` + `model.safetensors`. Follows transformers'
//! `BertModel` (post-LayerNorm blocks, learned absolute positions); the
//! sequence-embedding head (pooling, normalisation) lives in
//! [`crate::model::sentence`].

use std::path::Path;

use serde::Deserialize;

use super::weights::SafetensorsFile;
use crate::{
    backend::{Activation, AttentionShape, Device, Precision, SeqLayout, Tensor},
    error::{Error, Result},
};

#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::NotFound(format!("cannot read {}: {e}", path.display())))?;
        let config: BertConfig =
            serde_json::from_str(&text).map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        if config.hidden_act != "gelu" {
            return Err(Error::InvalidArgument(format!(
                "{}: hidden_act {:?} is not supported (only exact \"gelu\")",
                path.display(),
                config.hidden_act
            )));
        }
        if config.position_embedding_type.as_deref().is_some_and(|p| p != "absolute") {
            return Err(Error::InvalidArgument(format!(
                "{}: only absolute position embeddings are supported",
                path.display()
            )));
        }
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(Error::InvalidArgument(format!(
                "{}: hidden_size must divide into num_attention_heads",
                path.display()
            )));
        }
        Ok(config)
    }
}

struct Norm {
    gamma: Tensor,
    beta: Tensor,
}

struct Layer {
    qkv: (Tensor, Tensor),
    attention_out: (Tensor, Tensor),
    attention_norm: Norm,
    ffn_in: (Tensor, Tensor),
    ffn_out: (Tensor, Tensor),
    output_norm: Norm,
}

/// One sequence as token ids (a text, or a query–passage pair).
#[derive(Debug, Clone)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// Most tokens in one forward pass: activations stay small enough for the
/// allocator to recycle instead of mapping (and faulting in) fresh pages for
/// every op.
pub const FORWARD_TOKENS: usize = 2048;

/// Splits a batch into consecutive runs of at most [`FORWARD_TOKENS`] tokens
/// (a longer single sequence is a run of its own).
pub fn forward_chunks<'a, 'b>(batch: &'a [&'b Tokens]) -> impl Iterator<Item = &'a [&'b Tokens]> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= batch.len() {
            return None;
        }
        let mut end = start + 1;
        let mut tokens = batch[start].ids.len();
        while end < batch.len() && tokens + batch[end].ids.len() <= FORWARD_TOKENS {
            tokens += batch[end].ids.len();
            end += 1;
        }
        let chunk = &batch[start..end];
        start = end;
        Some(chunk)
    })
}

/// Token ids of a ragged batch, ready for the encoder.
#[derive(Debug, Clone)]
pub struct EncoderInput {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub layout: SeqLayout,
}

impl EncoderInput {
    pub fn of(batch: &[&Tokens]) -> Self {
        let lengths: Vec<usize> = batch.iter().map(|t| t.ids.len()).collect();
        EncoderInput {
            ids: batch.iter().flat_map(|t| t.ids.iter().copied()).collect(),
            type_ids: batch.iter().flat_map(|t| t.type_ids.iter().copied()).collect(),
            layout: SeqLayout::from_lengths(&lengths),
        }
    }
}

pub struct BertEncoder {
    config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: Norm,
    layers: Vec<Layer>,
}

impl BertEncoder {
    pub fn load(device: &Device, dir: &Path) -> Result<Self> {
        Self::load_in(device, dir, Precision::F32)
    }

    /// Loads with the four matrix products of each layer in `precision`
    /// (embeddings, norms and attention stay f32).
    pub fn load_in(device: &Device, dir: &Path, precision: Precision) -> Result<Self> {
        let config = BertConfig::read(dir)?;
        let head_dim = config.hidden_size / config.num_attention_heads.max(1);
        if !device.supports_attention(head_dim) {
            return Err(crate::backend::cuda::CudaError::Unsupported {
                op: "attention",
                detail: format!(
                    "{}: heads of {head_dim} on {}; the CUDA attention kernels take 16, 32, 64 or 128 \
                     (device = \"cpu\" serves this model)",
                    dir.display(),
                    device.label()
                ),
            }
            .into());
        }
        let weights = SafetensorsFile::open(&dir.join("model.safetensors"))?;
        let h = config.hidden_size;
        let norm = |prefix: &str| -> Result<Norm> {
            Ok(Norm {
                gamma: weights.tensor(device, &format!("{prefix}.LayerNorm.weight"), &[h])?,
                beta: weights.tensor(device, &format!("{prefix}.LayerNorm.bias"), &[h])?,
            })
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let qkv_names = [
                format!("{p}.attention.self.query"),
                format!("{p}.attention.self.key"),
                format!("{p}.attention.self.value"),
            ];
            let qkv_names: Vec<&str> = qkv_names.iter().map(String::as_str).collect();
            layers.push(Layer {
                qkv: weights.linear_in(device, precision, &qkv_names, h, h)?,
                attention_out: weights.linear_in(device, precision, &[&format!("{p}.attention.output.dense")], h, h)?,
                attention_norm: norm(&format!("{p}.attention.output"))?,
                ffn_in: weights.linear_in(
                    device,
                    precision,
                    &[&format!("{p}.intermediate.dense")],
                    h,
                    config.intermediate_size,
                )?,
                ffn_out: weights.linear_in(
                    device,
                    precision,
                    &[&format!("{p}.output.dense")],
                    config.intermediate_size,
                    h,
                )?,
                output_norm: norm(&format!("{p}.output"))?,
            });
        }
        Ok(BertEncoder {
            word: weights.tensor(device, "embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position: weights.tensor(
                device,
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: weights.tensor(
                device,
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            embedding_norm: norm("embeddings")?,
            layers,
            config,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Hidden states of every token, `[tokens, hidden_size]`.
    pub fn forward(&self, device: &Device, input: &EncoderInput) -> Result<Tensor> {
        // On a thread outside rayon's pool every parallel op is handed to a
        // pool thread while the caller sleeps: two thread switches per op,
        // which for one short query cost more than its arithmetic. Run the
        // pass on a pool thread, where the ops' parallel parts start at once.
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward_in_pool(device, input));
        }
        self.forward_in_pool(device, input)
    }

    fn forward_in_pool(&self, device: &Device, input: &EncoderInput) -> Result<Tensor> {
        let layout = &input.layout;
        let mut positions = Vec::with_capacity(layout.total_tokens());
        for seq in 0..layout.len() {
            let len = layout.range(seq).len();
            if len > self.config.max_position_embeddings {
                return Err(Error::InvalidArgument(format!(
                    "sequence of {len} tokens exceeds the model's {} positions",
                    self.config.max_position_embeddings
                )));
            }
            positions.extend(0..len as u32);
        }
        let eps = self.config.layer_norm_eps as f32;
        let mut x = device.embed_layer_norm(
            &self.word,
            &input.ids,
            &[(&self.position, &positions), (&self.token_type, &input.type_ids)],
            (&self.embedding_norm.gamma, &self.embedding_norm.beta),
            eps,
        )?;
        let shape = AttentionShape {
            heads: self.config.num_attention_heads,
            head_dim: self.config.hidden_size / self.config.num_attention_heads,
        };
        for layer in &self.layers {
            let qkv = device.linear(&x, &layer.qkv.0, Some(&layer.qkv.1), Activation::None)?;
            let context = device.attention(&qkv, layout, shape)?;
            let mut attended =
                device.linear(&context, &layer.attention_out.0, Some(&layer.attention_out.1), Activation::None)?;
            device.add_layer_norm(
                &mut attended,
                Some(&x),
                &layer.attention_norm.gamma,
                &layer.attention_norm.beta,
                eps,
            )?;
            let inner = device.linear(&attended, &layer.ffn_in.0, Some(&layer.ffn_in.1), Activation::Gelu)?;
            let mut out = device.linear(&inner, &layer.ffn_out.0, Some(&layer.ffn_out.1), Activation::None)?;
            device.add_layer_norm(&mut out, Some(&attended), &layer.output_norm.gamma, &layer.output_norm.beta, eps)?;
            x = out;
        }
        Ok(x)
    }
}
