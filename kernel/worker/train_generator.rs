//! ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization
//! without Reference Model") on LoRA adapters over the frozen serving
//! generator, as TRL's `ORPOTrainer` (trl 1.16, `trl.experimental.orpo`)
//! computes it, with gradients from candle's autograd over
//! `train_llama.rs`.
//!
//! Tokenization follows TRL's `tokenize_row`: the prompt is the serving chat
//! template with the generation prompt; the completion is what the template
//! adds for the assistant's message (ChatML: `{answer}<|im_end|>\n`), and the
//! end-of-sequence token is appended unless it already ends it. For each pair:
//!
//! - `logps` = the mean log-probability of the completion's tokens (TRL's
//!   `average_log_prob=True`), for chosen `c` and rejected `r`;
//! - `log_odds = (c − r) − (log(1 − eᶜ) − log(1 − eʳ))`;
//! - `loss = NLL(chosen) − λ · mean(log σ(log_odds))`, λ = 0.1 by default.
//!
//! The NLL is a token mean over the whole batch's chosen sequences. TRL
//! counts the prompt's tokens in it too ("computed over the full prompt and
//! response", [`NllTokens::Sequence`]); the issue asks for prompts masked
//! ([`NllTokens::Completion`], the default here: a support prompt is mostly
//! retrieved knowledge, which the generator should read, not learn to
//! write). Per-pair weights (preference strength) turn both means into
//! weighted means: the NLL weighs each chosen token by its pair's weight,
//! the odds-ratio term each pair; with all weights 1 this is TRL's loss.
//!
//! The result is a PEFT folder (`adapter_config.json`,
//! `adapter_model.safetensors`) that `PeftModel.from_pretrained` loads over
//! the same base, and `aitl_manifest.json`. Checkpoints hold the adapters
//! and the step; a resumed run continues at that step with fresh AdamW
//! moments, as the other trainers do.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Instant,
};

use candle_core::{D, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    datasets::GeneratorRow,
    train_bert::{Batches, Schedule, candle, check_resume, device_name, learning_rate, optimizer_step},
    train_llama::{LoraConfig, Pass, TrainLlama},
};
use crate::{
    error::{Error, Result},
    model::{
        chat::{ChatTokenizer, Role},
        gguf::GgufFile,
        hf_folder,
    },
    registry::{self, manifest::TrainedManifest},
};

/// Which tokens of the chosen sequence the NLL term counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NllTokens {
    /// The completion only: prompt tokens masked.
    #[default]
    Completion,
    /// Prompt and completion, as TRL's ORPOTrainer.
    Sequence,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GeneratorTraining {
    #[serde(flatten)]
    pub schedule: Schedule,
    pub lora: LoraConfig,
    /// ORPO's λ (TRL's `beta`): the odds-ratio term's weight.
    pub lambda: f64,
    pub nll_tokens: NllTokens,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
}

impl Default for GeneratorTraining {
    fn default() -> Self {
        GeneratorTraining {
            // LoRA takes rates far above full fine-tuning's; no weight decay
            // on the adapters (TRL's default).
            // One pair a step: candle keeps every activation of a step for
            // its backward pass, and a pair of ~600-token sequences through
            // SmolLM2-135M already peaks at 13 GB (benches/train_generator.rs).
            schedule: Schedule {
                batch_size: 1,
                learning_rate: 1e-4,
                weight_decay: 0.0,
                max_tokens: 1024,
                ..Schedule::default()
            },
            lora: LoraConfig::default(),
            lambda: 0.1,
            nll_tokens: NllTokens::Completion,
            checkpoint_every: 100,
        }
    }
}

/// A tokenized sequence: prompt then completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Where the completion starts (its first token's index).
    pub completion_start: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    pub chosen: Sequence,
    pub rejected: Sequence,
    pub weight: f32,
}

fn role(name: &str) -> Result<Role> {
    match name {
        "system" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        other => Err(Error::InvalidArgument(format!("generator row: unknown role {other:?}"))),
    }
}

