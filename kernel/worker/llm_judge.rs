//! The Virtual Judge's language-model checks. A decoder (any configured
//! generator; the default is the embedded SmolLM2) answers yes/no questions,
//! and the judge reads the probability of "Yes" against "No" from the
//! next-token logits, so a verdict carries a score rather than a sampled
//! word. The prompts (below, verbatim) ask:
//!
//! - `llm_rationale`: does the agent's rationale support the preference?
//! - `llm_relevance`: is a knowledge object relevant to the question? (the
//!   first [`RELEVANCE_PER_ANNOTATION`] judgements of a relevance check; the
//!   verdict fails when the model confidently disagrees with most of them)
//! - `llm_grounding`: does the preferred candidate stay with its knowledge
//!   at least as well as the other?
//!
//! A check fails only when the model is confident (`[judge] llm_confidence`,
//! default 0.8) that the label is wrong: P(Yes) under 0.2 for a rationale or a
//! "relevant" label, over 0.8 for an "irrelevant" one, or the other
//! candidate more grounded by over 0.3. A small model is a weak judge; its
//! verdicts are stored with their scores beside the rule checks' and the
//! human label.

use std::path::Path;

use super::{
    datasets::KnowledgeSource,
    rows::{AnnotationRow, Feedback, InteractionRow, Label, Verdict},
};
use crate::{
    backend::Device,
    engine::generator::Checkpoint,
    error::{Error, Result},
    model::{
        chat::{ChatTokenizer, Role},
        llama::{Llama, Step},
    },
};

pub const SYSTEM: &str = "You are a strict reviewer of a customer-support team's work. Answer with Yes or No only.";

pub const RATIONALE_PROMPT: &str = "A customer wrote: {question}\n\nReply A: {preferred}\n\nReply B: {other}\n\n\
An agent preferred reply A and explained: \"{rationale}\"\n\nDoes this explanation give a real reason to prefer \
reply A over reply B?";

pub const RELEVANCE_PROMPT: &str = "A customer asked: {question}\n\nKnowledge: {knowledge}\n\nDoes this knowledge help answer the customer's question?";

pub const GROUNDING_PROMPT: &str = "Knowledge:\n{knowledge}\n\nReply: {reply}\n\nDoes the reply state only facts \
found in the knowledge above?";

/// Point-wise helpfulness, for evaluation (not a check on agents). The
/// rubric: a helpful reply answers the customer's actual question, is
/// correct, and, when a reference reply written by a person exists, says
/// what it says.
pub const HELPFULNESS_PROMPT: &str = "A customer asked: {question}\n\nA support reply: {reply}\n\n\
Does this reply answer the customer's question helpfully and correctly?";

pub const HELPFULNESS_WITH_REFERENCE_PROMPT: &str = "A customer asked: {question}\n\nA support agent's reference \
answer: {reference}\n\nA candidate reply: {reply}\n\nDoes the candidate reply answer the question as helpfully \
and correctly as the reference answer?";

/// Relevance judgements checked per annotation (each is one model call).
pub const RELEVANCE_PER_ANNOTATION: usize = 3;
/// Characters of any one text put in a prompt.
const MAX_TEXT: usize = 1_200;

