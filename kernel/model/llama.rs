//! Llama-family decoders (Llama, SmolLM2, Mistral, Mixtral): RMSNorm,
//! rotary embeddings, grouped-query attention over a KV cache the caller
//! owns, and per block a SwiGLU feed-forward that is either dense or a
//! mixture of experts. Weights come from GGUF (kept in their block format and
//! multiplied in place) or from a Hugging Face safetensors checkpoint; both
//! go through [`DecoderWeights`], so the model is written once. Follows
//! llama.cpp's `llm_build_llama` graph and transformers' `LlamaModel`.

use std::path::Path;

use serde::Deserialize;

use super::{
    checkpoint::{DecoderWeights, HfCheckpoint, WithPrefill},
    gguf::GgufFile,
    lora::{BlockAdapter, LoraAdapter, LoraPair},
    moe::{MixtureOfExperts, MoeConfig},
};
use crate::{
    backend::{
        AttentionShape, CachedRows, Device, KvLayer, Precision, QuantMatrix, RopeStyle, Tensor, cuda::paged_kv::KvPool,
        quant::GgmlType,
    },
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
    /// Every block's feed-forward is a mixture of experts.
    pub moe: Option<MoeConfig>,
    /// Q, K and V have biases (Qwen).
    pub qkv_bias: bool,
    /// The output projection is the token embeddings.
    pub tied_embeddings: bool,
}

impl LlamaConfig {
    fn check(self, origin: &str) -> Result<Self> {
        let fits = self.heads > 0
            && self.kv_heads > 0
            && self.heads.is_multiple_of(self.kv_heads)
            && self.head_dim > 0
            && self.head_dim.is_multiple_of(2);
        if !fits {
            return Err(Error::InvalidArgument(format!(
                "{origin}: {} heads of {} dims with {} KV heads do not fit together",
                self.heads, self.head_dim, self.kv_heads
            )));
        }
        Ok(self)
    }

