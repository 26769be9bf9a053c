//! BERT for training, in candle's differentiable ops: Hugging Face's
//! `BertModel` (post-norm encoder, exact GELU), with its parameter names, so
//! a checkpoint trains from and saves to the same safetensors layout aitl's
//! encoder serves. candle-transformers' BERT cannot be trained: its layer
//! norm is a fused op without a backward pass, so no gradient would reach a
//! weight. Serving stays on `model/bert.rs`; this copy exists only because
//! training needs autograd, and `tests/train.rs` checks that both give the
//! same embeddings.

use std::path::Path;

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder, VarMap, ops::layer_norm_slow};
use serde::{Deserialize, Serialize};

use crate::model::weights::SafetensorsFile;

/// How long and how fast a trainer runs: what the retriever and the ranker
/// trainers share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Schedule {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Share of the steps with a linear warm-up; the rest decay linearly to 0.
    pub warmup_share: f64,
    pub weight_decay: f64,
    /// Tokens per text or pair (longer ones are cut).
    pub max_tokens: usize,
    pub seed: u64,
    /// Stop after this many steps (0: no cap).
    pub max_steps: usize,
    pub device: TrainingDevice,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            epochs: 1,
            batch_size: 32,
            learning_rate: 2e-5,
            warmup_share: 0.1,
            weight_decay: 0.01,
            max_tokens: 128,
            seed: 7,
            max_steps: 0,
            device: TrainingDevice::Auto,
        }
    }
}

impl Schedule {
    /// (batch size, steps per epoch, total steps) over `examples`, with
    /// batches of at least `min_batch`.
    pub fn steps(&self, examples: usize, min_batch: usize) -> (usize, usize, usize) {
        let batch = self.batch_size.clamp(min_batch, examples.max(min_batch));
        let per_epoch = examples / batch;
        let total = per_epoch * self.epochs.max(1);
        (batch, per_epoch, if self.max_steps > 0 { total.min(self.max_steps) } else { total })
    }

    /// AdamW over `vars` at the peak rate (each step sets its own rate).
    pub fn optimizer(&self, vars: Vec<candle_core::Var>) -> crate::error::Result<candle_nn::AdamW> {
        let params =
            candle_nn::ParamsAdamW { lr: self.learning_rate, weight_decay: self.weight_decay, ..Default::default() };
        candle_nn::Optimizer::new(vars, params).map_err(candle)
    }
}

/// Where a trainer computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainingDevice {
    /// The first CUDA GPU when this build has CUDA and one answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The first CUDA GPU, or an error.
    Cuda,
}

