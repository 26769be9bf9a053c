//! The generator's promotion gate. A trained version (usually a LoRA adapter
//! over the serving base) replaces the serving generator only if, on the
//! held-out preference pairs of the data it was trained from, its
//! length-normalised log-odds favour the agent's choice more often than the
//! serving model's do, by `generator_min_gain`; and if, on a guard set of
//! reference replies the feedback never touched (DSTC11's, with
//! `promotion.guard_dataset`), its perplexity rises by no more than
//! `generator_perplexity_tolerance`. Both are scored through the serving
//! decoder (its weights, adapter, chat template and prompt precision), one
//! teacher-forced pass per reply.

use std::path::Path;

use serde::Serialize;

use super::gate::PromotionOptions;
use crate::{
    backend::{Device, Precision},
    engine::generator::Checkpoint,
    error::{Error, Result},
    eval::dstc11,
    model::llama::Llama,
    worker::{
        datasets::{GeneratorRow, Message},
        train_generator::{Sequence, tokenize_pair},
    },
};

/// Tokens per scored sequence (longer ones keep their ends).
const MAX_TOKENS: usize = 2_048;

#[derive(Debug, Clone, Serialize)]
pub struct GeneratorGateReport {
    pub candidate: String,
    pub serving: String,
    pub heldout_pairs: usize,
    /// Share of held-out pairs the model prefers as the agent did.
    pub serving_accuracy: f64,
    pub candidate_accuracy: f64,
    pub guard_replies: usize,
    /// Perplexity of the guard set's reference replies (None: no guard set).
    pub serving_perplexity: Option<f64>,
    pub candidate_perplexity: Option<f64>,
    pub accepted: bool,
    pub reasons: Vec<String>,
}

impl std::fmt::Display for GeneratorGateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.accepted { "accepted" } else { "refused" };
        writeln!(f, "generator gate: {} against {}: {verdict}", self.candidate, self.serving)?;
        self.reasons.iter().try_for_each(|r| writeln!(f, "  {r}"))
    }
}

/// Scores `candidate` (a generator path: GGUF, folder or adapter) against
/// `serving` on `heldout` pairs and the configured guard set.
pub fn decide(
    options: &PromotionOptions,
    precision: Precision,
    (serving_label, serving): (&str, &Path),
    (candidate_label, candidate): (&str, &Path),
    heldout: &[GeneratorRow],
) -> Result<GeneratorGateReport> {
    if heldout.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "{candidate_label}: the training set holds out no preference pairs, so the gate cannot score it"
        )));
    }
    let device = Device::Cpu;
    let (old, new) = (Checkpoint::load(&device, serving, precision)?, Checkpoint::load(&device, candidate, precision)?);
    let pairs = evenly(heldout, options.generator_pairs_limit);
    let guard = guard_rows(options)?;
    let accuracy = |c: &Checkpoint| preference_accuracy(&device, c, &pairs);
    let (serving_accuracy, candidate_accuracy) = (accuracy(&old)?, accuracy(&new)?);
    let perplexity = |c: &Checkpoint| reply_perplexity(&device, c, &guard);
    let (serving_perplexity, candidate_perplexity) = match guard.is_empty() {
        true => (None, None),
        false => (Some(perplexity(&old)?), Some(perplexity(&new)?)),
    };
    let (accepted, reasons) = verdict(
        options,
        pairs.len(),
        (serving_accuracy, candidate_accuracy),
        guard.len(),
        serving_perplexity.zip(candidate_perplexity),
    );
    Ok(GeneratorGateReport {
        candidate: candidate_label.into(),
        serving: serving_label.into(),
        heldout_pairs: pairs.len(),
        serving_accuracy,
        candidate_accuracy,
        guard_replies: guard.len(),
        serving_perplexity,
        candidate_perplexity,
        accepted,
        reasons,
    })
}

/// Whether the candidate passes, and each check in words.
pub fn verdict(
    options: &PromotionOptions,
    pairs: usize,
    (serving, candidate): (f64, f64),
    guard_replies: usize,
    perplexity: Option<(f64, f64)>,
) -> (bool, Vec<String>) {
    let mut accepted = true;
    let mut reasons = Vec::new();
    let gain = candidate - serving;
    let accuracy = format!("preference accuracy on {pairs} held-out pairs: {serving:.4} → {candidate:.4} ({gain:+.4})");
    if gain >= options.generator_min_gain {
        reasons.push(format!("{accuracy} ≥ {}", options.generator_min_gain));
    } else {
        accepted = false;
        reasons.push(format!("{accuracy}, below the required gain of {}", options.generator_min_gain));
    }
    match perplexity {
        Some((old, new)) => {
            let rise = new / old - 1.0;
            let text =
                format!("perplexity of {guard_replies} guard replies: {old:.3} → {new:.3} ({:+.1}%)", 100.0 * rise);
            if rise <= options.generator_perplexity_tolerance {
                reasons.push(format!("{text}, within {:.1}%", 100.0 * options.generator_perplexity_tolerance));
            } else {
                accepted = false;
                reasons.push(format!(
                    "{text}, above the tolerated {:.1}%",
                    100.0 * options.generator_perplexity_tolerance
                ));
            }
        }
        None => reasons.push("no guard set (promotion.guard_dataset): perplexity not checked".into()),
    }
    (accepted, reasons)
}

