//! A Llama-family decoder for training LoRA adapters, in candle's
//! differentiable ops: transformers' `LlamaForCausalLM` / `MixtralForCausalLM`
//! (RMSNorm, `rotate_half` rotary embeddings, grouped-query attention under a
//! causal mask, SwiGLU, Mixtral's top-k softmax router), with PEFT's LoRA
//! (`peft/tuners/lora/layer.py`: `y = x·Wᵀ + (alpha/r)·(dropout(x)·Aᵀ)·Bᵀ`,
//! A kaiming-uniform with a = √5, B zeros) on the targeted projections.
//!
//! The base is frozen: its weights are plain tensors, never `Var`s, so
//! autograd reaches only the adapters. From a Hugging Face folder the weights
//! are widened to f32; from GGUF, block-quantized matrices stay quantized in
//! memory as candle `QTensor`s and are dequantized inside the projection
//! that uses them on every pass (QLoRA's arrangement: the 4- or 8-bit base
//! is only ever read). GGUF files store Q and K rows permuted for llama.cpp's
//! adjacent-pair rotation; their rows are put back at load (a row of blocks
//! moves as a whole), so one rotation serves both sources and an adapter
//! trained over GGUF has the Hugging Face layout PEFT expects.
//!
//! Serving stays on `model/llama.rs`; `tests/train_generator.rs` checks that
//! this copy gives transformers' logits (and PEFT's, with an adapter).

use std::{collections::HashMap, path::Path};

use candle_core::{D, DType, Device, Tensor, Var, quantized::QTensor};

use super::train_bert::candle;
use crate::{
    backend::quant::GgmlType,
    error::{Error, Result},
    model::{gguf::GgufFile, llama::LlamaConfig, weights::SafetensorsFile},
};

/// PEFT's default for Llama-family models here: every attention and MLP
/// projection, Mixtral's experts (`w1` gate, `w3` up, `w2` down) included.
pub const DEFAULT_TARGETS: &[&str] =
    &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"];

/// What PEFT's `LoraConfig` holds for these adapters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input while training (0 at evaluation).
    pub dropout: f32,
    /// Module names (the last part of a projection's path) that get adapters.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: DEFAULT_TARGETS.iter().map(|t| t.to_string()).collect(),
        }
    }
}

impl LoraConfig {
    fn targets(&self, module: &str) -> bool {
        let last = module.rsplit('.').next().unwrap_or(module);
        self.target_modules.iter().any(|t| t == last)
    }

    /// PEFT's scaling without rank stabilisation.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// A frozen base matrix `[out, in]`.
enum Frozen {
    Float(Tensor),
    /// Dequantized per use; never widened in memory.
    Quantized(QTensor),
}

impl Frozen {
    fn matrix(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Frozen::Float(t) => Ok(t.clone()),
            Frozen::Quantized(q) => q.dequantize(device),
        }
    }
}

/// One trainable adapter: `a` `[r, in]`, `b` `[out, r]`.
pub struct Adapter {
    pub a: Var,
    pub b: Var,
}

/// A projection of the base with, when targeted, its adapter.
struct Projection {
    /// The transformers module path (`model.layers.0.self_attn.q_proj`).
    module: String,
    weight: Frozen,
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
}

/// Whether a forward pass trains (adapter dropout on) or evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Train,
    Evaluate,
}

