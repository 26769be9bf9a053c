//! The Virtual Judge's options (`[judge]`): which checks fail an
//! annotation and at what thresholds, and what a failure does to training.
//! The checks themselves are the worker's (`worker/judge.rs`); the options
//! live here so that the config depends on nothing of the worker.

use serde::{Deserialize, Serialize};

/// What a failed check does to training (`[judge] mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum JudgeMode {
    /// An annotation some check failed does not train.
    #[default]
    Drop,
    /// Every annotation trains with a weight in [0, 1] from its verdicts,
    /// its agent's reliability and its delay (see `weights.rs`).
    Weight,
}

/// Thresholds of the checks; the defaults are documented in the README.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeOptions {
    /// Off for ablations: no verdicts, every label trains.
    pub enabled: bool,
    /// "drop" (default) or "weight": see [`JudgeMode`].
    pub mode: JudgeMode,
    /// A preference or adoption decided faster than this (seconds after
    /// seeing the candidates) cannot have involved reading them.
    pub min_seconds_per_decision: f64,
    /// A relevance check faster than this per judged object.
    pub min_seconds_per_judgement: f64,
    /// The sent text must be this much more similar to the other candidate
    /// than to the preferred one before the preference is doubted.
    pub similarity_margin: f64,
    /// A rationale of fewer words is boilerplate.
    pub min_rationale_words: usize,
    /// The same rationale from the same agent this many times is boilerplate.
    pub repeated_rationale: usize,
    /// Relevance checks of fewer objects are never called uniform: with two
    /// or three objects "all relevant" is ordinary.
    pub uniform_min_judgements: usize,
    /// The significance level of every test of an agent against the
    /// population (one-sided binomial tails, the drift z test two-sided, the
    /// fatigue trend one-sided): the chance that a careful agent, labelling
    /// like the others, fails one test at one moment.
    pub significance: f64,
    /// An agent test runs once the agent has this many annotations of the
    /// kind it counts, and the other agents together as many.
    pub min_evidence: usize,
    /// `uniform_labels` also fails an all-relevant check when the chance
    /// that all its objects are relevant, estimated from earlier labels of
    /// the same objects on similar questions (Laplace-smoothed, objects
    /// with at least `consistency_min_votes` labels), is below this.
    pub uniform_question_probability: f64,
    /// The language-model judge: "off", "default" (the embedded generator) or
    /// the path of a GGUF file or Hugging Face folder. Off by default: on a
    /// CPU each check is a prefill of a few hundred tokens.
    pub llm: String,
    /// How sure the language model must be before it fails a label.
    pub llm_confidence: f64,
    /// Relevance checks per window when comparing an agent's first and
    /// latest relevant shares (`agent_drift`).
    pub drift_window: usize,
    /// The spread of per-check relevant shares `agent_drift` assumes at
    /// least, so a population that happens to agree perfectly does not make
    /// every small change significant.
    pub drift_min_sd: f64,
    /// `position_bias` counts relevance checks whose top this many
    /// positions are all labelled relevant while a lower one is not.
    pub position_top: usize,
    /// Two questions of different cases are similar (their labels of the
    /// same object are compared) at this word cosine (`text.rs`) of the
    /// questions or above. Near 1: templated questions that differ in one
    /// word ("Tell me about the parking there" / "… the wifi there") are
    /// different questions about the same objects.
    pub similar_query: f64,
    /// Earlier labels of one object on similar questions before their
    /// majority counts (`consistency`, `late_report`, `uniform_labels`);
    /// only labels of checks no other check failed count.
    pub consistency_min_votes: usize,
    /// The share of those labels that must disagree with the annotation.
    pub consistency_majority: f64,
    /// The agent's latest annotations the fatigue trend test runs over.
    pub fatigue_window: usize,
    /// A report made later than this (seconds after the interaction was
    /// shown) is late.
    pub late_report_seconds: f64,
    /// Weight mode: the factor of an annotation some check failed.
    pub failed_weight: f64,
    /// Weight mode: the factor of a late annotation, the paper's agreement
    /// of delayed over immediate feedback (63.9% / 76.5%).
    pub late_weight: f64,
}

impl Default for JudgeOptions {
    fn default() -> Self {
        JudgeOptions {
            enabled: true,
            mode: JudgeMode::Drop,
            min_seconds_per_decision: 3.0,
            min_seconds_per_judgement: 0.5,
            similarity_margin: 0.05,
            min_rationale_words: 3,
            repeated_rationale: 3,
            uniform_min_judgements: 5,
            significance: 0.001,
            min_evidence: 10,
            uniform_question_probability: 0.01,
            llm: "off".into(),
            llm_confidence: 0.8,
            drift_window: 10,
            drift_min_sd: 0.05,
            position_top: 2,
            similar_query: 0.95,
            consistency_min_votes: 3,
            consistency_majority: 0.8,
            fatigue_window: 30,
            late_report_seconds: 3_600.0,
            failed_weight: 0.1,
            late_weight: 63.9 / 76.5,
        }
    }
}
