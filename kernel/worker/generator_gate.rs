//! The generator's promotion gate. A trained version (usually a LoRA adapter
//! over the serving base) replaces the serving generator only if, on the
//! held-out preference pairs of the data it was trained from, its
//! length-normalised log-odds favour the agent's choice more often than the
//! serving model's do, by `generator_min_gain`; and if, on a guard set of
//! reference replies the feedback never touched (DSTC11's, with
//! `promotion.guard_dataset`), its perplexity rises by no more than
//! `generator_perplexity_tolerance`, and its greedy replies' citation
//! correctness (the share of cited knowledge that is relevant) falls by no
//! more than `generator_citation_tolerance`; a guard that shares a question
//! with the training prompts refuses. Perplexity is scored through the
//! serving decoder (its weights, adapter, chat template and prompt
//! precision), one teacher-forced pass per reply; citations through greedy
//! decoding over a grounding of the guard question's relevant objects mixed
//! with other questions' (so that citing at random is wrong as often as
//! not).

use std::path::Path;

use serde::Serialize;

use super::{
    datasets::{GeneratorRow, Message},
    train_generator::{Sequence, tokenize_pair},
};
use crate::{
    backend::{Device, Precision},
    engine::{generator::Checkpoint, grounding},
    error::{Error, Result},
    eval::dataset::{self, LabelledQuery},
    model::{
        chat::Role,
        llama::{Llama, Step},
    },
    proto::KnowledgeObject,
    registry::gate::{self, GuardOverlap, PromotionOptions},
};

/// Tokens per scored sequence (longer ones keep their ends).
const MAX_TOKENS: usize = 2_048;
/// Knowledge objects in each citation check's grounding.
const CITATION_GROUNDING: usize = 6;
/// New tokens of each greedy reply.
const CITATION_REPLY_TOKENS: usize = 96;

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
    /// Greedy replies to guard questions, and the share of their citations
    /// that name a relevant object (None: nothing cited).
    pub citation_replies: usize,
    pub serving_citations: Option<Citations>,
    pub candidate_citations: Option<Citations>,
    pub guard_overlap: Option<GuardOverlap>,
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

/// Citations in greedy replies.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Citations {
    pub cited: usize,
    pub relevant: usize,
}

impl Citations {
    pub fn correctness(&self) -> Option<f64> {
        (self.cited > 0).then(|| self.relevant as f64 / self.cited as f64)
    }
}

/// Scores `candidate` (a generator path: GGUF, folder or adapter) against
/// `serving` on `heldout` pairs and the configured guard set, which must
/// share no question with the `training` pairs.
pub fn decide(
    options: &PromotionOptions,
    precision: Precision,
    (serving_label, serving): (&str, &Path),
    (candidate_label, candidate): (&str, &Path),
    heldout: &[GeneratorRow],
    training: &[GeneratorRow],
) -> Result<GeneratorGateReport> {
    if heldout.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "{candidate_label}: the training set holds out no preference pairs, so the gate cannot score it"
        )));
    }
    let device = Device::Cpu;
    let (old, new) = (Checkpoint::load(&device, serving, precision)?, Checkpoint::load(&device, candidate, precision)?);
    let pairs = gate::evenly(heldout.to_vec(), options.generator_pairs_limit);
    let accuracy = |c: &Checkpoint| preference_accuracy(&device, c, &pairs);
    let (serving_accuracy, candidate_accuracy) = (accuracy(&old)?, accuracy(&new)?);
    let guard_queries = options.guard_queries()?;
    let guard_overlap = (!guard_queries.is_empty()).then(|| {
        let trained: Vec<LabelledQuery> = training.iter().filter_map(prompt_query).collect();
        GuardOverlap::between(&guard_queries, &trained)
    });
    // An overlapping guard is refused, not scored.
    let guard_queries = match &guard_overlap {
        Some(o) if o.shared_queries > 0 => Vec::new(),
        _ => guard_queries,
    };
    let guard = guard_rows(&guard_queries);
    let perplexity = |c: &Checkpoint| reply_perplexity(&device, c, &guard);
    let (serving_perplexity, candidate_perplexity) = match guard.is_empty() {
        true => (None, None),
        false => (Some(perplexity(&old)?), Some(perplexity(&new)?)),
    };
    let groundings = citation_groundings(options, &guard_queries)?;
    let citations = |c: &Checkpoint| greedy_citations(&device, c, &groundings);
    let (serving_citations, candidate_citations) = match groundings.is_empty() {
        true => (None, None),
        false => (Some(citations(&old)?), Some(citations(&new)?)),
    };
    let (mut accepted, mut reasons) = verdict(
        options,
        pairs.len(),
        (serving_accuracy, candidate_accuracy),
        guard.len(),
        serving_perplexity.zip(candidate_perplexity),
    );
    if let Some(overlap) = &guard_overlap {
        let (disjoint, reason) = overlap.check();
        accepted &= disjoint;
        reasons.push(reason);
    }
    if let Some((old, new)) = serving_citations.zip(candidate_citations) {
        let (pass, reason) = citation_verdict(options, groundings.len(), old, new);
        accepted &= pass;
        reasons.push(reason);
    }
    Ok(GeneratorGateReport {
        candidate: candidate_label.into(),
        serving: serving_label.into(),
        heldout_pairs: pairs.len(),
        serving_accuracy,
        candidate_accuracy,
        guard_replies: guard.len(),
        serving_perplexity,
        candidate_perplexity,
        citation_replies: groundings.len(),
        serving_citations,
        candidate_citations,
        guard_overlap,
        accepted,
        reasons,
    })
}