    pub(crate) fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.meta_str("general.architecture")?;
        if arch != "llama" {
            return Err(Error::InvalidArgument(format!(
                "{}: architecture {arch:?}; aitl's decoder reads llama-family GGUF files",
                file.path()
            )));
        }
        if file.has("rope_freqs") {
            return Err(Error::InvalidArgument(format!(
                "{}: scaled rotary embeddings (rope_freqs, as Llama 3.1 uses) are not supported",
                file.path()
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = file.meta_u64(&key("embedding_length"))? as usize;
        let heads = file.meta_u64(&key("attention.head_count"))? as usize;
        let kv_heads = file.meta_u64(&key("attention.head_count_kv")).unwrap_or(heads as u64) as usize;
        let head_dim = match file.meta_u64(&key("attention.key_length")) {
            Ok(d) => d as usize,
            Err(_) if heads > 0 => hidden / heads,
            Err(e) => return Err(e),
        };
        if let Ok(rope_dims) = file.meta_u64(&key("rope.dimension_count"))
            && rope_dims as usize != head_dim
        {
            return Err(Error::InvalidArgument(format!(
                "{}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported",
                file.path()
            )));
        }
        let moe = match file.meta_u64(&key("expert_count")) {
            Ok(experts) if experts > 0 => Some(MoeConfig::new(
                experts as usize,
                file.meta_u64(&key("expert_used_count"))? as usize,
                // llama.cpp renormalises the chosen weights for llama-architecture MoE (Mixtral).
                true,
                file.path(),
            )?),
            _ => None,
        };
        LlamaConfig {
            hidden,
            layers: file.meta_u64(&key("block_count"))? as usize,
            heads,
            kv_heads,
            head_dim,
            ffn: file.meta_u64(&key("feed_forward_length"))? as usize,
            vocab: file.info("token_embd.weight")?.dims[1],
            context: file.meta_u64(&key("context_length"))? as usize,
            rope_base: file.meta_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            // GGUF converters permute Q and K rows for adjacent-pair rotation.
            rope_style: RopeStyle::Normal,
            rms_eps: file.meta_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            moe,
            // Checked per block at load: a llama GGUF has no biases.
            qkv_bias: false,
            tied_embeddings: !file.has("output"),
        }
        .check(file.path())
    }

    pub(crate) fn from_hf(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let origin = path.display().to_string();
        let c: HfConfig = super::hf_folder::read_json(&path)?
            .ok_or_else(|| Error::NotFound(format!("{origin} is missing: not a Hugging Face model folder")))?;
        let bad = |why: String| Err(Error::InvalidArgument(format!("{origin}: {why}")));
        let qwen_moe = c.model_type == "qwen2_moe";
        if !matches!(c.model_type.as_str(), "llama" | "mistral" | "mixtral" | "qwen2_moe") {
            return bad(format!(
                "model_type {:?}; aitl reads llama, mistral, mixtral and qwen2_moe checkpoints",
                c.model_type
            ));
        }
        if qwen_moe && (c.decoder_sparse_step.is_some_and(|s| s != 1) || !c.mlp_only_layers.is_empty()) {
            return bad("Qwen-MoE with dense layers between sparse ones (decoder_sparse_step, mlp_only_layers) \
                 is not supported"
                .into());
        }
        if c.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            return bad(format!("hidden_act {:?}; Llama-family SwiGLU uses silu", c.hidden_act));
        }
        if c.attention_bias || c.mlp_bias {
            return bad("attention or MLP biases are not part of the Llama layout aitl reads".into());
        }
        let rope_type = c.rope_parameters.as_ref().and_then(|r| r.rope_type.clone()).or_else(|| {
            c.rope_scaling.as_ref().and_then(|s| s.get("rope_type").or(s.get("type"))?.as_str().map(str::to_owned))
        });
        if rope_type.as_deref().is_some_and(|t| t != "default") {
            return bad(format!("rotary scaling {rope_type:?} is not supported (only the default rotary embeddings)"));
        }
        let rope_base = c.rope_parameters.as_ref().and_then(|r| r.rope_theta).or(c.rope_theta).unwrap_or(10_000.0);
        let heads = c.num_attention_heads;
        let moe = match (c.num_local_experts.or(c.num_experts), c.num_experts_per_tok) {
            // Mixtral renormalises the chosen experts' weights; Qwen-MoE only if norm_topk_prob.
            (Some(experts), Some(used)) => {
                let mut moe = MoeConfig::new(experts, used, c.norm_topk_prob.unwrap_or(!qwen_moe), &origin)?;
                moe.shared_ffn = c.shared_expert_intermediate_size.filter(|&w| w > 0);
                Some(moe)
            }
            _ => None,
        };
        LlamaConfig {
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads,
            kv_heads: c.num_key_value_heads.unwrap_or(heads),
            head_dim: c.head_dim.unwrap_or(if heads > 0 { c.hidden_size / heads } else { 0 }),
            ffn: match &moe {
                Some(_) => c.moe_intermediate_size.unwrap_or(c.intermediate_size),
                None => c.intermediate_size,
            },
            vocab: c.vocab_size,
            // Attention is over the whole context: a sliding window (Mistral)
            // bounds the context instead of being emulated.
            context: match c.sliding_window {
                Some(w) if w > 0 && c.use_sliding_window != Some(false) => w.min(c.max_position_embeddings),
                _ => c.max_position_embeddings,
            },
            rope_base: rope_base as f32,
            // Hugging Face keeps Q and K unpermuted and rotates halves.
            rope_style: RopeStyle::Neox,
            rms_eps: c.rms_norm_eps as f32,
            moe,
            qkv_bias: c.qkv_bias.unwrap_or(qwen_moe),
            tied_embeddings: c.tie_word_embeddings,
        }
        .check(&origin)
    }
}

/// The parts of a transformers Llama/Mistral/Mixtral `config.json` aitl reads.
#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    /// transformers 4.
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5.
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    tie_word_embeddings: bool,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    /// Qwen-MoE's names and options.
    num_experts: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    qkv_bias: Option<bool>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
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
            Projection::Fused { matrix, widths } => device.split_columns(&device.linear_quantized(x, matrix)?, widths),
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
    /// Q, K and V biases, when the model has them.
    bias: Option<[Tensor; 3]>,
    o: QuantMatrix,
}

/// SwiGLU: `down(silu(gate · x) ⊙ up · x)`.
pub(super) struct DenseFeedForward {
    gate_up: Projection,
    down: QuantMatrix,
}

impl DenseFeedForward {
    /// Block `layer`'s `ffn_{gate,up,down}{suffix}` (suffix "" for the dense
    /// feed-forward, "shexp" for Qwen-MoE's shared expert).
    pub(super) fn load(
        device: &Device,
        weights: &dyn DecoderWeights,
        layer: usize,
        suffix: &str,
        hidden: usize,
        ffn: usize,
    ) -> Result<Self> {
        let sep = if suffix.is_empty() { "" } else { "_" };
        let matrix = |part: &str, k, n| weights.matrix(device, &format!("blk.{layer}.{part}{sep}{suffix}"), k, n);
        Ok(DenseFeedForward {
            gate_up: Projection::new(vec![matrix("ffn_gate", hidden, ffn)?, matrix("ffn_up", hidden, ffn)?])?,
            down: matrix("ffn_down", ffn, hidden)?,
        })
    }

