//! Trains a cross-encoder on the ranker set: (query, passage) pairs through
//! BERT, the [CLS] state through the pooler (dense + tanh) and a one-logit
//! classifier, binary cross-entropy against the agents' labels (1, 0.5, 0).
//! It starts from a cross-encoder folder (a previous ranker) or from the
//! embedding model's encoder with a new head, and writes a
//! `BertForSequenceClassification` folder, as sentence-transformers'
//! CrossEncoder saves one, that aitl's Rank serves. Rows carry weights
//! (the judge's weight mode): the loss is their weighted mean, and rows of
//! weight 0 are left out before batching.
//!
//! A new head learns at a rate of its own and starts at the labels' prior.
//! At the encoder's rate (2e-5) Adam moves a random head's weights by about
//! 0.004 in 200 steps: its logits stayed near 0, the loss near ln 2, and no
//! demo round's ranker ever beat the similarity ranker.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use candle_core::Var;
use candle_core::{DType, Device as CandleDevice, Module, Tensor};
use candle_nn::{Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::{
    datasets::RankerRow,
    train_bert::{
        Batches, Schedule, TrainBert, TrainBertConfig, candle, device_name, fill_from, grouped_step, learning_rate,
    },
    train_retriever::{TrainingReport, weighted_mean},
};
use crate::{
    error::{Error, Result},
    model::hf_folder,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RankerTraining {
    /// `max_tokens` counts a (query, passage) pair.
    #[serde(flatten)]
    pub schedule: Schedule,
    /// Peak learning rate of a new head's weights (those the base folder
    /// lacks; same warm-up and decay as the encoder's). A head the base
    /// already has trains at the encoder's rate.
    pub head_learning_rate: f64,
}

impl Default for RankerTraining {
    fn default() -> Self {
        RankerTraining {
            schedule: Schedule { batch_size: 16, max_tokens: 256, ..Schedule::default() },
            head_learning_rate: 1e-3,
        }
    }
}

struct CrossEncoderNet {
    bert: TrainBert,
    pooler: Linear,
    classifier: Linear,
    tokenizer: tokenizers::Tokenizer,
    device: CandleDevice,
}

impl CrossEncoderNet {
    /// One logit per pair (`[n]`).
    fn logits(&self, pairs: &[(&str, &str)]) -> Result<Tensor> {
        let inputs: Vec<tokenizers::EncodeInput> = pairs
            .iter()
            .map(|(q, p)| tokenizers::EncodeInput::Dual(q.to_string().into(), p.to_string().into()))
            .collect();
        let encodings =
            self.tokenizer.encode_batch(inputs, true).map_err(|e| Error::InvalidArgument(format!("tokenizer: {e}")))?;
        let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for e in &encodings {
            let pad = longest - e.len();
            ids.extend(e.get_ids().iter().copied().chain(std::iter::repeat_n(0, pad)));
            types.extend(e.get_type_ids().iter().copied().chain(std::iter::repeat_n(0, pad)));
            mask.extend((0..longest).map(|i| u32::from(i < e.len())));
        }
        let shape = (pairs.len(), longest);
        let tensor = |v: Vec<u32>| Tensor::from_vec(v, shape, &self.device).map_err(candle);
        let hidden = self.bert.forward(&tensor(ids)?, &tensor(types)?, &tensor(mask)?).map_err(candle)?;
        // Contiguous: CUDA's matrix product takes no row stride wider than the row.
        let cls = hidden.narrow(1, 0, 1).and_then(|c| c.squeeze(1)).and_then(|c| c.contiguous()).map_err(candle)?;
        let pooled = self.pooler.forward(&cls).and_then(|p| p.tanh()).map_err(candle)?;
        self.classifier.forward(&pooled).and_then(|l| l.squeeze(1)).map_err(candle)
    }
}

fn load(dir: &Path, max_tokens: usize, device: CandleDevice) -> Result<(CrossEncoderNet, VarMap, Vec<String>)> {
    let config: TrainBertConfig = hf_folder::read_json(&dir.join("config.json"))?
        .ok_or_else(|| Error::NotFound(format!("{}/config.json is missing", dir.display())))?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let h = config.hidden_size;
    let net = CrossEncoderNet {
        bert: TrainBert::load(vb.pp("bert"), &config).map_err(candle)?,
        pooler: candle_nn::linear(h, h, vb.pp("bert.pooler.dense")).map_err(candle)?,
        classifier: candle_nn::linear(h, 1, vb.pp("classifier")).map_err(candle)?,
        tokenizer: {
            let mut t = hf_folder::tokenizer(dir, Some(max_tokens))?;
            t.with_padding(None);
            t
        },
        device,
    };
    let fresh = fill_from(&varmap, &dir.join("model.safetensors"))?;
    if let Some(name) = fresh.iter().find(|n| !n.starts_with("classifier.") && !n.starts_with("bert.pooler.")) {
        return Err(Error::InvalidArgument(format!("{}: encoder weight {name} is missing", dir.display())));
    }
    Ok((net, varmap, fresh))
}

/// Writes the folder: config (as a one-label classifier), tokenizer files, weights.
fn write_folder(base: &Path, varmap: &VarMap, out: &Path) -> Result<()> {
    let fail = |e: std::io::Error| Error::Internal(format!("{}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(fail)?;
    for file in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"] {
        if base.join(file).exists() {
            std::fs::copy(base.join(file), out.join(file)).map_err(fail)?;
        }
    }
    let mut config: serde_json::Value = hf_folder::read_json(&base.join("config.json"))?.unwrap_or_default();
    config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    config["id2label"] = serde_json::json!({"0": "LABEL_0"});
    config["label2id"] = serde_json::json!({"LABEL_0": 0});
    config["num_labels"] = serde_json::json!(1);
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).map_err(|e| Error::Internal(e.to_string()))?,
    )
    .map_err(fail)?;
    std::fs::write(
        out.join("config_sentence_transformers.json"),
        r#"{"activation_fn": "torch.nn.modules.activation.Sigmoid"}"#,
    )
    .map_err(fail)?;
    varmap.save(out.join("model.safetensors")).map_err(candle)
}

/// Binary cross-entropy of logits `x` against targets `y`, weighted-averaged
/// with weights `w`, in the stable form `max(x, 0) − x·y + ln(1 + e^−|x|)`
/// (candle's version takes the log of a sigmoid, which reaches −∞ for
/// confident logits).
fn binary_cross_entropy(x: &Tensor, y: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let softplus = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    weighted_mean(&((x.relu()? - (x * y)?)? + softplus)?, w)
}

/// The rows that train: those of a positive, finite weight.
fn weighted_rows(rows: &[RankerRow]) -> Vec<&RankerRow> {
    rows.iter().filter(|r| r.weight.is_finite() && r.weight > 0.0).collect()
}

/// The log-odds of the rows' weighted mean label, kept within ±ln 999: the
/// bias at which a new classifier starts, so its first loss is the labels'
/// entropy instead of ln 2 (agents mark most shown objects irrelevant).
fn prior_log_odds(rows: &[&RankerRow]) -> f32 {
    let total: f64 = rows.iter().map(|r| f64::from(r.weight)).sum();
    let positive: f64 = rows.iter().map(|r| f64::from(r.weight * r.label)).sum();
    let p = (positive / total.max(f64::MIN_POSITIVE)).clamp(1e-3, 1.0 - 1e-3);
    (p / (1.0 - p)).ln() as f32
}

/// `len` draws from N(0, σ²), the same for the same seed (candle's `randn`
/// draws from an unseeded generator): a seeded schedule trains the same
/// head twice.
fn seeded_normal(len: usize, sigma: f32, seed: u64) -> Vec<f32> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut uniform = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32 * sigma
        })
        .collect()
}