/// Whether the candidate's citations are as correct as the serving
/// model's, within `generator_citation_tolerance`, and the check in words.
pub fn citation_verdict(options: &PromotionOptions, replies: usize, old: Citations, new: Citations) -> (bool, String) {
    let show = |c: Citations| match c.correctness() {
        Some(share) => format!("{share:.3} ({} of {} citations)", c.relevant, c.cited),
        None => "nothing cited".to_string(),
    };
    let text = format!("citation correctness of {replies} greedy guard replies: {} → {}", show(old), show(new));
    let tolerance = options.generator_citation_tolerance;
    match (old.correctness(), new.correctness()) {
        (_, None) if old.cited > 0 => (false, format!("{text}: the candidate stopped citing knowledge")),
        (None, _) | (_, None) => (true, format!("{text}: nothing to compare")),
        (Some(a), Some(b)) if b >= a - tolerance => (true, format!("{text}, within {tolerance}")),
        (Some(_), Some(_)) => (false, format!("{text}, a fall beyond the tolerated {tolerance}")),
    }
}

/// A training pair's question, as a labelled query without labels: its
/// conversation after the system message, the last turn being the question.
fn prompt_query(row: &GeneratorRow) -> Option<LabelledQuery> {
    let turns: Vec<&Message> = row.prompt.iter().filter(|m| m.role != "system").collect();
    let (last, context) = turns.split_last()?;
    Some(LabelledQuery {
        id: String::new(),
        index: 0,
        query: last.content.clone(),
        context: context
            .iter()
            .map(|m| crate::proto::ConversationTurn {
                speaker: if m.role == "assistant" {
                    crate::proto::Speaker::Agent
                } else {
                    crate::proto::Speaker::Customer
                } as i32,
                text: m.content.clone(),
            })
            .collect(),
        relevant: Vec::new(),
        judged_irrelevant: None,
        reference_reply: String::new(),
    })
}

/// One citation check: a guard question's conversation over knowledge that
/// holds its relevant objects and others'.
pub struct Grounding {
    pub query: LabelledQuery,
    pub knowledge: Vec<KnowledgeObject>,
}

/// Groundings for the first `generator_citation_limit` guard queries (evenly
/// spaced): each question's relevant objects (at most half the grounding)
/// and, to fill it, the relevant objects of the guard questions after it,
/// in an order fixed by the ids' hashes so relevance is not position.
fn citation_groundings(options: &PromotionOptions, guard: &[LabelledQuery]) -> Result<Vec<Grounding>> {
    if guard.is_empty() || options.generator_citation_limit == 0 {
        return Ok(Vec::new());
    }
    let corpus: std::collections::HashMap<String, KnowledgeObject> =
        dataset::read_corpus_of(&options.guard_dataset)?.into_iter().map(|o| (o.id.clone(), o)).collect();
    let chosen = gate::evenly((0..guard.len()).collect(), options.generator_citation_limit);
    let mut out = Vec::with_capacity(chosen.len());
    for i in chosen {
        let query = &guard[i];
        let mut ids: Vec<&str> = query.relevant.iter().take(CITATION_GROUNDING / 2).map(String::as_str).collect();
        let others = guard.iter().cycle().skip(i + 1).take(guard.len() - 1);
        for id in others.flat_map(|q| q.relevant.iter()) {
            if ids.len() == CITATION_GROUNDING {
                break;
            }
            if !query.relevant.contains(id) && !ids.contains(&id.as_str()) {
                ids.push(id);
            }
        }
        ids.sort_by_key(|id| {
            use sha2::Digest;
            sha2::Sha256::digest(id.as_bytes())[..8].to_vec()
        });
        let knowledge: Vec<KnowledgeObject> = ids.iter().filter_map(|id| corpus.get(*id).cloned()).collect();
        if knowledge.iter().any(|k| query.relevant.contains(&k.id)) {
            out.push(Grounding { query: query.clone(), knowledge });
        }
    }
    Ok(out)
}

