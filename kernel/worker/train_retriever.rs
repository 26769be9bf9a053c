//! Fine-tunes the embedding model on the retriever set with
//! MultipleNegativesRankingLoss, as sentence-transformers does: each anchor
//! must score its own positive above every other document of the batch (the
//! other anchors' positives and all hard negatives), cross-entropy over
//! cosine similarities scaled by 20. Gradients and AdamW come from candle,
//! over the BERT of `train_bert.rs`; the starting weights are the serving
//! model's, and the result is a sentence-transformers folder that aitl's own
//! encoder serves and sentence-transformers loads.
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

/// One training example: anchor, positive, optional hard negative.
struct Example<'a> {
    anchor: &'a str,
    positive: &'a str,
    negative: Option<&'a str>,
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
    let examples: Vec<Example> = triplets
        .iter()
        .map(|t| Example { anchor: &t.anchor, positive: &t.positive, negative: Some(&t.negative) })
        .chain(pairs.iter().map(|p| Example { anchor: &p.anchor, positive: &p.positive, negative: None }))
        .collect();
    if examples.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "the retriever set has {} examples; in-batch negatives need at least 2",
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
        let targets = Tensor::arange(0u32, chunk.len() as u32, &encoder.device).map_err(candle)?;
        let loss = candle_nn::loss::cross_entropy(&scores, &targets).map_err(candle)?;
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
