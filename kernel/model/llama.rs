//! Llama-family decoders (Llama, SmolLM2, Mistral; Mixtral's experts to
//! come as a second `FeedForward` variant): RMSNorm, rotary embeddings,
//! grouped-query attention over a KV cache the caller owns, SwiGLU. Weights
//! from GGUF stay in their block format and are multiplied in place. Follows
//! llama.cpp's `llm_build_llama` graph.

use super::gguf::GgufFile;
use crate::{
    backend::{AttentionShape, Device, KvLayer, QuantMatrix, RopeStyle, Tensor, quant::GgmlType},
    error::{Error, Result},
};

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_base: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
}

impl LlamaConfig {
    fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.meta_str("general.architecture")?;
        if arch != "llama" {
            return Err(Error::InvalidArgument(format!(
                "{}: architecture {arch:?}; aitl's decoder reads llama-family GGUF files",
                file.path()
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = file.meta_u64(&key("embedding_length"))? as usize;
        let heads = file.meta_u64(&key("attention.head_count"))? as usize;
        let kv_heads = file.meta_u64(&key("attention.head_count_kv")).unwrap_or(heads as u64) as usize;
        if heads == 0 || kv_heads == 0 || !hidden.is_multiple_of(heads) || !heads.is_multiple_of(kv_heads) {
            return Err(Error::InvalidArgument(format!(
                "{}: {heads} heads, {kv_heads} KV heads and width {hidden} do not fit together",
                file.path()
            )));
        }
        let head_dim = hidden / heads;
        if let Ok(rope_dims) = file.meta_u64(&key("rope.dimension_count"))
            && rope_dims as usize != head_dim
        {
            return Err(Error::InvalidArgument(format!(
                "{}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported",
                file.path()
            )));
        }
        let vocab = file.info("token_embd.weight")?.dims[1];
        Ok(LlamaConfig {
            hidden,
            layers: file.meta_u64(&key("block_count"))? as usize,
            heads,
            kv_heads,
            head_dim,
            ffn: file.meta_u64(&key("feed_forward_length"))? as usize,
            vocab,
            context: file.meta_u64(&key("context_length"))? as usize,
            rope_base: file.meta_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            rope_style: RopeStyle::Normal,
            rms_eps: file.meta_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
        })
    }
}

/// Several projections of the same input: one stacked matrix when they
/// share a type (one pass over the input, one fork-join), else apart.
enum Projection {
    Fused { matrix: QuantMatrix, widths: Vec<usize> },
    Apart(Vec<QuantMatrix>),
}

impl Projection {
    fn new(parts: Vec<QuantMatrix>) -> Result<Self> {
        if parts.windows(2).all(|p| p[0].dtype() == p[1].dtype()) {
            let widths = parts.iter().map(|p| p.dims().1).collect();
            Ok(Projection::Fused { matrix: QuantMatrix::concat_outputs(parts)?, widths })
        } else {
            Ok(Projection::Apart(parts))
        }
    }

    fn apply(&self, device: &Device, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Projection::Fused { matrix, widths } => device.linear_quantized(x, matrix)?.split_columns(widths),
            Projection::Apart(parts) => parts.iter().map(|p| device.linear_quantized(x, p)).collect(),
        }
    }

    fn dtype(&self) -> GgmlType {
        match self {
            Projection::Fused { matrix, .. } => matrix.dtype(),
            Projection::Apart(parts) => parts[0].dtype(),
        }
    }
}

struct Attention {
    /// Q, K, V.
    qkv: Projection,
    o: QuantMatrix,
}

enum FeedForward {
    Dense { gate_up: Projection, down: QuantMatrix },
}

struct Block {
    attention_norm: Tensor,
    attention: Attention,
    ffn_norm: Tensor,
    ffn: FeedForward,
}

/// A sequence's KV cache: one [`KvLayer`] per block.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<KvLayer>,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvLayer::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(len));
    }
}

/// One sequence's part of a forward step: its new tokens and its cache.
pub struct Step<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

pub struct Llama {
    config: LlamaConfig,
    embeddings: QuantMatrix,
    blocks: Vec<Block>,
    output_norm: Tensor,
    /// The output projection; None when tied to the embeddings.
    output: Option<QuantMatrix>,
}

fn matrix(device: &Device, file: &GgufFile, name: &str, k: usize, n: usize) -> Result<QuantMatrix> {
    let info = file.info(name)?;
    if info.dims != [k, n] {
        return Err(Error::InvalidArgument(format!(
            "{}: {name} has dims {:?}, the metadata implies [{k}, {n}]",
            file.path(),
            info.dims
        )));
    }
    device.quant_matrix(info.dtype, k, n, file.bytes(name)?.to_vec())
}

fn vector(device: &Device, file: &GgufFile, name: &str, width: usize) -> Result<Tensor> {
    let info = file.info(name)?;
    if info.dims != [width] {
        return Err(Error::InvalidArgument(format!(
            "{}: {name} has dims {:?}, expected [{width}]",
            file.path(),
            info.dims
        )));
    }
    let mut values = vec![0f32; width];
    crate::backend::quant::dequantize_row(info.dtype, file.bytes(name)?, &mut values);
    device.tensor(&[width], values)
}

