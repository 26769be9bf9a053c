//! Fine-tunes the embedding model on the retriever set with
//! MultipleNegativesRankingLoss, as sentence-transformers does: each anchor
//! must score its own positive above every other document of the batch (the
//! other anchors' positives and all hard negatives), cross-entropy over
//! cosine similarities scaled by 20. Gradients and AdamW come from candle,
//! over the BERT of `train_bert.rs`; the starting weights are the serving
//! model's, and the result is a sentence-transformers folder that aitl's own
//! encoder serves and sentence-transformers loads.
//!
//! Rows carry weights (the judge's weight mode, `weights.rs`): the loss is
//! the weighted mean of the anchors' cross-entropies, and a row of weight 0
//! is left out before batching, so it neither trains nor serves as an
//! in-batch negative: the run is the one without it.
//!
//! Checkpoints hold the weights and the step; a resumed run continues from
//! the step with fresh optimizer moments (candle's AdamW state is not
//! serialisable), which is the usual warm restart.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use candle_core::{DType, Device as CandleDevice, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::{
    datasets::{RetrieverPair, RetrieverTriplet},
    train_bert::{
        Batches, Schedule, TrainBert, TrainBertConfig, candle, check_resume, device_name, fill_from, learning_rate,
        optimizer_step,
    },
};
use crate::{
    error::{Error, Result},
    model::hf_folder,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RetrieverTraining {
    #[serde(flatten)]
    pub schedule: Schedule,
    /// MultipleNegativesRankingLoss's similarity scale.
    pub scale: f64,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
}

impl Default for RetrieverTraining {
    fn default() -> Self {
        RetrieverTraining { schedule: Schedule::default(), scale: 20.0, checkpoint_every: 200 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingReport {
    pub steps: usize,
    /// Loss of each step this run made.
    pub losses: Vec<f32>,
    pub seconds: f64,
    pub output: PathBuf,
    /// The step the run resumed from (0 for a fresh run).
    pub resumed_at: usize,
    /// What computed it: "cpu" or "cuda:N".
    pub device: String,
}

/// One training example: anchor, positive, optional hard negative, weight.
#[derive(Debug, PartialEq)]
struct Example<'a> {
    anchor: &'a str,
    positive: &'a str,
    negative: Option<&'a str>,
    weight: f32,
}

/// The examples that train: every row of a positive, finite weight.
fn examples<'a>(triplets: &'a [RetrieverTriplet], pairs: &'a [RetrieverPair]) -> Vec<Example<'a>> {
    triplets
        .iter()
        .map(|t| Example { anchor: &t.anchor, positive: &t.positive, negative: Some(&t.negative), weight: t.weight })
        .chain(pairs.iter().map(|p| Example {
            anchor: &p.anchor,
            positive: &p.positive,
            negative: None,
            weight: p.weight,
        }))
        .filter(|e| e.weight.is_finite() && e.weight > 0.0)
        .collect()
}

/// Σ wᵢ·xᵢ / Σ wᵢ of `[n]` tensors: a mean when the weights are equal.
pub(super) fn weighted_mean(values: &Tensor, weights: &Tensor) -> candle_core::Result<Tensor> {
    (values * weights)?.sum_all()?.broadcast_div(&weights.sum_all()?)
}

/// MultipleNegativesRankingLoss with row weights: anchor i's cross-entropy
/// of its scores (`[n, documents]`) against its own positive (column i),
/// weighted-averaged over the anchors.
fn weighted_ranking_loss(scores: &Tensor, weights: &Tensor) -> candle_core::Result<Tensor> {
    let n = scores.dim(0)?;
    let log_p = candle_nn::ops::log_softmax(scores, 1)?;
    let own = Tensor::arange(0u32, n as u32, scores.device())?.unsqueeze(1)?;
    let nll = log_p.gather(&own, 1)?.squeeze(1)?.neg()?;
    weighted_mean(&nll, weights)
}

/// Side files of a sentence-transformers folder, copied to the trained one.
const SIDE_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
];

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    step: usize,
}

struct Encoder {
    model: TrainBert,
    tokenizer: tokenizers::Tokenizer,
    device: CandleDevice,
}

impl Encoder {
    /// Mean-pooled, L2-normalised embeddings of `texts` (`[n, hidden]`).
    fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::InvalidArgument(format!("tokenizer: {e}")))?;
        let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for e in &encodings {
            ids.extend(e.get_ids().iter().copied().chain(std::iter::repeat(0)).take(longest));
            mask.extend((0..longest).map(|i| u32::from(i < e.len())));
        }
        let n = texts.len();
        let ids = Tensor::from_vec(ids, (n, longest), &self.device).map_err(candle)?;
        let mask = Tensor::from_vec(mask, (n, longest), &self.device).map_err(candle)?;
        let types = ids.zeros_like().map_err(candle)?;
        let hidden = self.model.forward(&ids, &types, &mask).map_err(candle)?;
        let weights = mask.to_dtype(DType::F32).map_err(candle)?.unsqueeze(2).map_err(candle)?;
        let summed = hidden.broadcast_mul(&weights).and_then(|h| h.sum(1)).map_err(candle)?;
        let counts = weights.sum(1).map_err(candle)?;
        let mean = summed.broadcast_div(&counts).map_err(candle)?;
        let norm = mean.sqr().and_then(|s| s.sum_keepdim(1)).and_then(|s| s.sqrt()).map_err(candle)?;
        mean.broadcast_div(&norm.clamp(1e-12, f64::MAX).map_err(candle)?).map_err(candle)
    }
}

