//! `[promotion]`: when a trained model may replace the serving one. The
//! gates that read these (`registry::gate`, `worker::generator_gate`) add
//! the methods that load guard sets; the type lives here so the config
//! imports neither the gates nor the data sets they read.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromotionOptions {
    /// The candidate must beat the serving model on the held-out queries by
    /// at least this much (absolute: 0.01 is one point of Recall@75).
    pub min_gain: f64,
    /// ... and may score at most this much below it on the guard set.
    pub guard_tolerance: f64,
    /// A labelled data set (BEIR layout or DSTC11 folder, see
    /// `eval::dataset`) whose queries guard against regressions; empty: no
    /// guard set.
    pub guard_dataset: PathBuf,
    /// Which of its queries: "guard" (its `qrels/guard.tsv`, the default),
    /// "history", "eval" or "all". Whichever, a guard query that is also a
    /// training query of the candidate refuses the promotion.
    pub guard_split: String,
    /// At most this many of them, evenly spaced (0: all): a cross-encoder
    /// reranks 75 passages per query, twice per gate.
    pub guard_limit: usize,
    /// A trained generator must favour the agents' choice on this much more
    /// of the held-out preference pairs than the serving one (absolute).
    pub generator_min_gain: f64,
    /// ... and may raise the guard replies' perplexity by at most this share.
    pub generator_perplexity_tolerance: f64,
    /// Held-out pairs the generator gate scores, evenly spaced (0: all):
    /// each is two teacher-forced passes per model.
    pub generator_pairs_limit: usize,
    /// Guard questions whose greedy replies' citations the generator gate
    /// checks (0: none): each is one greedy reply per model.
    pub generator_citation_limit: usize,
    /// ... and the share of citations naming a relevant object may fall by
    /// at most this much (absolute).
    pub generator_citation_tolerance: f64,
}

impl Default for PromotionOptions {
    fn default() -> Self {
        PromotionOptions {
            min_gain: 0.01,
            guard_tolerance: 0.01,
            guard_dataset: PathBuf::new(),
            guard_split: "guard".into(),
            guard_limit: 300,
            generator_min_gain: 0.02,
            generator_perplexity_tolerance: 0.05,
            generator_pairs_limit: 200,
            generator_citation_limit: 20,
            generator_citation_tolerance: 0.05,
        }
    }
}