fn clip(text: &str) -> &str {
    match text.char_indices().nth(MAX_TEXT) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

pub struct LlmJudge {
    device: Device,
    model: Llama,
    tokenizer: ChatTokenizer,
    yes: u32,
    no: u32,
    pub version: String,
}

impl LlmJudge {
    pub fn load(device: Device, path: &Path) -> Result<Self> {
        let Checkpoint { model, tokenizer, version } =
            Checkpoint::load(&device, path, crate::model::llama::DEFAULT_PREFILL)?;
        let first = |word: &str| -> Result<u32> {
            let ids = tokenizer.encode(word)?;
            ids.into_iter()
                .find(|&id| Some(id) != tokenizer.bos)
                .ok_or_else(|| Error::InvalidArgument(format!("{version}: the tokenizer has no token for {word:?}")))
        };
        Ok(LlmJudge { yes: first("Yes")?, no: first("No")?, device, model, tokenizer, version })
    }

    /// P(Yes) / (P(Yes) + P(No)) as the first word of the model's answer.
    pub fn p_yes(&self, question: &str) -> Result<f64> {
        let prompt = self.tokenizer.render(&[(Role::System, SYSTEM), (Role::User, question)]);
        let tokens = self.tokenizer.encode(&prompt)?;
        let context = self.model.config().context;
        let tokens = &tokens[tokens.len().saturating_sub(context - 1)..];
        let mut cache = self.model.new_cache();
        let logits = self.model.forward(&self.device, &mut [Step { tokens, cache: &mut cache }])?.remove(0);
        let (yes, no) = (f64::from(logits[self.yes as usize]), f64::from(logits[self.no as usize]));
        Ok(1.0 / (1.0 + (no - yes).exp()))
    }

    /// P(helpful) of `reply` to `question` (against `reference` when there is one).
    pub fn helpfulness(&self, question: &str, reply: &str, reference: Option<&str>) -> Result<f64> {
        let prompt = match reference {
            Some(reference) => HELPFULNESS_WITH_REFERENCE_PROMPT.replace("{reference}", clip(reference)),
            None => HELPFULNESS_PROMPT.to_string(),
        };
        self.p_yes(&prompt.replace("{question}", clip(question)).replace("{reply}", clip(reply)))
    }

    /// Verdicts on `a`; `knowledge` resolves the objects the interaction showed.
    pub fn judge(
        &self,
        a: &AnnotationRow,
        interaction: &InteractionRow,
        knowledge: &dyn KnowledgeSource,
        confidence: f64,
    ) -> Result<Vec<Verdict>> {
        let verdict = |check: &str, pass: bool, score: f64, reason: String| Verdict {
            annotation_id: a.annotation_id.clone(),
            check: check.into(),
            pass,
            score,
            reason,
        };
        let question = clip(&interaction.query);
        let mut out = Vec::new();
        match &a.feedback {
            Feedback::Preference { preferred, other, rationale, .. } => {
                let (Some(p), Some(o)) = (interaction.candidate(preferred), interaction.candidate(other)) else {
                    return Ok(out);
                };
                if !rationale.trim().is_empty() {
                    let prompt = RATIONALE_PROMPT
                        .replace("{question}", question)
                        .replace("{preferred}", clip(&p.text))
                        .replace("{other}", clip(&o.text))
                        .replace("{rationale}", clip(rationale));
                    let p_yes = self.p_yes(&prompt)?;
                    let reason = format!("P(the rationale supports the preference) = {p_yes:.2} ({})", self.version);
                    out.push(verdict("llm_rationale", p_yes >= 1.0 - confidence, p_yes, reason));
                }
                let mut texts = Vec::new();
                for (n, s) in interaction.shown.iter().enumerate() {
                    texts.push(format!(
                        "[{}] {}",
                        n + 1,
                        clip(&knowledge.object(&interaction.tenant, &s.knowledge_id, Some(s.version))?.text)
                    ));
                }
                let grounded = |reply: &str| {
                    self.p_yes(
                        &GROUNDING_PROMPT.replace("{knowledge}", &texts.join("\n")).replace("{reply}", clip(reply)),
                    )
                };
                let (gp, go) = (grounded(&p.text)?, grounded(&o.text)?);
                let pass = go - gp <= confidence - 0.5;
                let reason = format!("P(grounded): preferred {gp:.2}, other {go:.2} ({})", self.version);
                out.push(verdict("llm_grounding", pass, gp - go, reason));
            }
            Feedback::Relevance { judgements } => {
                let (mut checked, mut disagreements) = (0, 0);
                for (id, label) in judgements.iter().take(RELEVANCE_PER_ANNOTATION) {
                    let text = knowledge.object(&interaction.tenant, id, interaction.shown_version(id))?.text;
                    let p_yes = self
                        .p_yes(&RELEVANCE_PROMPT.replace("{question}", question).replace("{knowledge}", clip(&text)))?;
                    checked += 1;
                    let disagrees = match label {
                        Label::Relevant => p_yes < 1.0 - confidence,
                        Label::Irrelevant => p_yes > confidence,
                        Label::PartiallyRelevant => false,
                    };
                    disagreements += usize::from(disagrees);
                }
                if checked > 0 {
                    let agreement = 1.0 - disagreements as f64 / checked as f64;
                    let reason = format!(
                        "the model confidently disagrees with {disagreements} of {checked} labels ({})",
                        self.version
                    );
                    out.push(verdict("llm_relevance", 2 * disagreements <= checked, agreement, reason));
                }
            }
            _ => {}
        }
        Ok(out)
    }
}