/// Loads `dir`'s BERT into trainable variables.
fn load(dir: &Path, max_tokens: usize, device: CandleDevice) -> Result<(Encoder, VarMap)> {
    let config: TrainBertConfig = hf_folder::read_json(&dir.join("config.json"))?
        .ok_or_else(|| Error::NotFound(format!("{}/config.json is missing", dir.display())))?;
    let pooling: Option<serde_json::Value> = hf_folder::read_json(&dir.join("1_Pooling/config.json"))?;
    if pooling.is_some_and(|p| p["pooling_mode_mean_tokens"] != serde_json::Value::Bool(true)) {
        return Err(Error::InvalidArgument(format!(
            "{}: retriever training uses mean pooling; this model pools otherwise",
            dir.display()
        )));
    }
    let varmap = VarMap::new();
    let model = TrainBert::load(VarBuilder::from_varmap(&varmap, DType::F32, &device), &config).map_err(candle)?;
    let missing = fill_from(&varmap, &dir.join("model.safetensors"))?;
    if !missing.is_empty() {
        return Err(Error::InvalidArgument(format!("{}: weights {missing:?} are missing", dir.display())));
    }
    let mut tokenizer = hf_folder::tokenizer(dir, Some(max_tokens))?;
    tokenizer.with_padding(None);
    Ok((Encoder { model, tokenizer, device }, varmap))
}

/// Copies the serving folder's side files and writes `weights`.
fn write_folder(base: &Path, varmap: &VarMap, out: &Path) -> Result<()> {
    let fail = |e: std::io::Error| Error::Internal(format!("{}: {e}", out.display()));
    std::fs::create_dir_all(out.join("1_Pooling")).map_err(fail)?;
    for file in SIDE_FILES {
        let from = base.join(file);
        if from.exists() {
            std::fs::copy(&from, out.join(file)).map_err(fail)?;
        }
    }
    varmap.save(out.join("model.safetensors")).map_err(candle)
}

/// Trains from the folder `base`; writes the trained folder to `output`
/// (checkpoints to `output/checkpoint`, from which a rerun resumes).
pub fn train_retriever(
    base: &Path,
    triplets: &[RetrieverTriplet],
    pairs: &[RetrieverPair],
    output: &Path,
    options: &RetrieverTraining,
    mut progress: impl FnMut(usize, usize, f32),
) -> Result<TrainingReport> {
    let started = Instant::now();
    let examples = examples(triplets, pairs);
    if examples.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "the retriever set has {} examples of positive weight; in-batch negatives need at least 2",
            examples.len()
        )));
    }
    let checkpoint_dir = output.join("checkpoint");
    let resumed: Option<Checkpoint> = hf_folder::read_json(&checkpoint_dir.join("checkpoint.json"))?;
    let start_from = if resumed.is_some() { &checkpoint_dir } else { base };
    let schedule = &options.schedule;
    let (encoder, varmap) = load(start_from, schedule.max_tokens, schedule.device.open()?)?;
    let resumed_at = resumed.map_or(0, |c| c.step);

    let (batch, per_epoch, total) = schedule.steps(examples.len(), 2);
    check_resume(resumed_at, total, &checkpoint_dir)?;
    let mut optimizer = schedule.optimizer(varmap.all_vars())?;
    let mut losses = Vec::new();
    let mut batches = Batches::new(examples.len(), (batch, per_epoch), schedule.seed);
    for step in resumed_at..total {
        let chunk: Vec<&Example> = batches.at(step).iter().map(|&i| &examples[i]).collect();
        let anchors: Vec<&str> = chunk.iter().map(|e| e.anchor).collect();
        let documents: Vec<&str> =
            chunk.iter().map(|e| e.positive).chain(chunk.iter().filter_map(|e| e.negative)).collect();
        let a = encoder.embed(&anchors)?;
        let d = encoder.embed(&documents)?;
        let scores = a.matmul(&d.t().map_err(candle)?).and_then(|s| s * options.scale).map_err(candle)?;
        let weights =
            Tensor::from_vec(chunk.iter().map(|e| e.weight).collect::<Vec<f32>>(), chunk.len(), &encoder.device)
                .map_err(candle)?;
        let loss = weighted_ranking_loss(&scores, &weights).map_err(candle)?;
        let rate = learning_rate(schedule.learning_rate, schedule.warmup_share, step, total);
        let value = optimizer_step(&mut optimizer, &loss, rate, step)?;
        losses.push(value);
        progress(step + 1, total, value);
        if options.checkpoint_every > 0 && (step + 1) % options.checkpoint_every == 0 && step + 1 < total {
            write_folder(base, &varmap, &checkpoint_dir)?;
            let text =
                serde_json::to_string(&Checkpoint { step: step + 1 }).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(checkpoint_dir.join("checkpoint.json"), text)
                .map_err(|e| Error::Internal(format!("{}: {e}", checkpoint_dir.display())))?;
        }
    }
    write_folder(base, &varmap, output)?;
    let _ = std::fs::remove_dir_all(&checkpoint_dir);
    Ok(TrainingReport {
        steps: total - resumed_at,
        losses,
        seconds: started.elapsed().as_secs_f64(),
        output: output.to_owned(),
        resumed_at,
        device: device_name(&encoder.device),
    })
}