/// The variables of the new head (named in `fresh`) and the rest.
fn head_and_encoder(varmap: &VarMap, fresh: &[String]) -> Result<(Vec<Var>, Vec<Var>)> {
    let vars = varmap.data().lock().map_err(|_| Error::Internal("training: poisoned weights".into()))?;
    let (head, encoder): (Vec<_>, Vec<_>) = vars.iter().partition(|(name, _)| fresh.contains(name));
    let take = |group: Vec<(&String, &Var)>| group.into_iter().map(|(_, var)| var.clone()).collect();
    Ok((take(head), take(encoder)))
}

fn set_fresh(
    varmap: &VarMap,
    name: &str,
    init: impl Fn(&candle_core::Shape, &CandleDevice) -> candle_core::Result<Tensor>,
) -> Result<()> {
    let vars = varmap.data().lock().map_err(|_| Error::Internal("training: poisoned weights".into()))?;
    let var = vars.get(name).ok_or_else(|| Error::Internal(format!("training: no variable {name}")))?;
    var.set(&init(var.shape(), var.device()).map_err(candle)?).map_err(candle)
}

pub fn train_ranker(
    base: &Path,
    rows: &[RankerRow],
    output: &Path,
    options: &RankerTraining,
    mut progress: impl FnMut(usize, usize, f32),
) -> Result<TrainingReport> {
    let started = Instant::now();
    let rows = weighted_rows(rows);
    if rows.len() < 2 {
        return Err(Error::InvalidArgument(format!("the ranker set has {} rows of positive weight", rows.len())));
    }
    let schedule = &options.schedule;
    let (net, varmap, fresh) = load(base, schedule.max_tokens, schedule.device.open()?)?;
    if fresh.iter().any(|name| name == "classifier.bias") {
        let prior = prior_log_odds(&rows);
        set_fresh(&varmap, "classifier.bias", |shape, device| Tensor::full(prior, shape, device))?;
        // Hugging Face's initialisation of a classification head (normal, σ 0.02):
        // small logits, so the first loss is the prior's and not a random head's.
        set_fresh(&varmap, "classifier.weight", |shape, device| {
            Tensor::from_vec(seeded_normal(shape.elem_count(), 0.02, schedule.seed), shape, device)
        })?;
        tracing::info!(?fresh, prior, head_learning_rate = options.head_learning_rate, "new cross-encoder head");
    }
    let (batch, per_epoch, total) = schedule.steps(rows.len(), 1);
    let (head, encoder) = head_and_encoder(&varmap, &fresh)?;
    let mut encoder_optimizer = schedule.optimizer(encoder)?;
    let mut head_optimizer = schedule.optimizer(head)?;
    let mut batches = Batches::new(rows.len(), (batch, per_epoch), schedule.seed);
    let mut losses = Vec::new();
    for step in 0..total {
        let chunk: Vec<&RankerRow> = batches.at(step).iter().map(|&i| rows[i]).collect();
        let pairs: Vec<(&str, &str)> = chunk.iter().map(|r| (r.query.as_str(), r.passage.as_str())).collect();
        let labels = Tensor::from_vec(chunk.iter().map(|r| r.label).collect::<Vec<f32>>(), chunk.len(), &net.device)
            .map_err(candle)?;
        let weights = Tensor::from_vec(chunk.iter().map(|r| r.weight).collect::<Vec<f32>>(), chunk.len(), &net.device)
            .map_err(candle)?;
        let logits = net.logits(&pairs)?;
        let loss = binary_cross_entropy(&logits, &labels, &weights).map_err(candle)?;
        let rate = learning_rate(schedule.learning_rate, schedule.warmup_share, step, total);
        let head_rate = learning_rate(options.head_learning_rate, schedule.warmup_share, step, total);
        let value = grouped_step(&mut [(&mut encoder_optimizer, rate), (&mut head_optimizer, head_rate)], &loss, step)?;
        losses.push(value);
        progress(step + 1, total, value);
    }
    write_folder(base, &varmap, output)?;
    Ok(TrainingReport {
        steps: total,
        losses,
        seconds: started.elapsed().as_secs_f64(),
        output: PathBuf::from(output),
        resumed_at: 0,
        device: device_name(&net.device),
    })
}