/// The model's greedy reply to each grounding, and how many of its
/// citations name one of the question's relevant objects.
pub fn greedy_citations(device: &Device, checkpoint: &Checkpoint, groundings: &[Grounding]) -> Result<Citations> {
    let mut total = Citations { cited: 0, relevant: 0 };
    for g in groundings {
        let mut conversation = g.query.context.clone();
        conversation.push(crate::proto::ConversationTurn {
            speaker: crate::proto::Speaker::Customer as i32,
            text: g.query.query.clone(),
        });
        let messages = grounding::messages(grounding::DEFAULT_SYSTEM_PROMPT, &g.knowledge, &conversation);
        let borrowed: Vec<(Role, &str)> = messages.iter().map(|(r, t)| (*r, t.as_str())).collect();
        let reply = greedy_reply(device, checkpoint, &checkpoint.tokenizer.render(&borrowed))?;
        let ids: Vec<String> = g.knowledge.iter().map(|k| k.id.clone()).collect();
        let cited = grounding::citations(&reply, &ids);
        total.cited += cited.len();
        total.relevant += cited.iter().filter(|id| g.query.relevant.contains(id)).count();
    }
    Ok(total)
}

/// Greedy decoding of at most [`CITATION_REPLY_TOKENS`] after `prompt`.
fn greedy_reply(device: &Device, checkpoint: &Checkpoint, prompt: &str) -> Result<String> {
    let model = &checkpoint.model;
    let mut tokens = checkpoint.tokenizer.encode(prompt)?;
    let room = model.config().context.saturating_sub(CITATION_REPLY_TOKENS).max(1);
    if tokens.len() > room {
        tokens.drain(..tokens.len() - room);
    }
    let mut cache = model.new_cache();
    let mut input = tokens;
    let mut reply = Vec::new();
    for _ in 0..CITATION_REPLY_TOKENS {
        let logits = model.forward(device, &mut [Step { tokens: &input, cache: &mut cache }])?;
        let next = logits[0]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .ok_or_else(|| Error::Internal("the decoder returned no logits".into()))?;
        if next == checkpoint.tokenizer.eos || checkpoint.tokenizer.is_end_of_turn(next) {
            break;
        }
        reply.push(next);
        input = vec![next];
    }
    checkpoint.tokenizer.decode(&reply)
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

/// The guard queries' reference replies after their conversations, as rows
/// whose chosen reply is the reference (the rejected side is unused).
fn guard_rows(queries: &[LabelledQuery]) -> Vec<GeneratorRow> {
    let message = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
    queries
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
        .collect()
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
    fn citation_correctness_may_not_fall() {
        let options = PromotionOptions { generator_citation_tolerance: 0.05, ..Default::default() };
        let c = |cited, relevant| Citations { cited, relevant };
        assert!(citation_verdict(&options, 20, c(10, 6), c(10, 6)).0);
        assert!(citation_verdict(&options, 20, c(10, 6), c(20, 11)).0, "0.55 is within 0.05 of 0.60");
        let (ok, reason) = citation_verdict(&options, 20, c(10, 6), c(10, 4));
        assert!(!ok && reason.contains("0.600 (6 of 10 citations) → 0.400") && reason.contains("beyond"), "{reason}");
        let (ok, reason) = citation_verdict(&options, 20, c(10, 6), c(0, 0));
        assert!(!ok && reason.contains("stopped citing"), "{reason}");
        assert!(citation_verdict(&options, 20, c(0, 0), c(3, 1)).0, "the parent cited nothing: nothing to compare");
    }

    #[test]
    fn a_training_prompt_names_its_question() {
        let message = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
        let row = GeneratorRow {
            prompt: vec![
                message("system", "Knowledge: [1] …"),
                message("user", "About the Acorn"),
                message("assistant", "Yes?"),
                message("user", "Free wifi?"),
            ],
            chosen: vec![],
            rejected: vec![],
            weight: 1.0,
        };
        let q = prompt_query(&row).unwrap();
        let turn = |speaker: crate::proto::Speaker, text: &str| crate::proto::ConversationTurn {
            speaker: speaker as i32,
            text: text.into(),
        };
        let guard = LabelledQuery {
            id: "g".into(),
            index: 0,
            query: "free  WiFi?".into(),
            context: vec![
                turn(crate::proto::Speaker::Customer, "about the acorn"),
                turn(crate::proto::Speaker::Agent, "yes?"),
            ],
            relevant: vec![],
            judged_irrelevant: None,
            reference_reply: String::new(),
        };
        assert_eq!(q.key(), guard.key());
    }
}