impl TrainingDevice {
    /// The candle device to train on. Never panics: a build without CUDA,
    /// or a machine without a GPU, gives the CPU (`Auto`) or an error naming
    /// the cause (`Cuda`).
    pub fn open(self) -> crate::error::Result<candle_core::Device> {
        match self {
            TrainingDevice::Cpu => Ok(candle_core::Device::Cpu),
            TrainingDevice::Cuda => cuda_device(),
            TrainingDevice::Auto => Ok(cuda_device().unwrap_or_else(|e| {
                if cfg!(feature = "cuda") {
                    tracing::warn!("{e}; training on the CPU");
                }
                candle_core::Device::Cpu
            })),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> crate::error::Result<candle_core::Device> {
    candle_core::Device::new_cuda(0)
        .map_err(|e| crate::error::Error::FailedPrecondition(format!("training: no usable CUDA GPU: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> crate::error::Result<candle_core::Device> {
    Err(crate::error::Error::FailedPrecondition(
        "training: this aitl was built without CUDA; build it with `scripts/build-cuda` (cargo's `cuda` feature) \
         to train on a GPU"
            .into(),
    ))
}

/// A device as reports name it: "cpu", "cuda:0".
pub fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TrainBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn two() -> usize {
    2
}

fn eps() -> f64 {
    1e-12
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn load(vb: VarBuilder, width: usize, eps: f64) -> Result<Self> {
        Ok(Norm { weight: vb.get(width, "weight")?, bias: vb.get(width, "bias")?, eps: eps as f32 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The composed (differentiable) layer norm, not the fused one.
        layer_norm_slow(x, &self.weight, &self.bias, self.eps)
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
    heads: usize,
}

impl Layer {
    fn load(vb: VarBuilder, c: &TrainBertConfig) -> Result<Self> {
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let attention = vb.pp("attention");
        Ok(Layer {
            query: candle_nn::linear(h, h, attention.pp("self.query"))?,
            key: candle_nn::linear(h, h, attention.pp("self.key"))?,
            value: candle_nn::linear(h, h, attention.pp("self.value"))?,
            attention_out: candle_nn::linear(h, h, attention.pp("output.dense"))?,
            attention_norm: Norm::load(attention.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
            intermediate: candle_nn::linear(h, f, vb.pp("intermediate.dense"))?,
            output: candle_nn::linear(f, h, vb.pp("output.dense"))?,
            output_norm: Norm::load(vb.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
            heads: c.num_attention_heads,
        })
    }

    /// `x`: `[batch, len, hidden]`; `bias`: `[batch, 1, 1, len]`, 0 or −∞-like for padding.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, len, hidden) = x.dims3()?;
        let d = hidden / self.heads;
        let split = |t: Tensor| t.reshape((b, len, self.heads, d))?.transpose(1, 2)?.contiguous();
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(bias)?;
        let probabilities = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let context = probabilities.matmul(&v)?.transpose(1, 2)?.reshape((b, len, hidden))?;
        let attended = self.attention_norm.forward(&(self.attention_out.forward(&context)? + x)?)?;
        let inner = self.intermediate.forward(&attended)?.gelu_erf()?;
        self.output_norm.forward(&(self.output.forward(&inner)? + attended)?)
    }
}

pub struct TrainBert {
    words: Embedding,
    positions: Embedding,
    types: Embedding,
    norm: Norm,
    layers: Vec<Layer>,
}

impl TrainBert {
    pub fn load(vb: VarBuilder, c: &TrainBertConfig) -> Result<Self> {
        if c.hidden_act.as_deref().is_some_and(|a| a != "gelu") {
            candle_core::bail!("training supports BERT with exact GELU, not {:?}", c.hidden_act);
        }
        let h = c.hidden_size;
        let e = vb.pp("embeddings");
        Ok(TrainBert {
            words: candle_nn::embedding(c.vocab_size, h, e.pp("word_embeddings"))?,
            positions: candle_nn::embedding(c.max_position_embeddings, h, e.pp("position_embeddings"))?,
            types: candle_nn::embedding(c.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: Norm::load(e.pp("LayerNorm"), h, c.layer_norm_eps)?,
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::load(vb.pp(format!("encoder.layer.{i}")), c))
                .collect::<Result<_>>()?,
        })
    }

    /// Token states `[batch, len, hidden]` for `ids` and `types` (`[batch, len]`,
    /// u32) with `mask` (1 for tokens, 0 for padding).
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, len) = ids.dims2()?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?.unsqueeze(0)?.broadcast_as((b, len))?;
        let x = (self.words.forward(ids)? + self.positions.forward(&positions.contiguous()?)?)?;
        let x = self.norm.forward(&(x + self.types.forward(types)?)?)?;
        // Padding gets a large negative bias: exp underflows to 0 in the softmax.
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.unsqueeze(1)?.unsqueeze(1)?;
        self.layers.iter().try_fold(x, |x, layer| layer.forward(&x, &bias))
    }
}

/// candle's errors as ours.
pub fn candle(e: candle_core::Error) -> crate::error::Error {
    crate::error::Error::Internal(format!("training: {e}"))
}

/// Linear warm-up, then linear decay to zero.
pub fn learning_rate(peak: f64, warmup_share: f64, step: usize, total: usize) -> f64 {
    let warmup = ((total as f64 * warmup_share).ceil() as usize).max(1);
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else {
        peak * (total - step) as f64 / (total - warmup).max(1) as f64
    }
}

/// A seeded Fisher–Yates shuffle of `0..n`: an epoch's order, the same
/// whenever it is replayed (a resumed run continues the epoch it was in).
/// Which examples each step of a run trains on: every epoch in its own
/// seeded order ([`epoch_order`]), so a run resumed at any step draws the
/// batches it would have drawn without the interruption.
pub struct Batches {
    examples: usize,
    batch: usize,
    per_epoch: usize,
    seed: u64,
    epoch: Option<usize>,
    order: Vec<usize>,
}

impl Batches {
    /// `(batch, per_epoch)` as [`Schedule::steps`] gives them.
    pub fn new(examples: usize, (batch, per_epoch): (usize, usize), seed: u64) -> Self {
        Batches { examples, batch, per_epoch: per_epoch.max(1), seed, epoch: None, order: Vec::new() }
    }

    /// The example indices of `step`'s batch.
    pub fn at(&mut self, step: usize) -> &[usize] {
        let epoch = step / self.per_epoch;
        if self.epoch != Some(epoch) {
            self.order = epoch_order(self.examples, self.seed.wrapping_add(epoch as u64));
            self.epoch = Some(epoch);
        }
        let first = (step % self.per_epoch) * self.batch;
        &self.order[first..first + self.batch]
    }
}

/// Refuses a checkpoint beyond the run's last step (more epochs or fewer
/// examples than the run that wrote it).
pub fn check_resume(resumed_at: usize, total: usize, checkpoint_dir: &Path) -> crate::error::Result<()> {
    if resumed_at > total {
        return Err(crate::error::Error::InvalidArgument(format!(
            "{}: the checkpoint is at step {resumed_at}, beyond this run's {total} steps; \
             train for more epochs or remove the checkpoint folder",
            checkpoint_dir.display()
        )));
    }
    Ok(())
}

pub fn epoch_order(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed;
    for i in (1..n).rev() {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        order.swap(i, (state >> 33) as usize % (i + 1));
    }
    order
}

/// Sets every variable of `varmap` that the safetensors file holds (under
/// its name, or without a leading `bert.`, as sentence-transformers saves a
/// bare encoder); returns the names it does not hold, which keep their
/// initialisation (a new classification head).
pub fn fill_from(varmap: &VarMap, path: &Path) -> crate::error::Result<Vec<String>> {
    let weights = SafetensorsFile::open(path)?;
    let stored = weights.names()?;
    let mut missing = Vec::new();
    let vars = varmap.data().lock().map_err(|_| crate::error::Error::Internal("training: poisoned weights".into()))?;
    for (name, var) in vars.iter() {
        let bare = name.strip_prefix("bert.").unwrap_or(name);
        let Some(found) = [name.as_str(), bare].into_iter().find(|n| {
            stored.iter().any(|s| s == n || s.strip_prefix("bert.") == Some(n) || s.strip_prefix("model.") == Some(n))
        }) else {
            missing.push(name.clone());
            continue;
        };
        let (shape, values) = weights.load(found)?;
        let tensor = Tensor::from_vec(values, shape, var.device()).map_err(candle)?;
        var.set(&tensor)
            .map_err(|e| crate::error::Error::InvalidArgument(format!("{}: {name}: {e}", path.display())))?;
    }
    missing.sort();
    Ok(missing)
}

/// One AdamW step at learning rate `rate`; returns the loss, or an error
/// when it is no longer finite.
pub fn optimizer_step(
    optimizer: &mut candle_nn::AdamW,
    loss: &Tensor,
    rate: f64,
    step: usize,
) -> crate::error::Result<f32> {
    grouped_step(&mut [(optimizer, rate)], loss, step)
}

/// One backward pass and a step of every optimizer at its own rate (groups
/// of parameters that learn at different speeds, such as a new head over a
/// pretrained encoder); returns the loss, or an error when it is no longer
/// finite.
pub fn grouped_step(
    groups: &mut [(&mut candle_nn::AdamW, f64)],
    loss: &Tensor,
    step: usize,
) -> crate::error::Result<f32> {
    use candle_nn::Optimizer;
    let grads = loss.backward().map_err(candle)?;
    for (optimizer, rate) in groups.iter_mut() {
        optimizer.set_learning_rate(*rate);
        optimizer.step(&grads).map_err(candle)?;
    }
    let value = loss.to_scalar::<f32>().map_err(candle)?;
    if !value.is_finite() {
        return Err(crate::error::Error::Internal(format!("training diverged at step {step}: loss {value}")));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_auto_trains_on_the_cpu_and_cuda_says_how_to_build_it() {
        assert_eq!(device_name(&TrainingDevice::Auto.open().unwrap()), "cpu");
        assert_eq!(device_name(&TrainingDevice::Cpu.open().unwrap()), "cpu");
        let refused = TrainingDevice::Cuda.open().unwrap_err();
        assert!(matches!(refused, crate::error::Error::FailedPrecondition(_)), "{refused:?}");
        assert!(refused.to_string().contains("scripts/build-cuda"), "{refused}");
    }

    #[test]
    fn the_device_reads_from_config_in_lower_case() {
        let schedule: Schedule = toml::from_str("device = \"cuda\"").unwrap();
        assert_eq!(schedule.device, TrainingDevice::Cuda);
        assert_eq!(Schedule::default().device, TrainingDevice::Auto);
        assert!(toml::from_str::<Schedule>("device = \"tpu\"").is_err());
    }
}