/// TRL's `tokenize_row` for one prompt and answer, through the serving
/// template; sequences longer than `max_tokens` lose the prompt's start
/// first, then the completion's end.
fn tokenize(tokenizer: &ChatTokenizer, prompt: &[(Role, &str)], answer: &str, max_tokens: usize) -> Result<Sequence> {
    let prompt_text = tokenizer.render(prompt);
    let mut all = prompt.to_vec();
    all.push((Role::Assistant, answer));
    let full = tokenizer.render(&all);
    // The template renders a trailing generation prompt after the answer;
    // what lies between the prompt and it is the assistant's message.
    let generation_prompt = tokenizer.render(&[]);
    let completion = full
        .strip_prefix(prompt_text.as_str())
        .and_then(|rest| rest.strip_suffix(generation_prompt.as_str()))
        .ok_or_else(|| {
            Error::InvalidArgument("the chat template does not render the prompt as a prefix of the reply".into())
        })?;
    let prompt_ids = tokenizer.encode(&prompt_text)?;
    let mut ids = tokenizer.encode(&format!("{prompt_text}{completion}"))?;
    // TRL moves the boundary one left when the prompt's last token merged
    // with the answer's first.
    let mut start = prompt_ids.len();
    if ids.get(..start) != Some(prompt_ids.as_slice()) {
        start = start.saturating_sub(1);
    }
    if ids.last() != Some(&tokenizer.eos) {
        ids.push(tokenizer.eos);
    }
    if ids.len() > max_tokens.max(2) {
        let excess = (ids.len() - max_tokens.max(2)).min(start.saturating_sub(1));
        ids.drain(..excess);
        start -= excess;
        ids.truncate(max_tokens.max(2));
    }
    if start == 0 || start >= ids.len() {
        return Err(Error::InvalidArgument(format!("a pair leaves no completion token within {max_tokens} tokens")));
    }
    Ok(Sequence { ids, completion_start: start })
}

/// One row as TRL's trainer tokenizes it.
pub fn tokenize_pair(tokenizer: &ChatTokenizer, row: &GeneratorRow, max_tokens: usize) -> Result<TokenizedPair> {
    let prompt: Vec<(Role, &str)> =
        row.prompt.iter().map(|m| Ok((role(&m.role)?, m.content.as_str()))).collect::<Result<_>>()?;
    let answer = |messages: &[super::datasets::Message]| -> Result<String> {
        match messages {
            [m] if m.role == "assistant" => Ok(m.content.clone()),
            _ => Err(Error::InvalidArgument("a chosen or rejected reply must be one assistant message".into())),
        }
    };
    Ok(TokenizedPair {
        chosen: tokenize(tokenizer, &prompt, &answer(&row.chosen)?, max_tokens)?,
        rejected: tokenize(tokenizer, &prompt, &answer(&row.rejected)?, max_tokens)?,
        weight: row.weight,
    })
}

/// ORPO's loss and its parts for one batch of pairs.
pub struct OrpoTerms {
    pub loss: Tensor,
    /// The NLL term (weighted token mean).
    pub nll: Tensor,
    /// Weighted mean of log σ(log_odds) (TRL's `log_odds_ratio`).
    pub odds_ratio: Tensor,
    /// Per pair: mean completion log-probabilities and the log-odds ratio.
    pub chosen_logps: Tensor,
    pub rejected_logps: Tensor,
    pub log_odds: Tensor,
}

/// `log(1 − eˣ)` for x < 0.
fn log1m_exp(x: &Tensor) -> candle_core::Result<Tensor> {
    x.exp()?.affine(-1.0, 1.0)?.log()
}

/// `log σ(x) = −(max(−x, 0) + ln(1 + e^−|x|))`, stable for any x.
fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let softplus = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    (x.neg()?.relu()? + softplus)?.neg()
}

/// The loss over `pairs` in one forward of chosen then rejected rows,
/// right-padded (TRL's `concatenated_forward`).
pub fn orpo_loss(
    model: &TrainLlama,
    pairs: &[&TokenizedPair],
    lambda: f64,
    nll_tokens: NllTokens,
    pass: Pass,
) -> Result<OrpoTerms> {
    orpo(model, pairs, lambda, nll_tokens, pass).map_err(candle)
}