/// Embeddings of `texts` by the (trained) folder, computed with candle: what
/// aitl's own encoder must reproduce when it serves the folder.
pub fn embed_with_candle(dir: &Path, texts: &[&str], max_tokens: usize) -> Result<Vec<Vec<f32>>> {
    let (encoder, _) = load(dir, max_tokens, CandleDevice::Cpu)?;
    encoder.embed(texts)?.to_vec2::<f32>().map_err(candle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triplet(i: usize, weight: f32) -> RetrieverTriplet {
        RetrieverTriplet { anchor: format!("q{i}"), positive: format!("p{i}"), negative: format!("n{i}"), weight }
    }

    /// A zero-weight row is gone before batching: the examples, hence the
    /// batches and every step, are those of the set without it.
    #[test]
    fn a_zero_weight_row_changes_nothing() {
        let with: Vec<RetrieverTriplet> = vec![triplet(0, 1.0), triplet(1, 0.0), triplet(2, 0.5)];
        let without: Vec<RetrieverTriplet> = vec![triplet(0, 1.0), triplet(2, 0.5)];
        let pairs = [RetrieverPair { anchor: "a".into(), positive: "b".into(), weight: 0.0 }];
        assert_eq!(examples(&with, &pairs), examples(&without, &[]));
        assert_eq!(examples(&with, &pairs).len(), 2);
    }

    /// Equal weights give candle's mean cross-entropy; unequal ones the
    /// weighted mean of the per-anchor values (computed here by hand).
    #[test]
    fn the_ranking_loss_is_a_weighted_mean_of_cross_entropies() {
        let device = CandleDevice::Cpu;
        let scores = Tensor::new(&[[2.0f32, 0.0, -1.0], [0.5, 1.5, 0.0]], &device).unwrap();
        let targets = Tensor::new(&[0u32, 1], &device).unwrap();
        let mean = candle_nn::loss::cross_entropy(&scores, &targets).unwrap().to_scalar::<f32>().unwrap();
        let equal = Tensor::new(&[0.3f32, 0.3], &device).unwrap();
        let loss = weighted_ranking_loss(&scores, &equal).unwrap().to_scalar::<f32>().unwrap();
        assert!((loss - mean).abs() < 1e-6, "{loss} vs {mean}");
        // Row cross-entropies: ln(e² + 1 + e⁻¹) − 2 and ln(e^0.5 + e^1.5 + 1) − 1.5.
        let ce = |row: [f64; 3], own: usize| row.iter().map(|x| x.exp()).sum::<f64>().ln() - row[own];
        let (a, b) = (ce([2.0, 0.0, -1.0], 0), ce([0.5, 1.5, 0.0], 1));
        let weights = Tensor::new(&[1.0f32, 3.0], &device).unwrap();
        let loss = weighted_ranking_loss(&scores, &weights).unwrap().to_scalar::<f32>().unwrap();
        assert!((f64::from(loss) - (a + 3.0 * b) / 4.0).abs() < 1e-5, "{loss}");
        // Weight 0 on the second row: the first row's loss alone.
        let weights = Tensor::new(&[1.0f32, 0.0], &device).unwrap();
        let loss = weighted_ranking_loss(&scores, &weights).unwrap().to_scalar::<f32>().unwrap();
        assert!((f64::from(loss) - a).abs() < 1e-5, "{loss}");
    }
}