impl Projection {
    /// `x`: `[n, in]` → `[n, out]`.
    fn forward(&self, x: &Tensor, pass: Pass, lora: &LoraConfig) -> candle_core::Result<Tensor> {
        let w = self.weight.matrix(x.device())?;
        let mut y = x.matmul(&w.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(adapter) = &self.adapter {
            let input = match pass {
                Pass::Train if lora.dropout > 0.0 => candle_nn::ops::dropout(x, lora.dropout)?,
                _ => x.clone(),
            };
            let low = input.matmul(&adapter.a.as_tensor().t()?)?;
            y = (y + (low.matmul(&adapter.b.as_tensor().t()?)? * lora.scale())?)?;
        }
        Ok(y)
    }
}

struct Attention {
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
}

struct SwiGlu {
    gate: Projection,
    up: Projection,
    down: Projection,
}

impl SwiGlu {
    fn forward(&self, x: &Tensor, pass: Pass, lora: &LoraConfig) -> candle_core::Result<Tensor> {
        let gate = self.gate.forward(x, pass, lora)?.silu()?;
        self.down.forward(&(gate * self.up.forward(x, pass, lora)?)?, pass, lora)
    }
}

/// Mixtral's sparse block: softmax over the router's logits, the `used`
/// best experts per token, their weights renormalised when `normalize`.
struct Experts {
    router: Frozen,
    experts: Vec<SwiGlu>,
    used: usize,
    normalize: bool,
}

impl Experts {
    fn forward(&self, x: &Tensor, pass: Pass, lora: &LoraConfig) -> candle_core::Result<Tensor> {
        let device = x.device();
        let logits = x.matmul(&self.router.matrix(device)?.t()?)?;
        let probabilities = candle_nn::ops::softmax(&logits, D::Minus1)?;
        // The choice of experts is discrete: made on the host from the
        // detached probabilities, as transformers' `topk`. Gradients flow
        // through the chosen experts' weights, not through the choice (as in
        // transformers). The token lists per expert are host data anyway, so
        // this costs one device-to-host copy per block.
        let host = probabilities.detach().to_vec2::<f32>()?;
        let experts = self.experts.len();
        let mut chosen = vec![0f32; host.len() * experts];
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); experts];
        for (token, p) in host.iter().enumerate() {
            let mut order: Vec<usize> = (0..experts).collect();
            // Ties go to the lower index, so the choice is deterministic.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            for &e in order.iter().take(self.used) {
                chosen[token * experts + e] = 1.0;
                rows[e].push(token as u32);
            }
        }
        let mask = Tensor::from_vec(chosen, (host.len(), experts), device)?;
        let mut weights = (probabilities * mask)?;
        if self.normalize {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        let mut out = x.zeros_like()?;
        for (e, rows) in rows.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let count = rows.len();
            let index = Tensor::from_vec(rows, count, device)?;
            let y = self.experts[e].forward(&x.index_select(&index, 0)?, pass, lora)?;
            let w = weights.narrow(1, e, 1)?.contiguous()?.index_select(&index, 0)?;
            out = out.index_add(&index, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(out)
    }
}

enum FeedForward {
    Dense(Box<SwiGlu>),
    Moe(Experts),
}

struct Block {
    attention_norm: Tensor,
    attention: Attention,
    ffn_norm: Tensor,
    ffn: FeedForward,
}

/// `cos` and `sin` of transformers' default rotary embedding, `[positions, head_dim]`
/// (each frequency twice: `cat(freqs, freqs)`).
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(config: &LlamaConfig, device: &Device) -> candle_core::Result<Self> {
        let d = config.head_dim;
        let positions = config.context.max(1);
        let inverse: Vec<f32> = (0..d / 2).map(|i| 1.0 / config.rope_base.powf((2 * i) as f32 / d as f32)).collect();
        let mut angles = Vec::with_capacity(positions * d);
        for p in 0..positions {
            // Both halves of a head rotate by the same angles.
            angles.extend(inverse.iter().chain(&inverse).map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (positions, d), device)?;
        Ok(Rotary { cos: angles.cos()?, sin: angles.sin()? })
    }

    /// `x`: `[b, heads, t, d]`: `x·cos + rotate_half(x)·sin`.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let (first, second) = (x.narrow(D::Minus1, 0, d / 2)?, x.narrow(D::Minus1, d / 2, d / 2)?);
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// RMSNorm in composed ops (candle's fused one has no backward), computed
/// in f32 as transformers' `LlamaRMSNorm`.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let mean = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean + eps as f64)?.sqrt()?)?.broadcast_mul(weight)
}

pub struct TrainLlama {
    config: LlamaConfig,
    lora: LoraConfig,
    embeddings: Frozen,
    blocks: Vec<Block>,
    output_norm: Tensor,
    /// None when tied to the embeddings.
    output: Option<Frozen>,
    rotary: Rotary,
    device: Device,
}

/// Where the frozen base is read from.
enum Base {
    Folder { shards: Vec<SafetensorsFile>, index: HashMap<String, usize>, origin: String },
    Gguf(GgufFile),
}