    pub(super) fn forward(&self, device: &Device, x: &Tensor) -> Result<Tensor> {
        self.forward_adapted(device, x, None)
    }

    /// [`DenseFeedForward::forward`] with a block's LoRA updates of gate,
    /// up and down.
    fn forward_adapted(&self, device: &Device, x: &Tensor, adapter: Option<&BlockAdapter>) -> Result<Tensor> {
        let mut parts = self.gate_up.apply(device, x)?.into_iter();
        let (Some(mut g), Some(mut u)) = (parts.next(), parts.next()) else {
            return Err(Error::Internal("the gate/up projection gave fewer than two parts".into()));
        };
        if let Some(adapter) = adapter {
            add_delta(device, &mut g, adapter.gate.as_ref(), x)?;
            add_delta(device, &mut u, adapter.up.as_ref(), x)?;
        }
        device.silu_mul(&mut g, &u)?;
        let mut out = device.linear_quantized(&g, &self.down)?;
        add_delta(device, &mut out, adapter.and_then(|a| a.down.as_ref()), &g)?;
        Ok(out)
    }
}

/// `y += scale·(x·Aᵀ)·Bᵀ` where the projection is adapted.
fn add_delta(device: &Device, y: &mut Tensor, pair: Option<&LoraPair>, x: &Tensor) -> Result<()> {
    match pair {
        Some(pair) => device.add(y, &pair.delta(device, x)?),
        None => Ok(()),
    }
}

enum FeedForward {
    Dense(DenseFeedForward),
    Moe(Box<MixtureOfExperts>),
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

/// Prompts (32 rows or more) against block-quantized weights run on bf16
/// matrix tiles where the processor has them (Intel AMX; elsewhere the block
/// arithmetic), with a blocked attention: about 3× llama.cpp's prefill here,
/// within the golden test's tolerance of its logits (tests/decoder_golden.rs).
/// `Precision::F32` keeps llama.cpp's arithmetic to the bit.
pub const DEFAULT_PREFILL: Precision = Precision::Bf16;

/// Prompt tokens a serving engine prefills between two decode steps.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// A decoder: its base weights, shared by every [`Llama`] made from them,
/// and optionally a LoRA adapter applied unmerged.
pub struct Llama {
    base: std::sync::Arc<Weights>,
    adapter: Option<std::sync::Arc<LoraAdapter>>,
}

struct Weights {
    config: LlamaConfig,
    embeddings: QuantMatrix,
    blocks: Vec<Block>,
    output_norm: Tensor,
    /// The output projection; None when tied to the embeddings.
    output: Option<QuantMatrix>,
    /// F32: llama.cpp's arithmetic throughout (block products, ggml's
    /// attention order); Bf16: prompts on the faster kernels.
    prefill: Precision,
    /// On a GPU, each layer's pool of KV pages that every sequence's cache
    /// draws from; empty on the CPU (each cache owns its rows).
    kv_pools: Vec<std::sync::Arc<KvPool>>,
}

/// Positions of KV cache a GPU decoder keeps for all its sequences at once:
/// sixteen full contexts, within a quarter of the GPU's memory.
fn kv_pool_positions(gpu: &crate::backend::cuda::CudaDevice, config: &LlamaConfig) -> usize {
    let width = config.kv_heads * config.head_dim;
    let budget = gpu.info().memory_bytes / 4 / config.layers.max(1);
    (16 * config.context).min(KvPool::positions_in(budget, width))
}

/// A handle on a decoder's base weights that does not keep them alive.
pub struct SharedBase(std::sync::Weak<Weights>);

impl SharedBase {
    /// The base, without an adapter, while some decoder still uses it.
    pub fn upgrade(&self) -> Option<Llama> {
        self.0.upgrade().map(|base| Llama { base, adapter: None })
    }
}

impl From<Weights> for Llama {
    fn from(base: Weights) -> Self {
        Llama { base: std::sync::Arc::new(base), adapter: None }
    }
}

impl Llama {
    /// A llama-architecture GGUF file (dense or mixture of experts), with
    /// prompts in [`DEFAULT_PREFILL`].
    pub fn from_gguf(device: &Device, file: &GgufFile) -> Result<Self> {
        Self::from_gguf_in(device, file, DEFAULT_PREFILL)
    }