/// At most `limit` of `rows`, evenly spaced (0: all).
fn evenly<T: Clone>(rows: &[T], limit: usize) -> Vec<T> {
    if limit == 0 || rows.len() <= limit {
        return rows.to_vec();
    }
    let step = rows.len() as f64 / limit as f64;
    (0..limit).map(|i| rows[(i as f64 * step) as usize].clone()).collect()
}

/// What a scored sequence may hold: [`MAX_TOKENS`], or less where the
/// model's context is shorter.
fn max_tokens(checkpoint: &Checkpoint) -> usize {
    MAX_TOKENS.min(checkpoint.model.config().context)
}

/// Mean log-probability of a sequence's reply tokens.
fn mean_logprob(device: &Device, model: &Llama, sequence: &Sequence) -> Result<f64> {
    let logprobs = model.token_logprobs(device, &sequence.ids, sequence.completion_start)?;
    Ok(logprobs.iter().map(|&l| l as f64).sum::<f64>() / logprobs.len().max(1) as f64)
}

/// The share of pairs whose chosen reply the model finds likelier per
/// token than the rejected one. ORPO's log-odds are monotonic in that
/// difference, so this is the share where they favour the agent's choice.
pub fn preference_accuracy(device: &Device, checkpoint: &Checkpoint, pairs: &[GeneratorRow]) -> Result<f64> {
    let mut favoured = 0;
    for row in pairs {
        let pair = tokenize_pair(&checkpoint.tokenizer, row, max_tokens(checkpoint))?;
        if mean_logprob(device, &checkpoint.model, &pair.chosen)?
            > mean_logprob(device, &checkpoint.model, &pair.rejected)?
        {
            favoured += 1;
        }
    }
    Ok(favoured as f64 / pairs.len().max(1) as f64)
}

/// exp of the mean negative log-likelihood per reply token over `rows`' chosen replies.
pub fn reply_perplexity(device: &Device, checkpoint: &Checkpoint, rows: &[GeneratorRow]) -> Result<f64> {
    let (mut nll, mut tokens) = (0f64, 0usize);
    for row in rows {
        let pair = tokenize_pair(&checkpoint.tokenizer, row, max_tokens(checkpoint))?;
        let logprobs = checkpoint.model.token_logprobs(device, &pair.chosen.ids, pair.chosen.completion_start)?;
        nll -= logprobs.iter().map(|&l| l as f64).sum::<f64>();
        tokens += logprobs.len();
    }
    Ok((nll / tokens.max(1) as f64).exp())
}

/// DSTC11 reference replies after their conversations, as rows whose chosen
/// reply is the reference (the rejected side is unused).
fn guard_rows(options: &PromotionOptions) -> Result<Vec<GeneratorRow>> {
    if options.guard_dataset.as_os_str().is_empty() {
        return Ok(Vec::new());
    }
    let queries = dstc11::read_queries(&options.guard_dataset, options.guard_split()?)?;
    let message = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
    let rows: Vec<GeneratorRow> = queries
        .iter()
        .filter(|q| !q.reference_reply.trim().is_empty())
        .map(|q| {
            let mut prompt: Vec<Message> = q
                .context
                .iter()
                .map(|turn| {
                    let role = if turn.speaker == crate::proto::Speaker::Agent as i32 { "assistant" } else { "user" };
                    message(role, &turn.text)
                })
                .collect();
            prompt.push(message("user", &q.query));
            let reply = vec![message("assistant", &q.reference_reply)];
            GeneratorRow { prompt, chosen: reply.clone(), rejected: reply, weight: 1.0 }
        })
        .collect();
    Ok(evenly(&rows, options.guard_limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_needs_the_gain_and_a_bounded_perplexity() {
        let options = PromotionOptions::default();
        let (ok, reasons) = verdict(&options, 50, (0.50, 0.60), 20, Some((10.0, 10.2)));
        assert!(ok, "{reasons:?}");
        let (ok, reasons) = verdict(&options, 50, (0.50, 0.51), 20, Some((10.0, 10.0)));
        assert!(!ok && reasons[0].contains("below the required gain"), "{reasons:?}");
        let (ok, reasons) = verdict(&options, 50, (0.50, 0.70), 20, Some((10.0, 12.0)));
        assert!(!ok && reasons[1].contains("above the tolerated"), "{reasons:?}");
        let (ok, reasons) = verdict(&options, 50, (0.50, 0.70), 0, None);
        assert!(ok && reasons[1].contains("not checked"), "{reasons:?}");
    }

    #[test]
    fn evenly_spaced_subsets() {
        let rows: Vec<usize> = (0..10).collect();
        assert_eq!(evenly(&rows, 0), rows);
        assert_eq!(evenly(&rows, 20), rows);
        assert_eq!(evenly(&rows, 5), vec![0, 2, 4, 6, 8]);
    }
}