impl Base {
    fn open(path: &Path) -> Result<(Self, LlamaConfig)> {
        if path.is_dir() {
            let config = LlamaConfig::from_hf(path)?;
            #[derive(serde::Deserialize)]
            struct ShardIndex {
                weight_map: HashMap<String, String>,
            }
            let index_file = path.join("model.safetensors.index.json");
            let mut files: Vec<String> = match crate::model::hf_folder::read_json::<ShardIndex>(&index_file)? {
                Some(index) => index.weight_map.into_values().collect(),
                None => vec!["model.safetensors".into()],
            };
            files.sort();
            files.dedup();
            let shards = files.iter().map(|f| SafetensorsFile::open(&path.join(f))).collect::<Result<Vec<_>>>()?;
            let mut index = HashMap::new();
            for (i, shard) in shards.iter().enumerate() {
                for name in shard.names()? {
                    index.insert(name, i);
                }
            }
            Ok((Base::Folder { shards, index, origin: path.display().to_string() }, config))
        } else {
            let file = GgufFile::open(path)?;
            let config = LlamaConfig::from_gguf(&file)?;
            Ok((Base::Gguf(file), config))
        }
    }

    fn origin(&self) -> &str {
        match self {
            Base::Folder { origin, .. } => origin,
            Base::Gguf(file) => file.path(),
        }
    }

    fn has(&self, hf: &str) -> bool {
        match self {
            Base::Folder { index, .. } => index.contains_key(hf),
            Base::Gguf(file) => {
                gguf_name(hf).is_some_and(|(name, expert)| expert.is_some() || file.info(&name).is_ok())
            }
        }
    }

    /// Tensor `hf` (a transformers name) with the shape transformers gives it.
    fn tensor(&self, hf: &str, shape: &[usize], config: &LlamaConfig, device: &Device) -> Result<Frozen> {
        let wrong = |found: &[usize]| {
            Error::InvalidArgument(format!(
                "{}: {hf} has dims {found:?}, the model's config implies {shape:?}",
                self.origin()
            ))
        };
        match self {
            Base::Folder { shards, index, origin } => {
                let shard =
                    index.get(hf).ok_or_else(|| Error::InvalidArgument(format!("{origin}: tensor {hf} is missing")))?;
                let (found, values) = shards[*shard].load(hf)?;
                if found != shape {
                    return Err(wrong(&found));
                }
                Ok(Frozen::Float(Tensor::from_vec(values, found, device).map_err(candle)?))
            }
            Base::Gguf(file) => {
                let missing = || Error::InvalidArgument(format!("{}: no GGUF tensor for {hf}", file.path()));
                let (name, expert) = gguf_name(hf).ok_or_else(missing)?;
                let (info, mut bytes, dims) = match expert {
                    None => {
                        let info = file.info(&name)?;
                        let dims: Vec<usize> = info.dims.iter().rev().copied().collect();
                        (info, file.bytes(&name)?.to_vec(), dims)
                    }
                    Some(e) => expert_slice(file, &name, e, config.moe.map_or(0, |m| m.experts))?,
                };
                if dims != shape {
                    return Err(wrong(&dims));
                }
                if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.k_proj.weight") {
                    unpermute_rows(&mut bytes, info.dtype.row_bytes(shape[1]), shape[0], config.head_dim);
                }
                frozen(info.dtype, &bytes, &dims, device)
            }
        }
    }
}