    /// As [`Llama::from_gguf`], with prompts' products in `prefill`.
    pub fn from_gguf_in(device: &Device, file: &GgufFile, prefill: Precision) -> Result<Self> {
        Self::load(device, &WithPrefill { weights: file, prefill }, LlamaConfig::from_gguf(file)?, prefill)
    }

    /// A Hugging Face folder: `config.json` and safetensors weights
    /// (`LlamaForCausalLM`, `MistralForCausalLM`, `MixtralForCausalLM`).
    pub fn from_hf_folder(device: &Device, dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_hf(dir)?;
        // Float weights: products stay f32 whatever the prefill precision.
        Self::load(device, &HfCheckpoint::open(dir)?, config, DEFAULT_PREFILL)
    }

    fn load(device: &Device, weights: &dyn DecoderWeights, config: LlamaConfig, prefill: Precision) -> Result<Self> {
        let (h, q, kv) = (config.hidden, config.heads * config.head_dim, config.kv_heads * config.head_dim);
        let blocks = (0..config.layers)
            .map(|l| {
                let name = |part: &str| format!("blk.{l}.{part}");
                let matrix = |part: &str, k, n| weights.matrix(device, &name(part), k, n);
                let ffn = match config.moe {
                    Some(moe) => {
                        FeedForward::Moe(Box::new(MixtureOfExperts::load(device, weights, l, moe, h, config.ffn)?))
                    }
                    None if weights.has(&name("ffn_gate_inp")) => {
                        return Err(Error::InvalidArgument(format!(
                            "{}: block {l} has a router but the metadata names no experts",
                            weights.origin()
                        )));
                    }
                    None => FeedForward::Dense(DenseFeedForward::load(device, weights, l, "", h, config.ffn)?),
                };
                let bias = |part: &str, width| weights.bias(device, &name(part), width);
                let bias = match (bias("attn_q", q)?, bias("attn_k", kv)?, bias("attn_v", kv)?) {
                    (Some(bq), Some(bk), Some(bv)) => Some([bq, bk, bv]),
                    (None, None, None) if !config.qkv_bias => None,
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "{}: block {l} has some but not all of the Q, K and V biases, or none though the \
                             config names them",
                            weights.origin()
                        )));
                    }
                };
                Ok(Block {
                    attention_norm: weights.vector(device, &name("attn_norm"), h)?,
                    attention: Attention {
                        qkv: Projection::new(vec![
                            matrix("attn_q", h, q)?,
                            matrix("attn_k", h, kv)?,
                            matrix("attn_v", h, kv)?,
                        ])?,
                        bias,
                        o: matrix("attn_output", q, h)?,
                    },
                    ffn_norm: weights.vector(device, &name("ffn_norm"), h)?,
                    ffn,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output = match config.tied_embeddings {
            true => None,
            false => Some(weights.matrix(device, "output", h, config.vocab)?),
        };
        Ok(Llama::from(Weights {
            embeddings: weights.matrix(device, "token_embd", h, config.vocab)?,
            output_norm: weights.vector(device, "output_norm", h)?,
            blocks,
            output,
            kv_pools: match device {
                Device::Cpu => Vec::new(),
                Device::Cuda(gpu) => {
                    let (positions, width) = (kv_pool_positions(gpu, &config), config.kv_heads * config.head_dim);
                    (0..config.layers)
                        .map(|_| KvPool::new(gpu, positions, width))
                        .collect::<std::result::Result<_, _>>()?
                }
            },
            config,
            prefill,
        }))
    }

    /// The same base weights (shared, not copied) with `adapter` applied.
    pub fn with_adapter(&self, adapter: std::sync::Arc<LoraAdapter>) -> Result<Llama> {
        if adapter.blocks.len() != self.base.config.layers {
            return Err(Error::InvalidArgument(format!(
                "the adapter has {} blocks; the base has {}",
                adapter.blocks.len(),
                self.base.config.layers
            )));
        }
        Ok(Llama { base: self.base.clone(), adapter: Some(adapter) })
    }

    /// A handle on the base weights, to share them with later decoders.
    pub fn share(&self) -> SharedBase {
        SharedBase(std::sync::Arc::downgrade(&self.base))
    }

    /// Whether `other` runs over the very same base weights (not a copy).
    pub fn shares_base_with(&self, other: &Llama) -> bool {
        std::sync::Arc::ptr_eq(&self.base, &other.base)
    }

    /// The adapter this decoder applies, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_deref()
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.base.config
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        let width = self.base.config.kv_heads * self.base.config.head_dim;
        let layers = match self.base.kv_pools.is_empty() {
            true => (0..self.base.config.layers).map(|_| KvLayer::new(width)).collect(),
            false => self.base.kv_pools.iter().map(KvLayer::paged).collect(),
        };
        KvCache { layers }
    }