/// Sigmoid scores of `pairs` by the (trained) folder, computed with candle.
pub fn score_with_candle(dir: &Path, pairs: &[(&str, &str)], max_tokens: usize) -> Result<Vec<f32>> {
    let (net, _, _) = load(dir, max_tokens, CandleDevice::Cpu)?;
    let scores = candle_nn::ops::sigmoid(&net.logits(pairs)?).map_err(candle)?;
    scores.to_vec1::<f32>().map_err(candle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: f32, weight: f32) -> RankerRow {
        RankerRow { query: "q".into(), passage: format!("p{label}"), label, weight }
    }

    /// A zero-weight row is left out before batching, and inside a batch it
    /// would add nothing to the loss; equal weights give the plain mean.
    /// By hand: 3 of weight 1 and a half-weight positive: p = 1.5 / 3.5.
    #[test]
    fn a_new_head_starts_at_the_weighted_prior() {
        let rows = [row(1.0, 1.0), row(0.0, 1.0), row(0.0, 1.0), row(1.0, 0.5)];
        let kept: Vec<&RankerRow> = rows.iter().collect();
        let p = 1.5f64 / 3.5;
        assert!((f64::from(prior_log_odds(&kept)) - (p / (1.0 - p)).ln()).abs() < 1e-6);
        let all_positive = [row(1.0, 1.0)];
        assert!((f64::from(prior_log_odds(&[&all_positive[0]])) - 999f64.ln()).abs() < 1e-3);

        let draws = seeded_normal(20_000, 0.02, 7);
        assert_eq!(draws, seeded_normal(20_000, 0.02, 7));
        assert_ne!(draws, seeded_normal(20_000, 0.02, 8));
        let mean = draws.iter().map(|&x| f64::from(x)).sum::<f64>() / 20_000.0;
        let sd = (draws.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / 20_000.0).sqrt();
        assert!(mean.abs() < 1e-3 && (sd - 0.02).abs() < 1e-3, "mean {mean}, sd {sd}");
    }

    #[test]
    fn a_zero_weight_row_changes_nothing() {
        let rows = [row(1.0, 1.0), row(0.0, 0.0), row(0.5, 0.5)];
        let kept: Vec<&RankerRow> = weighted_rows(&rows);
        assert_eq!(kept, [&rows[0], &rows[2]]);

        let device = CandleDevice::Cpu;
        let t = |v: &[f32]| Tensor::new(v, &device).unwrap();
        let loss = |x: &[f32], y: &[f32], w: &[f32]| {
            binary_cross_entropy(&t(x), &t(y), &t(w)).unwrap().to_scalar::<f32>().unwrap()
        };
        let two = loss(&[2.0, -1.0], &[1.0, 0.5], &[1.0, 0.5]);
        let three = loss(&[2.0, 5.0, -1.0], &[1.0, 0.0, 0.5], &[1.0, 0.0, 0.5]);
        assert!((two - three).abs() < 1e-7, "{two} vs {three}");
        // By hand: BCE(x, y) = max(x, 0) − xy + ln(1 + e^−|x|).
        let bce = |x: f64, y: f64| x.max(0.0) - x * y + (1.0 + (-x.abs()).exp()).ln();
        let expected = (bce(2.0, 1.0) + 0.5 * bce(-1.0, 0.5)) / 1.5;
        assert!((f64::from(two) - expected).abs() < 1e-6, "{two} vs {expected}");
        let mean = loss(&[2.0, -1.0], &[1.0, 0.5], &[0.7, 0.7]);
        assert!((f64::from(mean) - (bce(2.0, 1.0) + bce(-1.0, 0.5)) / 2.0).abs() < 1e-6);
    }
}