/// Undoes `convert_hf_to_gguf.py`'s Q/K `permute`: within each head of
/// `d` rows, GGUF row `2i + j` holds transformers' row `j·d/2 + i`. A row of
/// blocks moves whole, so quantized rows move without being decoded.
fn unpermute_rows(bytes: &mut [u8], row_bytes: usize, rows: usize, d: usize) {
    let source = bytes.to_vec();
    for head in 0..rows / d {
        for i in 0..d / 2 {
            for j in 0..2 {
                let from = head * d + 2 * i + j;
                let to = head * d + j * d / 2 + i;
                bytes[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&source[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
}

/// Expert `e` of a stacked GGUF tensor `[k, n, count]` (or of the older
/// per-expert tensors): its info, bytes and transformers dims `[n, k]`.
fn expert_slice<'a>(
    file: &'a GgufFile,
    name: &str,
    e: usize,
    count: usize,
) -> Result<(&'a crate::model::gguf::TensorInfo, Vec<u8>, Vec<usize>)> {
    if let Ok(info) = file.info(name) {
        if info.dims.len() != 3 || info.dims[2] != count {
            return Err(Error::InvalidArgument(format!(
                "{}: {name} has dims {:?}, not {count} stacked experts",
                file.path(),
                info.dims
            )));
        }
        let (k, n) = (info.dims[0], info.dims[1]);
        let per_expert = n * info.dtype.row_bytes(k);
        let bytes = file.bytes(name)?[e * per_expert..(e + 1) * per_expert].to_vec();
        return Ok((info, bytes, vec![n, k]));
    }
    // Older files: `blk.{l}.ffn_gate.{e}.weight`.
    let single = name.replace("_exps.weight", &format!(".{e}.weight"));
    let info = file.info(&single)?;
    Ok((info, file.bytes(&single)?.to_vec(), info.dims.iter().rev().copied().collect()))
}

/// A GGUF tensor's bytes as a frozen matrix: float types widened, block
/// types kept quantized.
fn frozen(dtype: GgmlType, bytes: &[u8], dims: &[usize], device: &Device) -> Result<Frozen> {
    use candle_core::quantized::GgmlDType;
    let quantized = match dtype {
        GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => {
            let mut values = vec![0f32; dims.iter().product()];
            crate::backend::quant::dequantize_row(dtype, bytes, &mut values);
            return Ok(Frozen::Float(Tensor::from_vec(values, dims, device).map_err(candle)?));
        }
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
    };
    let q = candle_core::quantized::ggml_file::qtensor_from_ggml(quantized, bytes, dims.to_vec(), device)
        .map_err(candle)?;
    Ok(Frozen::Quantized(q))
}

/// A transformers tensor name → llama.cpp's, with the expert for Mixtral's
/// experts, which GGUF stacks in one tensor.
fn gguf_name(hf: &str) -> Option<(String, Option<usize>)> {
    let (stem, suffix) = hf.rsplit_once('.')?;
    let whole = match stem {
        "model.embed_tokens" => Some("token_embd"),
        "model.norm" => Some("output_norm"),
        "lm_head" => Some("output"),
        _ => None,
    };
    if let Some(whole) = whole {
        return Some((format!("{whole}.{suffix}"), None));
    }
    let rest = stem.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let local = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "block_sparse_moe.gate" => "ffn_gate_inp",
        other => {
            let expert = other.strip_prefix("block_sparse_moe.experts.")?;
            let (e, w) = expert.split_once('.')?;
            let e: usize = e.parse().ok()?;
            let stacked = match w {
                "w1" => "ffn_gate_exps",
                "w3" => "ffn_up_exps",
                "w2" => "ffn_down_exps",
                _ => return None,
            };
            return Some((format!("blk.{layer}.{stacked}.{suffix}"), Some(e)));
        }
    };
    Some((format!("blk.{layer}.{local}.{suffix}"), None))
}

/// Fills `count` values of U(−bound, bound) from a seeded SplitMix64, so an
/// adapter's initialisation is the same for the same seed.
fn uniform(count: usize, bound: f64, state: &mut u64) -> Vec<f32> {
    (0..count)
        .map(|_| {
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * unit - 1.0) * bound) as f32
        })
        .collect()
}

impl TrainLlama {
    /// The frozen base at `path` (a transformers folder or a GGUF file) with
    /// fresh adapters on `lora`'s targets, initialised from `seed`.
    pub fn load(path: &Path, lora: &LoraConfig, device: &Device, seed: u64) -> Result<Self> {
        if lora.rank == 0 {
            return Err(Error::InvalidArgument("LoRA rank must be at least 1".into()));
        }
        let (base, config) = Base::open(path)?;
        if config.moe.is_some_and(|m| m.shared_ffn.is_some()) {
            return Err(Error::InvalidArgument(format!(
                "{}: training adapters over a shared expert (Qwen-MoE) is not supported",
                base.origin()
            )));
        }
        let mut state = seed;
        let (h, q, kv) = (config.hidden, config.heads * config.head_dim, config.kv_heads * config.head_dim);
        let mut projection = |module: String, inputs: usize, outputs: usize, bias: bool| -> Result<Projection> {
            let weight = base.tensor(&format!("{module}.weight"), &[outputs, inputs], &config, device)?;
            let bias = match bias {
                true => match base.tensor(&format!("{module}.bias"), &[outputs], &config, device)? {
                    Frozen::Float(t) => Some(t),
                    Frozen::Quantized(q) => Some(q.dequantize(device).map_err(candle)?),
                },
                false => None,
            };
            let adapter = match lora.targets(&module) {
                true => {
                    // kaiming_uniform_(a=√5) on [r, in]: bound = 1/√in.
                    let a = uniform(lora.rank * inputs, 1.0 / (inputs as f64).sqrt(), &mut state);
                    let a = Var::from_tensor(&Tensor::from_vec(a, (lora.rank, inputs), device).map_err(candle)?)
                        .map_err(candle)?;
                    let b = Var::zeros((outputs, lora.rank), DType::F32, device).map_err(candle)?;
                    Some(Adapter { a, b })
                }
                false => None,
            };
            Ok(Projection { module, weight, bias, adapter })
        };
        let mut blocks = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            let at = |part: &str| format!("model.layers.{l}.{part}");
            let attention = Attention {
                q: projection(at("self_attn.q_proj"), h, q, config.qkv_bias)?,
                k: projection(at("self_attn.k_proj"), h, kv, config.qkv_bias)?,
                v: projection(at("self_attn.v_proj"), h, kv, config.qkv_bias)?,
                o: projection(at("self_attn.o_proj"), q, h, false)?,
            };
            let mut swiglu = |gate: String, up: String, down: String| -> Result<SwiGlu> {
                Ok(SwiGlu {
                    gate: projection(gate, h, config.ffn, false)?,
                    up: projection(up, h, config.ffn, false)?,
                    down: projection(down, config.ffn, h, false)?,
                })
            };
            let ffn = match config.moe {
                None => {
                    FeedForward::Dense(Box::new(swiglu(at("mlp.gate_proj"), at("mlp.up_proj"), at("mlp.down_proj"))?))
                }
                Some(moe) => {
                    let experts = (0..moe.experts)
                        .map(|e| {
                            let expert = |w: &str| at(&format!("block_sparse_moe.experts.{e}.{w}"));
                            swiglu(expert("w1"), expert("w3"), expert("w2"))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let router =
                        base.tensor(&at("block_sparse_moe.gate.weight"), &[moe.experts, h], &config, device)?;
                    FeedForward::Moe(Experts { router, experts, used: moe.used, normalize: moe.normalize })
                }
            };
            let vector = |name: String| -> Result<Tensor> {
                match base.tensor(&name, &[h], &config, device)? {
                    Frozen::Float(t) => Ok(t),
                    Frozen::Quantized(q) => q.dequantize(device).map_err(candle),
                }
            };
            blocks.push(Block {
                attention_norm: vector(at("input_layernorm.weight"))?,
                attention,
                ffn_norm: vector(at("post_attention_layernorm.weight"))?,
                ffn,
            });
        }
        let embeddings = base.tensor("model.embed_tokens.weight", &[config.vocab, h], &config, device)?;
        let output = match config.tied_embeddings && !base.has("lm_head.weight") {
            true => None,
            false => Some(base.tensor("lm_head.weight", &[config.vocab, h], &config, device)?),
        };
        let output_norm = match base.tensor("model.norm.weight", &[h], &config, device)? {
            Frozen::Float(t) => t,
            Frozen::Quantized(q) => q.dequantize(device).map_err(candle)?,
        };
        Ok(TrainLlama {
            rotary: Rotary::new(&config, device).map_err(candle)?,
            config,
            lora: lora.clone(),
            embeddings,
            blocks,
            output_norm,
            output,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn lora(&self) -> &LoraConfig {
        &self.lora
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn projections(&self) -> impl Iterator<Item = &Projection> {
        self.blocks.iter().flat_map(|b| {
            let attention = [&b.attention.q, &b.attention.k, &b.attention.v, &b.attention.o];
            let ffn: Vec<&Projection> = match &b.ffn {
                FeedForward::Dense(f) => vec![&f.gate, &f.up, &f.down],
                FeedForward::Moe(m) => m.experts.iter().flat_map(|f| [&f.gate, &f.up, &f.down]).collect(),
            };
            attention.into_iter().chain(ffn)
        })
    }

    /// Every adapter with its module path, in model order.
    pub fn adapters(&self) -> Vec<(&str, &Adapter)> {
        self.projections().filter_map(|p| p.adapter.as_ref().map(|a| (p.module.as_str(), a))).collect()
    }

    /// The target modules that matched a projection of this model (what
    /// PEFT's `adapter_config.json` lists), sorted.
    pub fn adapted_modules(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .adapters()
            .into_iter()
            .map(|(module, _)| module.rsplit('.').next().unwrap_or(module).to_owned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// How many base matrices are held block-quantized (dequantized per use).
    pub fn quantized_matrices(&self) -> usize {
        let routers = self.blocks.iter().filter_map(|b| match &b.ffn {
            FeedForward::Moe(m) => Some(&m.router),
            FeedForward::Dense(_) => None,
        });
        self.projections()
            .map(|p| &p.weight)
            .chain(routers)
            .chain([&self.embeddings])
            .chain(&self.output)
            .filter(|w| matches!(w, Frozen::Quantized(_)))
            .count()
    }

    /// The adapters' variables, for the optimizer.
    pub fn vars(&self) -> Vec<Var> {
        self.adapters().into_iter().flat_map(|(_, a)| [a.a.clone(), a.b.clone()]).collect()
    }

    /// Logits `[b, t, vocab]` for `ids` `[b, t]` (u32). Sequences are
    /// right-padded: under the causal mask padding never reaches a real
    /// token, so no padding mask is needed.
    pub fn logits(&self, ids: &Tensor, pass: Pass) -> Result<Tensor> {
        self.forward(ids, pass).map_err(candle)
    }

    fn forward(&self, ids: &Tensor, pass: Pass) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        if t > c.context {
            candle_core::bail!("{t} tokens exceed the model's context of {}", c.context);
        }
        let embeddings = self.embeddings.matrix(&self.device)?;
        let mut x = embeddings.index_select(&ids.flatten_all()?, 0)?;
        let d = c.head_dim;
        let groups = c.heads / c.kv_heads;
        // 0 on and below the diagonal, −∞ above it.
        let mask: Vec<f32> =
            (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (t, t), &self.device)?;
        for block in &self.blocks {
            let normed = rms_norm(&x, &block.attention_norm, c.rms_eps)?;
            let heads = |y: Tensor, n: usize| y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
            let q = self.rotary.apply(&heads(block.attention.q.forward(&normed, pass, &self.lora)?, c.heads)?)?;
            let k = self.rotary.apply(&heads(block.attention.k.forward(&normed, pass, &self.lora)?, c.kv_heads)?)?;
            let v = heads(block.attention.v.forward(&normed, pass, &self.lora)?, c.kv_heads)?;
            // transformers' repeat_kv: each KV head serves `groups` consecutive query heads.
            let repeat = |y: Tensor| -> candle_core::Result<Tensor> {
                if groups == 1 {
                    return Ok(y);
                }
                y.unsqueeze(2)?.expand((b, c.kv_heads, groups, t, d))?.reshape((b, c.heads, t, d))
            };
            let (k, v) = (repeat(k)?, repeat(v)?);
            let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
            let attended = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
            let attended = attended.transpose(1, 2)?.reshape((b * t, c.heads * d))?;
            x = (x + block.attention.o.forward(&attended, pass, &self.lora)?)?;
            let normed = rms_norm(&x, &block.ffn_norm, c.rms_eps)?;
            let out = match &block.ffn {
                FeedForward::Dense(f) => f.forward(&normed, pass, &self.lora)?,
                FeedForward::Moe(m) => m.forward(&normed, pass, &self.lora)?,
            };
            x = (x + out)?;
        }
        let normed = rms_norm(&x, &self.output_norm, c.rms_eps)?;
        let head = match &self.output {
            Some(output) => output.matrix(&self.device)?,
            None => embeddings,
        };
        normed.matmul(&head.t()?)?.reshape((b, t, c.vocab))
    }

    /// Sets the adapters from PEFT-named tensors (`{module}.lora_A.weight`,
    /// with or without PEFT's `base_model.model.` prefix); every adapter
    /// must be present.
    pub fn set_adapters(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (module, adapter) in self.adapters() {
            for (part, var) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
                let name = format!("{module}.{part}.weight");
                let found = tensors
                    .get(&format!("{PEFT_PREFIX}{name}"))
                    .or_else(|| tensors.get(&name))
                    .ok_or_else(|| Error::InvalidArgument(format!("the adapter has no {name}")))?;
                let found = found.to_dtype(DType::F32).and_then(|t| t.to_device(&self.device)).map_err(candle)?;
                var.set(&found).map_err(|e| Error::InvalidArgument(format!("{name}: {e}")))?;
            }
        }
        Ok(())
    }

    /// The adapters under PEFT's names, as `adapter_model.safetensors` holds them.
    pub fn adapter_tensors(&self) -> HashMap<String, Tensor> {
        self.adapters()
            .into_iter()
            .flat_map(|(module, a)| {
                [
                    (format!("{PEFT_PREFIX}{module}.lora_A.weight"), a.a.as_tensor().clone()),
                    (format!("{PEFT_PREFIX}{module}.lora_B.weight"), a.b.as_tensor().clone()),
                ]
            })
            .collect()
    }
}

/// What PEFT puts before a module's path when it saves an adapter.
pub const PEFT_PREFIX: &str = "base_model.model.";