    /// Runs each sequence's new tokens through the model, appending to its
    /// cache; returns the logits at each sequence's last new position. All
    /// sequences' tokens share every matrix product.
    pub fn forward(&self, device: &Device, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>> {
        if steps.iter().any(|s| s.tokens.is_empty()) {
            return Err(Error::Internal("a forward step needs at least one token".into()));
        }
        let ends: Vec<u32> = steps
            .iter()
            .scan(0, |end, step| {
                *end += step.tokens.len() as u32;
                Some(*end - 1)
            })
            .collect();
        self.forward_rows(device, steps, &ends)
    }

    /// Log-probabilities of `tokens[t]` given `tokens[..t]` for every `t` in
    /// `from..tokens.len()` (teacher forcing over one sequence, one pass):
    /// how likely the model finds a reply after its prompt.
    pub fn token_logprobs(&self, device: &Device, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
        if from == 0 || from > tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "scoring tokens from {from} of {}: a reply needs at least one token before it",
                tokens.len()
            )));
        }
        let rows: Vec<u32> = (from as u32 - 1..tokens.len() as u32 - 1).collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut cache = self.new_cache();
        let logits = self.forward_rows(device, &mut [Step { tokens, cache: &mut cache }], &rows)?;
        Ok(logits
            .iter()
            .zip(&tokens[from..])
            .map(|(row, &next)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
                (row[next as usize] - max) - sum.ln() as f32
            })
            .collect())
    }

    /// The forward pass, with logits for the rows `rows` of the step's
    /// stacked positions (only those go through the output projection).
    fn forward_rows(&self, device: &Device, steps: &mut [Step<'_>], rows: &[u32]) -> Result<Vec<Vec<f32>>> {
        let w = &*self.base;
        let c = &w.config;
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
        let mut x = device.embed_quantized(&w.embeddings, &ids)?;
        let shape = AttentionShape { heads: c.heads, head_dim: c.head_dim };
        for (l, block) in w.blocks.iter().enumerate() {
            let adapter = self.adapter.as_ref().map(|a| &a.blocks[l]);
            let normed = device.rms_norm(&x, &block.attention_norm, c.rms_eps)?;
            let mut qkv = block.attention.qkv.apply(device, &normed)?.into_iter();
            let (Some(mut q), Some(mut k), Some(mut v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                return Err(Error::Internal("the QKV projection gave fewer than three parts".into()));
            };
            if let Some(adapter) = adapter {
                add_delta(device, &mut q, adapter.q.as_ref(), &normed)?;
                add_delta(device, &mut k, adapter.k.as_ref(), &normed)?;
                add_delta(device, &mut v, adapter.v.as_ref(), &normed)?;
            }
            if let Some([bq, bk, bv]) = &block.attention.bias {
                device.add_bias(&mut q, bq)?;
                device.add_bias(&mut k, bk)?;
                device.add_bias(&mut v, bv)?;
            }
            device.rope(&mut q, &positions, c.head_dim, c.rope_base, c.rope_style)?;
            device.rope(&mut k, &positions, c.head_dim, c.rope_base, c.rope_style)?;
            let mut pasts = Vec::with_capacity(steps.len());
            let mut start = 0;
            for step in steps.iter_mut() {
                let rows = start..start + step.tokens.len();
                let cache = &mut step.cache.layers[l];
                pasts.push(cache.len());
                cache.append(&device.slice_rows(&k, rows.clone())?, &device.slice_rows(&v, rows.clone())?)?;
                start = rows.end;
            }
            let sequences: Vec<CachedRows> = steps
                .iter()
                .zip(pasts)
                .map(|(step, past)| CachedRows { cache: &step.cache.layers[l], past, rows: step.tokens.len() })
                .collect();
            let attended = device.cached_attention(&q, &sequences, shape, c.kv_heads, w.prefill == Precision::F32)?;
            let mut projected = device.linear_quantized(&attended, &block.attention.o)?;
            add_delta(device, &mut projected, adapter.and_then(|a| a.o.as_ref()), &attended)?;
            let normed = device.add_rms_norm(&mut x, &projected, &block.ffn_norm, c.rms_eps)?;
            let ffn_out = match &block.ffn {
                FeedForward::Dense(dense) => dense.forward_adapted(device, &normed, adapter)?,
                FeedForward::Moe(moe) => moe.forward(device, &normed)?,
            };
            device.add(&mut x, &ffn_out)?;
        }
        // Only the rows asked for need logits (a sequence's last, to decode).
        let last = device.gather_rows(&x, rows)?;
        let normed = device.rms_norm(&last, &w.output_norm, c.rms_eps)?;
        let logits = device.linear_quantized(&normed, w.output.as_ref().unwrap_or(&w.embeddings))?;
        Ok(logits.to_host()?.chunks_exact(c.vocab).map(<[f32]>::to_vec).collect())
    }

    /// The weight type most of the model is stored in (for versions and logs).
    pub fn main_type(&self) -> GgmlType {
        self.base.blocks.first().map_or(self.base.embeddings.dtype(), |b| match &b.ffn {
            FeedForward::Moe(moe) => moe.dtype(),
            FeedForward::Dense(_) => b.attention.qkv.dtype(),
        })
    }
}