fn orpo(
    model: &TrainLlama,
    pairs: &[&TokenizedPair],
    lambda: f64,
    nll_tokens: NllTokens,
    pass: Pass,
) -> candle_core::Result<OrpoTerms> {
    let device = model.device();
    let n = pairs.len();
    if n == 0 {
        candle_core::bail!("ORPO needs at least one pair");
    }
    let rows: Vec<&Sequence> = pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect();
    let longest = rows.iter().map(|s| s.ids.len()).max().unwrap_or(2);
    // Position t predicts token t + 1: masks and targets over longest − 1 positions.
    let width = longest - 1;
    let (mut ids, mut targets, mut completion, mut nll_mask) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut completion_counts = Vec::new();
    for (r, s) in rows.iter().enumerate() {
        let len = s.ids.len();
        ids.extend(s.ids.iter().copied().chain(std::iter::repeat_n(0, longest - len)));
        targets.extend((1..longest).map(|t| s.ids.get(t).copied().unwrap_or(0)));
        let in_completion = |t: usize| t + 1 >= s.completion_start && t + 1 < len;
        completion.extend((0..width).map(|t| f32::from(u8::from(in_completion(t)))));
        completion_counts.push((len - s.completion_start) as f32);
        let weight = if r < n { pairs[r].weight } else { 0.0 };
        nll_mask.extend((0..width).map(|t| {
            let counted = match nll_tokens {
                NllTokens::Completion => in_completion(t),
                NllTokens::Sequence => t + 1 < len,
            };
            if counted { weight } else { 0.0 }
        }));
    }
    let rows_n = rows.len();
    let ids = Tensor::from_vec(ids, (rows_n, longest), device)?;
    let targets = Tensor::from_vec(targets, (rows_n, width, 1), device)?;
    let completion = Tensor::from_vec(completion, (rows_n, width), device)?;
    let nll_mask = Tensor::from_vec(nll_mask, (rows_n, width), device)?;
    let logits = model.logits(&ids, pass).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, width)?, D::Minus1)?;
    let token_logp = logp.gather(&targets, 2)?.squeeze(2)?;

    let counts = Tensor::from_vec(completion_counts, rows_n, device)?;
    let logps = (token_logp.clone() * completion)?.sum(1)?.div(&counts)?;
    let (c, r) = (logps.narrow(0, 0, n)?, logps.narrow(0, n, n)?);
    let log_odds = ((&c - &r)? - (log1m_exp(&c)? - log1m_exp(&r)?)?)?;

    let nll_total = nll_mask.sum_all()?;
    let nll = (token_logp * &nll_mask)?.sum_all()?.neg()?.div(&nll_total)?;
    let weights: Vec<f32> = pairs.iter().map(|p| p.weight).collect();
    let weight_sum: f32 = weights.iter().sum();
    let weights = Tensor::from_vec(weights, n, device)?;
    let odds_ratio = (log_sigmoid(&log_odds)? * weights)?.sum_all()?.affine(1.0 / f64::from(weight_sum), 0.0)?;
    let loss = (&nll - odds_ratio.affine(lambda, 0.0)?)?;
    Ok(OrpoTerms { loss, nll, odds_ratio, chosen_logps: c, rejected_logps: r, log_odds })
}

/// Share of `pairs` whose log-odds favour the chosen reply (adapters
/// without dropout), in batches of `batch`.
pub fn preference_accuracy(model: &TrainLlama, pairs: &[TokenizedPair], batch: usize) -> Result<Option<f64>> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut favoured = 0usize;
    for chunk in pairs.chunks(batch.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let terms = orpo_loss(model, &refs, 0.0, NllTokens::Completion, Pass::Evaluate)?;
        favoured += terms.log_odds.to_vec1::<f32>().map_err(candle)?.iter().filter(|&&l| l > 0.0).count();
    }
    Ok(Some(favoured as f64 / pairs.len() as f64))
}

/// The chat tokenizer beside the base: a folder's `tokenizer.json`, or a
/// GGUF file's vocabulary.
pub fn base_tokenizer(base: &Path) -> Result<ChatTokenizer> {
    if base.is_dir() { ChatTokenizer::from_hf_folder(base) } else { ChatTokenizer::from_gguf(&GgufFile::open(base)?) }
}

