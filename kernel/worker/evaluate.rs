//! `aitl eval feedback`: what the journal says about the models and the
//! agents, on the held-out (latest 10%) interactions where it measures
//! models: retrieval and ranking quality from agents' labels (or a data set's
//! own labels when simulating), citation correctness, adoption and
//! preference by model version, judge rejections and, given the simulator's
//! truth file, how well the judge separates careless from careful agents;
//! annotation delays and per-agent fatigue signals.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::{
    datasets::{HELDOUT_SHARE, rejections},
    gaps::IMMEDIATE_SECONDS,
    journal::Journal,
    rows::{AnnotationRow, Decision, Feedback, InteractionRow, Kind, Label},
    simulate::Truth,
};
use crate::eval::metrics::{self, RankingMetrics};

#[derive(Debug, Default, Serialize)]
pub struct VersionOutcome {
    pub adopted_as_is: usize,
    pub edited: usize,
    pub rejected: usize,
    /// Adopted as is or edited, over all adoption decisions.
    pub adoption_rate: f64,
    pub preferred: usize,
    pub not_preferred: usize,
    pub win_rate: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Separation {
    pub careless_annotations: usize,
    pub rejected: usize,
    pub rejected_careless: usize,
    /// Rejected annotations that were careless.
    pub precision: f64,
    /// Careless annotations that were rejected.
    pub recall: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct AgentSignals {
    pub annotations: usize,
    pub median_delay_s: f64,
    pub relevant_share: f64,
    /// Share of the agent's annotations some judge check failed.
    pub rejected_share: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct FeedbackReport {
    pub annotations: usize,
    pub by_kind: BTreeMap<String, usize>,
    pub heldout_interactions: usize,
    /// Retrieve interactions of the held-out part: Recall@k against what agents
    /// marked relevant or reported missing for the same case (or the data set's labels).
    pub retrieval: Option<RankingMetrics>,
    /// Rank interactions of the held-out part, by the same relevance.
    pub ranking: Option<RankingMetrics>,
    /// Cited knowledge ids that are relevant, over all cited ids.
    pub citation_correctness: Option<f64>,
    pub by_generator: BTreeMap<String, VersionOutcome>,
    pub judge_rejected: usize,
    pub judge_rejection_rate: f64,
    pub rejections_by_check: BTreeMap<String, usize>,
    pub separation: Option<Separation>,
    /// Judge–human agreement: the share of agents' relevance labels the
    /// language-model judge agreed with (when it ran).
    pub llm_agreement: Option<f64>,
    /// Immediate (≤ 60 s), within the hour, later.
    pub delays: (usize, usize, usize),
    pub agents: BTreeMap<String, AgentSignals>,
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `labels`: case id → relevant knowledge ids from a data set, used instead
/// of agents' labels when given.
pub fn evaluate(
    journal: &Journal,
    truth: Option<&Truth>,
    labels: Option<&HashMap<String, HashSet<String>>>,
) -> FeedbackReport {
    let rejected = rejections(journal);
    let mut report = FeedbackReport { annotations: journal.annotations.len(), ..Default::default() };
    for a in &journal.annotations {
        let kind = match a.feedback {
            Feedback::Preference { .. } => "preference",
            Feedback::Adoption { .. } => "adoption",
            Feedback::Relevance { .. } => "relevance",
            Feedback::Missing { .. } => "missing_knowledge",
        };
        *report.by_kind.entry(kind.into()).or_insert(0) += 1;
        let seconds = a.delay_seconds();
        let slot = if seconds <= IMMEDIATE_SECONDS {
            &mut report.delays.0
        } else if seconds <= 3_600.0 {
            &mut report.delays.1
        } else {
            &mut report.delays.2
        };
        *slot += 1;
    }
    report.judge_rejected = rejected.len();
    report.judge_rejection_rate = rejected.len() as f64 / report.annotations.max(1) as f64;
    for checks in rejected.values() {
        for check in checks {
            *report.rejections_by_check.entry(check.clone()).or_insert(0) += 1;
        }
    }
    if let Some(truth) = truth {
        let rejected_careless = rejected.keys().filter(|id| truth.careless_annotations.contains(*id)).count();
        report.separation = Some(Separation {
            careless_annotations: truth.careless_annotations.len(),
            rejected: rejected.len(),
            rejected_careless,
            precision: rejected_careless as f64 / rejected.len().max(1) as f64,
            recall: rejected_careless as f64 / truth.careless_annotations.len().max(1) as f64,
        });
    }

    let agreement: Vec<f64> =
        journal.verdicts.iter().filter(|v| v.check == "llm_relevance").map(|v| v.score).collect();
    if !agreement.is_empty() {
        report.llm_agreement = Some(agreement.iter().sum::<f64>() / agreement.len() as f64);
    }

    // Relevance per case: accepted agents' labels and reports, unless a data set's labels are given.
    let interaction = |a: &AnnotationRow| journal.interactions.get(&a.interaction_id);
    let mut relevant_by_case: HashMap<String, HashSet<String>> = HashMap::new();
    for a in journal.annotations.iter().filter(|a| !rejected.contains_key(&a.annotation_id)) {
        let Some(case) = interaction(a).map(|i| i.case_id.clone()).filter(|c| !c.is_empty()) else { continue };
        let set = relevant_by_case.entry(case).or_default();
        match &a.feedback {
            Feedback::Relevance { judgements } => {
                set.extend(judgements.iter().filter(|(_, l)| *l == Label::Relevant).map(|(id, _)| id.clone()))
            }
            Feedback::Missing { knowledge_id: Some(id), .. } => {
                set.insert(id.clone());
            }
            _ => {}
        }
    }
    let relevant = |i: &InteractionRow| -> Option<HashSet<String>> {
        match labels {
            Some(labels) => labels.get(&i.case_id).cloned(),
            None => relevant_by_case.get(&i.case_id).cloned(),
        }
        .filter(|set| !set.is_empty())
    };

    let mut ordered: Vec<&InteractionRow> = journal.interactions.values().collect();
    ordered.sort_by(|a, b| (a.created_ms, &a.interaction_id).cmp(&(b.created_ms, &b.interaction_id)));
    let heldout = &ordered[ordered.len() - (ordered.len() as f64 * HELDOUT_SHARE).round() as usize..];
    report.heldout_interactions = heldout.len();
    for (kind, slot) in [(Kind::Retrieve, &mut report.retrieval), (Kind::Rank, &mut report.ranking)] {
        let scores: Vec<_> = heldout
            .iter()
            .filter(|i| i.kind == kind)
            .filter_map(|i| {
                let set = relevant(i)?;
                let ranked: Vec<&str> = i.shown.iter().map(|s| s.knowledge_id.as_str()).collect();
                Some(metrics::score_query(&ranked, &set.iter().map(String::as_str).collect()))
            })
            .collect();
        if !scores.is_empty() {
            *slot = Some(metrics::average(&scores));
        }
    }

    // Citations, adoption and preference of Generate interactions.
    let (mut cited, mut cited_relevant) = (0usize, 0usize);
    for i in journal.interactions.values().filter(|i| i.kind == Kind::Generate) {
        if let Some(set) = relevant(i) {
            for c in &i.candidates {
                cited += c.cited.len();
                cited_relevant += c.cited.iter().filter(|id| set.contains(*id)).count();
            }
        }
    }
    if cited > 0 {
        report.citation_correctness = Some(cited_relevant as f64 / cited as f64);
    }
    for a in journal.annotations.iter().filter(|a| !rejected.contains_key(&a.annotation_id)) {
        let Some(i) = interaction(a) else { continue };
        let version = |candidate: &str| {
            i.candidate(candidate)
                .map(|c| c.model_version.clone())
                .filter(|v| !v.is_empty())
                .or_else(|| i.models.get("generator").cloned())
                .unwrap_or_default()
        };
        match &a.feedback {
            Feedback::Adoption { candidate_id, decision, .. } => {
                let outcome = report.by_generator.entry(version(candidate_id)).or_default();
                match decision {
                    Decision::AdoptedAsIs => outcome.adopted_as_is += 1,
                    Decision::Edited => outcome.edited += 1,
                    Decision::Rejected => outcome.rejected += 1,
                }
            }
            Feedback::Preference { preferred, other, .. } => {
                report.by_generator.entry(version(preferred)).or_default().preferred += 1;
                report.by_generator.entry(version(other)).or_default().not_preferred += 1;
            }
            _ => {}
        }
    }
    for outcome in report.by_generator.values_mut() {
        let decided = outcome.adopted_as_is + outcome.edited + outcome.rejected;
        outcome.adoption_rate = (outcome.adopted_as_is + outcome.edited) as f64 / decided.max(1) as f64;
        outcome.win_rate = outcome.preferred as f64 / (outcome.preferred + outcome.not_preferred).max(1) as f64;
    }

    // Per-agent signals.
    let mut by_agent: BTreeMap<&str, Vec<&AnnotationRow>> = BTreeMap::new();
    for a in &journal.annotations {
        by_agent.entry(a.agent_id.as_str()).or_default().push(a);
    }
    for (agent, rows) in by_agent {
        let labels: Vec<bool> = rows
            .iter()
            .filter_map(|a| match &a.feedback {
                Feedback::Relevance { judgements } => Some(judgements.iter().map(|(_, l)| *l == Label::Relevant)),
                _ => None,
            })
            .flatten()
            .collect();
        report.agents.insert(
            agent.to_string(),
            AgentSignals {
                annotations: rows.len(),
                median_delay_s: median(rows.iter().map(|a| a.delay_seconds()).collect()),
                relevant_share: labels.iter().filter(|&&r| r).count() as f64 / labels.len().max(1) as f64,
                rejected_share: rows.iter().filter(|a| rejected.contains_key(&a.annotation_id)).count() as f64
                    / rows.len() as f64,
            },
        );
    }
    report
}

impl std::fmt::Display for FeedbackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} annotations {:?}", self.annotations, self.by_kind)?;
        writeln!(
            f,
            "delays: {} immediate (≤ 60 s), {} within the hour, {} later",
            self.delays.0, self.delays.1, self.delays.2
        )?;
        writeln!(
            f,
            "judge: {} rejected ({:.1}%) {:?}",
            self.judge_rejected,
            100.0 * self.judge_rejection_rate,
            self.rejections_by_check
        )?;
        if let Some(a) = self.llm_agreement {
            writeln!(f, "judge–human agreement on relevance labels (language model): {a:.3}")?;
        }
        if let Some(s) = self.separation.as_ref().filter(|s| s.careless_annotations > 0) {
            writeln!(
                f,
                "judge vs careless annotations: precision {:.3}, recall {:.3} ({} of {} careless rejected)",
                s.precision, s.recall, s.rejected_careless, s.careless_annotations
            )?;
        }
        writeln!(f, "held-out interactions: {}", self.heldout_interactions)?;
        for (name, m) in [("retrieve", &self.retrieval), ("rank", &self.ranking)] {
            if let Some(m) = m {
                let recall: Vec<String> = m.recall.iter().map(|(k, v)| format!("R@{k} {v:.3}")).collect();
                let precision: Vec<String> = m.precision.iter().map(|(k, v)| format!("P@{k} {v:.3}")).collect();
                writeln!(
                    f,
                    "  {name:<8} {} {} MRR {:.3} ({} queries)",
                    recall.join(" "),
                    precision.join(" "),
                    m.mrr,
                    m.queries
                )?;
            }
        }
        if let Some(c) = self.citation_correctness {
            writeln!(f, "citation correctness: {c:.3}")?;
        }
        for (version, o) in &self.by_generator {
            writeln!(
                f,
                "generator {version}: adoption {:.3} ({} as is, {} edited, {} rejected), preference win rate {:.3}",
                o.adoption_rate, o.adopted_as_is, o.edited, o.rejected, o.win_rate
            )?;
        }
        writeln!(f, "{:<16} {:>6} {:>10} {:>9} {:>9}", "agent", "notes", "median s", "relevant", "rejected")?;
        for (agent, s) in &self.agents {
            writeln!(
                f,
                "{agent:<16} {:>6} {:>10.1} {:>9.3} {:>9.3}",
                s.annotations, s.median_delay_s, s.relevant_share, s.rejected_share
            )?;
        }
        Ok(())
    }
}