impl Llama {
    pub fn from_gguf(device: &Device, file: &GgufFile) -> Result<Self> {
        let config = LlamaConfig::from_gguf(file)?;
        let (h, kv) = (config.hidden, config.kv_heads * config.head_dim);
        let blocks = (0..config.layers)
            .map(|l| {
                let name = |part: &str| format!("blk.{l}.{part}.weight");
                if file.info(&name("ffn_gate_inp")).is_ok() {
                    return Err(Error::InvalidArgument(format!(
                        "{}: block {l} is a mixture of experts; the MoE feed-forward is not loaded from GGUF yet",
                        file.path()
                    )));
                }
                Ok(Block {
                    attention_norm: vector(device, file, &name("attn_norm"), h)?,
                    attention: Attention {
                        qkv: Projection::new(vec![
                            matrix(device, file, &name("attn_q"), h, h)?,
                            matrix(device, file, &name("attn_k"), h, kv)?,
                            matrix(device, file, &name("attn_v"), h, kv)?,
                        ])?,
                        o: matrix(device, file, &name("attn_output"), h, h)?,
                    },
                    ffn_norm: vector(device, file, &name("ffn_norm"), h)?,
                    ffn: FeedForward::Dense {
                        gate_up: Projection::new(vec![
                            matrix(device, file, &name("ffn_gate"), h, config.ffn)?,
                            matrix(device, file, &name("ffn_up"), h, config.ffn)?,
                        ])?,
                        down: matrix(device, file, &name("ffn_down"), config.ffn, h)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output = match file.info("output.weight") {
            Ok(_) => Some(matrix(device, file, "output.weight", h, config.vocab)?),
            Err(_) => None,
        };
        Ok(Llama {
            embeddings: matrix(device, file, "token_embd.weight", h, config.vocab)?,
            output_norm: vector(device, file, "output_norm.weight", h)?,
            blocks,
            output,
            config,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.config.layers)
                .map(|_| KvLayer::new(self.config.kv_heads * self.config.head_dim))
                .collect(),
        }
    }

    /// Runs each sequence's new tokens through the model, appending to its
    /// cache; returns the logits at each sequence's last new position. All
    /// sequences' tokens share every matrix product.
    pub fn forward(&self, device: &Device, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for step in steps.iter() {
            if step.tokens.is_empty() {
                return Err(Error::Internal("a forward step needs at least one token".into()));
            }
            let past = step.cache.len();
            if past + step.tokens.len() > c.context {
                return Err(Error::InvalidArgument(format!(
                    "the sequence would reach {} tokens; the model's context is {}",
                    past + step.tokens.len(),
                    c.context
                )));
            }
            if let Some(&bad) = step.tokens.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(Error::InvalidArgument(format!("token id {bad} is outside the vocabulary of {}", c.vocab)));
            }
            ids.extend_from_slice(step.tokens);
            positions.extend((past..past + step.tokens.len()).map(|p| p as u32));
        }
        let rows: Vec<f32> = ids.iter().flat_map(|&id| self.embeddings.dequantize_row(id as usize)).collect();
        let mut x = device.tensor(&[ids.len(), c.hidden], rows)?;
        let shape = AttentionShape { heads: c.heads, head_dim: c.head_dim };
        for (l, block) in self.blocks.iter().enumerate() {
            let normed = device.rms_norm(&x, &block.attention_norm, c.rms_eps)?;
            let mut qkv = block.attention.qkv.apply(device, &normed)?.into_iter();
            let (Some(mut q), Some(mut k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                return Err(Error::Internal("the QKV projection gave fewer than three parts".into()));
            };
            device.rope(&mut q, &positions, c.head_dim, c.rope_base, c.rope_style)?;
            device.rope(&mut k, &positions, c.head_dim, c.rope_base, c.rope_style)?;
            let mut attended = Vec::with_capacity(ids.len() * c.hidden);
            let mut start = 0;
            for step in steps.iter_mut() {
                let rows = start..start + step.tokens.len();
                let cache = &mut step.cache.layers[l];
                let past = cache.len();
                cache.append(&k.slice_rows(rows.clone())?, &v.slice_rows(rows.clone())?)?;
                let out = device.cached_attention(&q.slice_rows(rows.clone())?, cache, past, shape, c.kv_heads)?;
                attended.extend(out.to_host());
                start = rows.end;
            }
            let attended = device.tensor(&[ids.len(), c.hidden], attended)?;
            let projected = device.linear_quantized(&attended, &block.attention.o)?;
            device.add(&mut x, &projected)?;
            let normed = device.rms_norm(&x, &block.ffn_norm, c.rms_eps)?;
            let ffn_out = match &block.ffn {
                FeedForward::Dense { gate_up, down } => {
                    let mut parts = gate_up.apply(device, &normed)?.into_iter();
                    let (Some(mut g), Some(u)) = (parts.next(), parts.next()) else {
                        return Err(Error::Internal("the gate/up projection gave fewer than two parts".into()));
                    };
                    device.silu_mul(&mut g, &u)?;
                    device.linear_quantized(&g, down)?
                }
            };
            device.add(&mut x, &ffn_out)?;
        }
        // Only the last position of each sequence needs logits.
        let mut last = Vec::with_capacity(steps.len() * c.hidden);
        let mut end = 0;
        for step in steps.iter() {
            end += step.tokens.len();
            last.extend(x.slice_rows(end - 1..end)?.to_host());
        }
        let last = device.tensor(&[steps.len(), c.hidden], last)?;
        let normed = device.rms_norm(&last, &self.output_norm, c.rms_eps)?;
        let logits = device.linear_quantized(&normed, self.output.as_ref().unwrap_or(&self.embeddings))?;
        Ok(logits.to_host().chunks_exact(c.vocab).map(<[f32]>::to_vec).collect())
    }

    /// The weight type most of the model is stored in (for versions and logs).
    pub fn main_type(&self) -> GgmlType {
        self.blocks.first().map_or(self.embeddings.dtype(), |b| b.attention.qkv.dtype())
    }
}