/// PEFT's `adapter_config.json` for adapters on `targets` (the modules
/// that matched, so PEFT finds each one in the base).
pub fn adapter_config(lora: &LoraConfig, targets: &[String], base: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// The file names of a PEFT folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Writes the PEFT folder `out` for `model`'s adapters.
pub fn write_adapter(model: &TrainLlama, base: &Path, out: &Path) -> Result<()> {
    let fail = |e: std::io::Error| Error::Internal(format!("{}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(fail)?;
    let config = adapter_config(model.lora(), &model.adapted_modules(), &base.display().to_string());
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(out.join(ADAPTER_CONFIG), text).map_err(fail)?;
    candle_core::safetensors::save(&model.adapter_tensors(), out.join(ADAPTER_WEIGHTS)).map_err(candle)
}

/// Sets `model`'s adapters from a PEFT folder's weights.
pub fn read_adapter(model: &TrainLlama, dir: &Path) -> Result<()> {
    let tensors = candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS), model.device())
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", dir.join(ADAPTER_WEIGHTS).display())))?;
    model.set_adapters(&tensors)
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    step: usize,
}

/// What a run did, and held-out preference accuracy before and after.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneratorReport {
    pub steps: usize,
    pub losses: Vec<f32>,
    pub seconds: f64,
    pub output: PathBuf,
    pub resumed_at: usize,
    pub device: String,
    pub examples: usize,
    pub heldout_pairs: usize,
    /// Share of held-out pairs whose log-odds favour the chosen reply.
    pub preference_accuracy_before: Option<f64>,
    pub preference_accuracy_after: Option<f64>,
}

/// Trains adapters over `base` on `train`, scores `heldout` before and
/// after, and writes the PEFT folder to `output` (checkpoints to
/// `output/checkpoint`, from which a rerun resumes).
pub fn train_generator(
    base: &Path,
    train: &[GeneratorRow],
    heldout: &[GeneratorRow],
    output: &Path,
    options: &GeneratorTraining,
    mut progress: impl FnMut(usize, usize, f32),
) -> Result<GeneratorReport> {
    let started = Instant::now();
    let schedule = &options.schedule;
    let tokenizer = base_tokenizer(base)?;
    let tokenize_all = |rows: &[GeneratorRow]| -> Result<Vec<TokenizedPair>> {
        rows.iter().map(|r| tokenize_pair(&tokenizer, r, schedule.max_tokens)).collect()
    };
    let (pairs, held) = (tokenize_all(train)?, tokenize_all(heldout)?);
    if pairs.is_empty() {
        return Err(Error::InvalidArgument("the generator set has no pairs".into()));
    }
    if pairs.iter().chain(&held).any(|p| !(p.weight.is_finite() && p.weight > 0.0)) {
        return Err(Error::InvalidArgument("every pair's weight must be positive".into()));
    }
    let device = schedule.device.open()?;
    let model = TrainLlama::load(base, &options.lora, &device, schedule.seed)?;
    let before = preference_accuracy(&model, &held, schedule.batch_size)?;

    let checkpoint_dir = output.join("checkpoint");
    let resumed: Option<Checkpoint> = hf_folder::read_json(&checkpoint_dir.join("checkpoint.json"))?;
    let resumed_at = resumed.map_or(0, |c| c.step);
    if resumed_at > 0 {
        read_adapter(&model, &checkpoint_dir)?;
    }
    let (batch, per_epoch, total) = schedule.steps(pairs.len(), 1);
    check_resume(resumed_at, total, &checkpoint_dir)?;
    let mut optimizer = schedule.optimizer(model.vars())?;
    let mut losses = Vec::new();
    let mut batches = Batches::new(pairs.len(), (batch, per_epoch), schedule.seed);
    for step in resumed_at..total {
        let chunk: Vec<&TokenizedPair> = batches.at(step).iter().map(|&i| &pairs[i]).collect();
        let terms = orpo_loss(&model, &chunk, options.lambda, options.nll_tokens, Pass::Train)?;
        let rate = learning_rate(schedule.learning_rate, schedule.warmup_share, step, total);
        let value = optimizer_step(&mut optimizer, &terms.loss, rate, step)?;
        losses.push(value);
        progress(step + 1, total, value);
        if options.checkpoint_every > 0 && (step + 1) % options.checkpoint_every == 0 && step + 1 < total {
            write_adapter(&model, base, &checkpoint_dir)?;
            let text =
                serde_json::to_string(&Checkpoint { step: step + 1 }).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(checkpoint_dir.join("checkpoint.json"), text)
                .map_err(|e| Error::Internal(format!("{}: {e}", checkpoint_dir.display())))?;
        }
    }
    write_adapter(&model, base, output)?;
    let _ = std::fs::remove_dir_all(&checkpoint_dir);
    let after = preference_accuracy(&model, &held, schedule.batch_size)?;
    Ok(GeneratorReport {
        steps: total - resumed_at,
        losses,
        seconds: started.elapsed().as_secs_f64(),
        output: output.to_owned(),
        resumed_at,
        device: device_name(&device),
        examples: pairs.len(),
        heldout_pairs: held.len(),
        preference_accuracy_before: before,
        preference_accuracy_after: after,
    })
}

/// `{name}@{digest}` of a base: a folder's `model.safetensors` (or its
/// first shard), or a GGUF file.
pub fn base_version(base: &Path) -> Result<String> {
    if base.is_dir() && base.join("model.safetensors").exists() {
        return hf_folder::model_version(base);
    }
    let file = if base.is_dir() {
        let mut shards: Vec<PathBuf> = std::fs::read_dir(base)
            .map_err(|e| Error::NotFound(format!("{}: {e}", base.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        shards.sort();
        shards.into_iter().next().ok_or_else(|| Error::NotFound(format!("{}: no weights", base.display())))?
    } else {
        base.to_owned()
    };
    let name = base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    Ok(format!("{name}@{}", hf_folder::digest_prefix(&file)?))
}

/// The generator's `aitl_manifest.json`: the other roles' fields, with
/// held-out preference accuracy in place of ranking metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneratorManifest {
    #[serde(flatten)]
    pub trained: TrainedManifest,
    pub heldout_pairs: usize,
    pub preference_accuracy: Option<f64>,
    pub parent_preference_accuracy: Option<f64>,
    pub losses: Vec<f32>,
}

/// Writes `report`'s manifest into its folder.
pub fn write_manifest(
    report: &GeneratorReport,
    base: &Path,
    options: &GeneratorTraining,
    training_set: &str,
    training_set_dir: &Path,
) -> Result<GeneratorManifest> {
    let folder = &report.output;
    let name = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
    let manifest = GeneratorManifest {
        trained: TrainedManifest {
            role: registry::Role::Generator,
            version: format!("{name}@{}", hf_folder::digest_prefix(&folder.join(ADAPTER_WEIGHTS))?),
            parent: base_version(base)?,
            training_set: training_set.to_owned(),
            training_set_dir: training_set_dir.to_owned(),
            examples: report.examples,
            hyperparameters: serde_json::to_value(options).map_err(|e| Error::Internal(e.to_string()))?,
            steps: report.steps,
            resumed_at: report.resumed_at,
            first_loss: report.losses.first().copied(),
            last_loss: report.losses.last().copied(),
            seconds: report.seconds,
            device: Some(report.device.clone()),
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            heldout: None,
        },
        heldout_pairs: report.heldout_pairs,
        preference_accuracy: report.preference_accuracy_after,
        parent_preference_accuracy: report.preference_accuracy_before,
        losses: report.losses.clone(),
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(folder.join(registry::manifest::FILE), text)
        .map_err(|e| Error::Internal(format!("{}: {e}", folder.display())))?;
    Ok(manifest)
}

/// The names and shapes of a PEFT folder's tensors (for checks).
pub fn adapter_shapes(dir: &Path) -> Result<HashMap<String, Vec<usize>>> {
    let tensors = candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS), &candle_core::Device::Cpu)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", dir.display())))?;
    Ok(tensors.into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect())
}

/// The frozen base to train adapters over, from what serves: a promoted
/// adapter's own base (a new round trains fresh adapters over it).
pub fn frozen_base(serving: &Path) -> Result<PathBuf> {
    if crate::model::lora::LoraAdapter::is_adapter(serving) {
        crate::model::lora::LoraAdapter::base_of(serving)
    } else {
        Ok(serving.to_owned())
    }
}

/// Trains on an `aitl worker export` folder's generator pairs over `base`
/// (a served adapter resolves to its base), into `output`, and writes the
/// manifest.
pub fn train_from_export(
    dataset: &Path,
    base: &Path,
    output: &Path,
    options: &GeneratorTraining,
    progress: impl FnMut(usize, usize, f32),
) -> Result<GeneratorManifest> {
    let export = super::datasets::read_manifest(dataset)?;
    let base = frozen_base(base)?;
    let train: Vec<GeneratorRow> = super::datasets::read_rows(dataset, "train", "generator")?;
    let heldout: Vec<GeneratorRow> = super::datasets::read_rows(dataset, "heldout", "generator")?;
    if train.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "{}: the export holds no preference pairs to train on",
            dataset.display()
        )));
    }
    let report = train_generator(&base, &train, &heldout, output, options, progress)?;
    write_manifest(&report, &base, options, &export.version, dataset)
}
