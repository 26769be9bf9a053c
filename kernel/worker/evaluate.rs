//! `aitl eval feedback`: what the journal says about the models and the
//! agents, on the held-out (latest 10%) interactions where it measures
//! models: retrieval and ranking quality from agents' labels (or a data set's
//! own labels when simulating), citation correctness, adoption and
//! preference by model version, judge rejections and, given the simulator's
//! truth file, how well the judge separates careless from careful agents
//! (recall per failure mode, precision per check, false rejections of
//! careful annotations, judge–truth agreement); annotation delays and
//! per-agent fatigue signals.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::{
    agreement::Agreement,
    datasets::{HELDOUT_SHARE, rejections},
    gaps::IMMEDIATE_SECONDS,
    journal::Journal,
    rows::{AnnotationRow, CandidateRow, Decision, Feedback, InteractionRow, Kind, Label},
    truth::Truth,
};
use crate::eval::metrics::{self, RankingMetrics};

#[derive(Debug, Default, Serialize)]
pub struct VersionOutcome {
    pub adopted_as_is: usize,
    pub edited: usize,
    pub rejected: usize,
    /// Adopted as is or edited, over all adoption decisions.
    pub adoption_rate: f64,
    /// Adopted unchanged, over all adoption decisions (the paper's adoption).
    pub adoption_as_is_rate: f64,
    /// 95% Wilson interval of `adoption_as_is_rate`.
    pub adoption_as_is_interval: (f64, f64),
    /// Citations of this version's candidates that name knowledge agents
    /// found relevant, over all its citations; None when it cited nothing.
    pub citation_correctness: Option<f64>,
    #[serde(skip)]
    cited: (usize, usize),
    /// Mean P(helpful) by the language-model judge over held-out candidates.
    pub helpfulness: Option<f64>,
    pub helpfulness_candidates: usize,
    pub preferred: usize,
    pub not_preferred: usize,
    pub win_rate: f64,
    /// 95% Wilson interval of `win_rate`.
    pub win_interval: (f64, f64),
}

/// Pairwise preferences between candidates of two different generator
/// versions (champion and challenger): the online A/B test.
#[derive(Debug, Default, Serialize)]
pub struct HeadToHead {
    pub a: String,
    pub b: String,
    pub a_wins: usize,
    pub b_wins: usize,
    /// a's wins over all decided pairs.
    pub a_win_rate: f64,
    /// 95% Wilson interval of `a_win_rate`: a lower bound above 0.5 says a
    /// wins, beyond what chance in this many preferences would give.
    pub a_win_interval: (f64, f64),
}

/// The generator version that wrote `candidate` of `interaction`: the
/// candidate's own, else the interaction's (records from before candidates
/// named their versions).
fn written_by(interaction: &InteractionRow, candidate: Option<&CandidateRow>) -> String {
    candidate
        .map(|c| c.model_version.clone())
        .filter(|v| !v.is_empty())
        .or_else(|| interaction.models.get("generator").cloned())
        .unwrap_or_default()
}

/// The 95% Wilson score interval of `successes` in `trials` (Wilson, 1927):
/// unlike the normal approximation it stays inside [0, 1] and is honest for
/// the few dozen preferences an A/B test starts with. (0, 1) with no trials.
pub fn wilson_interval(successes: usize, trials: usize) -> (f64, f64) {
    if trials == 0 {
        return (0.0, 1.0);
    }
    const Z: f64 = 1.959_963_984_540_054;
    let (n, p) = (trials as f64, successes as f64 / trials as f64);
    let center = (p + Z * Z / (2.0 * n)) / (1.0 + Z * Z / n);
    let half = Z / (1.0 + Z * Z / n) * (p * (1.0 - p) / n + Z * Z / (4.0 * n * n)).sqrt();
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// One failure mode of the simulator's annotator models.
#[derive(Debug, Default, Serialize)]
pub struct FaultOutcome {
    /// Wrong annotations of this mode.
    pub wrong: usize,
    /// Of those, rejected by the judge.
    pub rejected: usize,
    pub recall: f64,
}

/// One judge check against the truth.
#[derive(Debug, Default, Serialize)]
pub struct CheckOutcome {
    /// Annotations the check failed.
    pub rejections: usize,
    /// Of those, wrong ones.
    pub wrong: usize,
    /// `wrong` over `rejections`.
    pub precision: f64,
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
    /// Journaled annotations not in the truth's wrong set.
    pub careful_annotations: usize,
    /// Careful annotations the judge rejected.
    pub false_rejections: usize,
    /// `false_rejections` over `careful_annotations`.
    pub false_rejection_rate: f64,
    /// Failure mode (the truth's `faults`; `unknown` for truth files without
    /// them) → wrong annotations and how many the judge rejected.
    pub by_fault: BTreeMap<String, FaultOutcome>,
    /// Check → its rejections and how many were of wrong annotations.
    pub by_check: BTreeMap<String, CheckOutcome>,
    /// The judge's accept/reject against the truth's on every journaled annotation.
    pub agreement: Agreement,
}

impl Separation {
    fn new(journal: &Journal, truth: &Truth, rejected: &HashMap<String, Vec<String>>) -> Self {
        let wrong = |id: &str| truth.careless_annotations.contains(id);
        let rejected_careless = rejected.keys().filter(|id| wrong(id)).count();
        let mut by_fault: BTreeMap<String, FaultOutcome> = BTreeMap::new();
        for id in &truth.careless_annotations {
            let outcome = by_fault.entry(truth.fault(id).unwrap_or("unknown").to_string()).or_default();
            outcome.wrong += 1;
            outcome.rejected += usize::from(rejected.contains_key(id));
        }
        for outcome in by_fault.values_mut() {
            outcome.recall = outcome.rejected as f64 / outcome.wrong.max(1) as f64;
        }
        let mut by_check: BTreeMap<String, CheckOutcome> = BTreeMap::new();
        for (id, checks) in rejected {
            for check in checks {
                let outcome = by_check.entry(check.clone()).or_default();
                outcome.rejections += 1;
                outcome.wrong += usize::from(wrong(id));
            }
        }
        for outcome in by_check.values_mut() {
            outcome.precision = outcome.wrong as f64 / outcome.rejections.max(1) as f64;
        }
        let careful: Vec<&AnnotationRow> = journal.annotations.iter().filter(|a| !wrong(&a.annotation_id)).collect();
        let false_rejections = careful.iter().filter(|a| rejected.contains_key(&a.annotation_id)).count();
        Separation {
            careless_annotations: truth.careless_annotations.len(),
            rejected: rejected.len(),
            rejected_careless,
            precision: rejected_careless as f64 / rejected.len().max(1) as f64,
            recall: rejected_careless as f64 / truth.careless_annotations.len().max(1) as f64,
            careful_annotations: careful.len(),
            false_rejections,
            false_rejection_rate: false_rejections as f64 / careful.len().max(1) as f64,
            by_fault,
            by_check,
            agreement: Agreement::from_pairs(
                journal.annotations.iter().map(|a| (rejected.contains_key(&a.annotation_id), wrong(&a.annotation_id))),
            ),
        }
    }
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
    /// Keyed "a vs b", versions in order.
    pub head_to_head: BTreeMap<String, HeadToHead>,
    pub judge_rejected: usize,
    pub judge_rejection_rate: f64,
    pub rejections_by_check: BTreeMap<String, usize>,
    pub separation: Option<Separation>,
    /// Judge–human agreement: the share of agents' relevance labels the
    /// language-model judge agreed with (when it ran).
    pub llm_agreement: Option<f64>,
    /// The judge's accept/reject against people's verdicts on a labelled
    /// subset (see [`score_human_verdicts`]).
    pub human_agreement: Option<Agreement>,
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

/// What a data set knows per case (query id), used instead of agents' labels.
#[derive(Debug, Default)]
pub struct CaseLabels {
    pub relevant: HashSet<String>,
    pub reference_reply: String,
}

/// Scores held-out candidates' helpfulness with the language-model judge
/// (at most `limit` candidates, the latest first), against the data set's
/// reference reply when there is one.
pub fn score_helpfulness(
    report: &mut FeedbackReport,
    journal: &Journal,
    judge: &super::llm_judge::LlmJudge,
    labels: Option<&HashMap<String, CaseLabels>>,
    limit: usize,
) -> crate::error::Result<()> {
    let mut generated: Vec<&InteractionRow> =
        journal.interactions.values().filter(|i| i.kind == Kind::Generate).collect();
    generated.sort_by(|a, b| (b.created_ms, &b.interaction_id).cmp(&(a.created_ms, &a.interaction_id)));
    let heldout = (generated.len() as f64 * HELDOUT_SHARE).round().max(1.0) as usize;
    let mut scores: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let candidates = generated.into_iter().take(heldout).flat_map(|i| i.candidates.iter().map(move |c| (i, c)));
    for (i, c) in candidates.take(limit) {
        let reference =
            labels.and_then(|l| l.get(&i.case_id)).map(|c| c.reference_reply.as_str()).filter(|r| !r.is_empty());
        scores.entry(written_by(i, Some(c))).or_default().push(judge.helpfulness(&i.query, &c.text, reference)?);
    }
    for (version, values) in scores {
        let outcome = report.by_generator.entry(version).or_default();
        outcome.helpfulness_candidates = values.len();
        outcome.helpfulness = Some(values.iter().sum::<f64>() / values.len() as f64);
    }
    Ok(())
}

/// Scores the judge against people's verdicts on a labelled subset
/// (annotation id → accepted; `agreement::read_human_verdicts` reads a file).
pub fn score_human_verdicts(
    report: &mut FeedbackReport,
    journal: &Journal,
    human: &std::collections::BTreeMap<String, bool>,
) {
    report.human_agreement = Some(Agreement::on_subset(&rejections(journal), human));
}

/// `labels`: a data set's relevance per case, used instead of agents' labels when given.
pub fn evaluate(
    journal: &Journal,
    truth: Option<&Truth>,
    labels: Option<&HashMap<String, CaseLabels>>,
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
        report.separation = Some(Separation::new(journal, truth, &rejected));
    }

    let agreement: Vec<f64> = journal.verdicts.iter().filter(|v| v.check == "llm_relevance").map(|v| v.score).collect();
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
            Some(labels) => labels.get(&i.case_id).map(|c| c.relevant.clone()),
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
                let right = c.cited.iter().filter(|id| set.contains(*id)).count();
                cited += c.cited.len();
                cited_relevant += right;
                let outcome = report.by_generator.entry(written_by(i, Some(c))).or_default();
                outcome.cited.0 += right;
                outcome.cited.1 += c.cited.len();
            }
        }
    }
    if cited > 0 {
        report.citation_correctness = Some(cited_relevant as f64 / cited as f64);
    }
    for a in journal.annotations.iter().filter(|a| !rejected.contains_key(&a.annotation_id)) {
        let Some(i) = interaction(a) else { continue };
        let version = |candidate: &str| written_by(i, i.candidate(candidate));
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
                let (winner, loser) = (version(preferred), version(other));
                report.by_generator.entry(winner.clone()).or_default().preferred += 1;
                report.by_generator.entry(loser.clone()).or_default().not_preferred += 1;
                if winner != loser {
                    let (a, b) = if winner < loser { (&winner, &loser) } else { (&loser, &winner) };
                    let pair = report.head_to_head.entry(format!("{a} vs {b}")).or_insert_with(|| HeadToHead {
                        a: a.clone(),
                        b: b.clone(),
                        ..Default::default()
                    });
                    if winner == pair.a {
                        pair.a_wins += 1;
                    } else {
                        pair.b_wins += 1;
                    }
                }
            }
            _ => {}
        }
    }
    for pair in report.head_to_head.values_mut() {
        pair.a_win_rate = pair.a_wins as f64 / (pair.a_wins + pair.b_wins).max(1) as f64;
        pair.a_win_interval = wilson_interval(pair.a_wins, pair.a_wins + pair.b_wins);
    }
    for outcome in report.by_generator.values_mut() {
        let decided = outcome.adopted_as_is + outcome.edited + outcome.rejected;
        outcome.adoption_rate = (outcome.adopted_as_is + outcome.edited) as f64 / decided.max(1) as f64;
        outcome.adoption_as_is_rate = outcome.adopted_as_is as f64 / decided.max(1) as f64;
        outcome.adoption_as_is_interval = wilson_interval(outcome.adopted_as_is, decided);
        outcome.win_rate = outcome.preferred as f64 / (outcome.preferred + outcome.not_preferred).max(1) as f64;
        outcome.win_interval = wilson_interval(outcome.preferred, outcome.preferred + outcome.not_preferred);
        let (right, all) = outcome.cited;
        outcome.citation_correctness = (all > 0).then(|| right as f64 / all as f64);
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
        if let Some(s) = self.separation.as_ref() {
            if s.careless_annotations > 0 {
                writeln!(
                    f,
                    "judge vs careless annotations: precision {:.3}, recall {:.3} ({} of {} careless rejected)",
                    s.precision, s.recall, s.rejected_careless, s.careless_annotations
                )?;
            }
            writeln!(
                f,
                "  careful annotations falsely rejected: {} of {} ({:.1}%)",
                s.false_rejections,
                s.careful_annotations,
                100.0 * s.false_rejection_rate
            )?;
            if !s.by_fault.is_empty() {
                writeln!(f, "  {:<20} {:>7} {:>9} {:>7}", "failure mode", "wrong", "rejected", "recall")?;
                for (fault, o) in &s.by_fault {
                    writeln!(f, "  {fault:<20} {:>7} {:>9} {:>7.3}", o.wrong, o.rejected, o.recall)?;
                }
            }
            if !s.by_check.is_empty() {
                writeln!(f, "  {:<22} {:>10} {:>8} {:>9}", "check", "rejections", "wrong", "precision")?;
                for (check, o) in &s.by_check {
                    writeln!(f, "  {check:<22} {:>10} {:>8} {:>9.3}", o.rejections, o.wrong, o.precision)?;
                }
            }
            let a = &s.agreement;
            writeln!(
                f,
                "  judge vs truth on {} annotations: accuracy {:.3}, Cohen's kappa {:.3}",
                a.annotations, a.accuracy, a.kappa
            )?;
        }
        if let Some(a) = &self.human_agreement {
            writeln!(
                f,
                "judge vs human verdicts on {} annotations: accuracy {:.3}, Cohen's kappa {:.3}",
                a.annotations, a.accuracy, a.kappa
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
        match self.citation_correctness {
            Some(c) => writeln!(f, "citation correctness: {c:.3}")?,
            None => writeln!(f, "citation correctness: no candidate cited knowledge")?,
        }
        for pair in self.head_to_head.values() {
            writeln!(
                f,
                "head to head {} vs {}: {} to {} (win rate of the first {:.3}, 95% interval {:.3}–{:.3})",
                pair.a, pair.b, pair.a_wins, pair.b_wins, pair.a_win_rate, pair.a_win_interval.0, pair.a_win_interval.1
            )?;
        }
        for (version, o) in &self.by_generator {
            writeln!(
                f,
                "generator {version}: adoption {:.3} ({} as is, {} edited, {} rejected), adopted as is {:.3} \
                 (95% {:.3}–{:.3}), preference win rate {:.3} (95% {:.3}–{:.3}), citation correctness {}{}",
                o.adoption_rate,
                o.adopted_as_is,
                o.edited,
                o.rejected,
                o.adoption_as_is_rate,
                o.adoption_as_is_interval.0,
                o.adoption_as_is_interval.1,
                o.win_rate,
                o.win_interval.0,
                o.win_interval.1,
                o.citation_correctness.map_or("none cited".to_string(), |c| format!("{c:.3}")),
                o.helpfulness.map_or(String::new(), |h| format!(
                    ", helpfulness {h:.3} (language-model judge, {} held-out candidates)",
                    o.helpfulness_candidates
                ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::rows::{Row, ShownRow, Verdict};

    fn interaction(id: &str, kind: Kind, created_ms: i64, case: &str) -> InteractionRow {
        InteractionRow {
            tenant: crate::tenancy::DEFAULT_TENANT.into(),
            sequence: 0,
            interaction_id: id.into(),
            kind,
            created_ms,
            agent_id: String::new(),
            case_id: case.into(),
            query: "q".into(),
            context: Vec::new(),
            shown: ["k1", "k2", "k3"]
                .iter()
                .enumerate()
                .map(|(i, k)| ShownRow { knowledge_id: k.to_string(), version: 1, rank: i as u32 + 1 })
                .collect(),
            candidates: Vec::new(),
            system_prompt: String::new(),
            models: BTreeMap::new(),
        }
    }

    fn annotation(id: &str, on: &str, agent: &str, delay_s: f64, feedback: Feedback) -> Row {
        Row::Annotation(AnnotationRow {
            tenant: crate::tenancy::DEFAULT_TENANT.into(),
            sequence: 0,
            annotation_id: id.into(),
            interaction_id: on.into(),
            agent_id: agent.into(),
            case_id: String::new(),
            shown_ms: 0,
            annotated_ms: (delay_s * 1000.0) as i64,
            feedback,
        })
    }

    /// Every figure of a hand-made journal, computed by hand.
    #[test]
    fn feedback_metrics_match_hand_computed_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        let mut generate = interaction("g", Kind::Generate, 0, "c9");
        generate.candidates = vec![
            CandidateRow {
                candidate_id: "c0".into(),
                text: "a".into(),
                cited: vec!["k2".into()],
                model_version: "v1".into(),
            },
            CandidateRow {
                candidate_id: "c1".into(),
                text: "b".into(),
                cited: vec!["k1".into(), "k3".into()],
                model_version: "v1".into(),
            },
        ];
        journal.stage(Row::Interaction(generate)).unwrap();
        // Champion (v1) and challenger (v2) candidates side by side.
        let mut versus = interaction("h", Kind::Generate, 0, "c8");
        versus.candidates = ["v2", "v1"]
            .iter()
            .enumerate()
            .map(|(i, v)| CandidateRow {
                candidate_id: format!("x{i}"),
                text: format!("reply {i}"),
                cited: Vec::new(),
                model_version: v.to_string(),
            })
            .collect();
        journal.stage(Row::Interaction(versus)).unwrap();
        for i in 0..10 {
            journal
                .stage(Row::Interaction(interaction(&format!("r{i}"), Kind::Retrieve, 1 + i, &format!("c{i}"))))
                .unwrap();
        }
        let labels = |pairs: &[(&str, Label)]| Feedback::Relevance {
            judgements: pairs.iter().map(|(k, l)| (k.to_string(), *l)).collect(),
        };
        let rows = vec![
            annotation(
                "rel",
                "r9",
                "a",
                10.0,
                labels(&[("k2", Label::Relevant), ("k1", Label::Irrelevant), ("k3", Label::Irrelevant)]),
            ),
            annotation(
                "gap",
                "r9",
                "a",
                120.0,
                Feedback::Missing {
                    knowledge_id: Some("k4".into()),
                    title: String::new(),
                    uri: String::new(),
                    excerpt: String::new(),
                    note: String::new(),
                },
            ),
            annotation(
                "pref",
                "g",
                "a",
                20.0,
                Feedback::Preference {
                    preferred: "c0".into(),
                    other: "c1".into(),
                    strength: 2,
                    rationale: "more precise".into(),
                },
            ),
            annotation(
                "adopt",
                "g",
                "a",
                30.0,
                Feedback::Adoption {
                    candidate_id: "c0".into(),
                    decision: Decision::Edited,
                    sent_text: "a!".into(),
                    rationale: "tone".into(),
                },
            ),
            annotation(
                "versus",
                "h",
                "c",
                15.0,
                Feedback::Preference {
                    preferred: "x0".into(),
                    other: "x1".into(),
                    strength: 1,
                    rationale: "answers the question".into(),
                },
            ),
            annotation("fast", "r0", "b", 0.1, labels(&[("k1", Label::Relevant)])),
            Row::Verdict(Verdict {
                annotation_id: "fast".into(),
                check: "too_fast".into(),
                pass: false,
                score: 0.1,
                reason: String::new(),
            }),
        ];
        rows.into_iter().for_each(|r| journal.stage(r).unwrap());
        let truth =
            Truth { careless_annotations: ["fast".to_string(), "adopt".to_string()].into(), ..Truth::default() };
        let report = evaluate(&journal, Some(&truth), None);

        assert_eq!(report.delays, (5, 1, 0));
        assert_eq!((report.judge_rejected, report.rejections_by_check["too_fast"]), (1, 1));
        let separation = report.separation.as_ref().unwrap();
        assert_eq!((separation.precision, separation.recall), (1.0, 0.5));
        // Held out: the latest of 11 interactions, r9. Relevant for c9: k2 (labelled) and k4 (missing).
        assert_eq!(report.heldout_interactions, 1);
        let retrieval = report.retrieval.as_ref().unwrap();
        let at = |list: &[(usize, f64)], k: usize| list.iter().find(|(n, _)| *n == k).unwrap().1;
        assert_eq!((retrieval.queries, at(&retrieval.recall, 5), at(&retrieval.precision, 1)), (1, 0.5, 0.0));
        assert!((at(&retrieval.precision, 5) - 0.2).abs() < 1e-12);
        assert!((retrieval.mrr - 0.5).abs() < 1e-12);
        let ndcg = (1.0 / 3f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((retrieval.ndcg_at_10 - ndcg).abs() < 1e-9, "{} vs {ndcg}", retrieval.ndcg_at_10);
        assert!(report.ranking.is_none());
        // Cited: k2, k1, k3 for case c9; only k2 is relevant.
        assert!((report.citation_correctness.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        let v1 = &report.by_generator["v1"];
        assert_eq!((v1.edited, v1.adoption_rate, v1.preferred, v1.not_preferred), (1, 1.0, 1, 2));
        assert!((v1.win_rate - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(v1.win_interval, wilson_interval(1, 3));
        // One edit, no adoption as is.
        assert_eq!((v1.adoption_as_is_rate, v1.adoption_as_is_interval), (0.0, wilson_interval(0, 1)));
        let cited: f64 = report.by_generator.values().filter_map(|o| o.citation_correctness).sum();
        assert!(cited > 0.0, "per-version citation correctness is computed");
        // Only the mixed pair is a head-to-head: the challenger v2 won it.
        assert_eq!(report.head_to_head.len(), 1);
        let pair = &report.head_to_head["v1 vs v2"];
        assert_eq!((pair.a_wins, pair.b_wins, pair.a_win_rate), (0, 1, 0.0));
        assert_eq!(pair.a_win_interval, wilson_interval(0, 1));
        assert_eq!(report.agents["b"].rejected_share, 1.0);
        assert_eq!(report.agents["a"].relevant_share, 1.0 / 3.0);
    }

    /// Recall per failure mode, precision per check, false rejections of
    /// careful annotations and judge–truth agreement, by hand.
    #[test]
    fn separation_per_fault_and_check_matches_hand_computed_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        journal.stage(Row::Interaction(interaction("r0", Kind::Rank, 0, "c0"))).unwrap();
        let labels = Feedback::Relevance { judgements: vec![("k1".into(), Label::Relevant)] };
        for id in ["x1", "x2", "x3", "x4", "x5"] {
            journal.stage(annotation(id, "r0", "a", 10.0, labels.clone())).unwrap();
        }
        let fail = |id: &str, check: &str| {
            Row::Verdict(Verdict {
                annotation_id: id.into(),
                check: check.into(),
                pass: false,
                score: 0.0,
                reason: String::new(),
            })
        };
        for row in [
            fail("x1", "uniform_labels"),
            fail("x3", "position_bias"),
            fail("x3", "uniform_labels"),
            fail("x5", "too_fast"),
        ] {
            journal.stage(row).unwrap();
        }
        // x3 and x4 wrong by position bias; x5 wrong without a recorded mode (an older truth file).
        let mut truth = Truth::default();
        truth.wrong("x3", "position_bias");
        truth.wrong("x4", "position_bias");
        truth.careless_annotations.insert("x5".into());
        let report = evaluate(&journal, Some(&truth), None);
        let s = report.separation.as_ref().unwrap();
        // Rejected x1, x3, x5; wrong x3, x4, x5: precision 2/3, recall 2/3.
        assert_eq!((s.rejected, s.rejected_careless, s.careless_annotations), (3, 2, 3));
        assert!((s.precision - 2.0 / 3.0).abs() < 1e-12 && (s.recall - 2.0 / 3.0).abs() < 1e-12);
        // Careful: x1 (rejected) and x2.
        assert_eq!((s.careful_annotations, s.false_rejections, s.false_rejection_rate), (2, 1, 0.5));
        let fault = |m: &str| (s.by_fault[m].wrong, s.by_fault[m].rejected, s.by_fault[m].recall);
        assert_eq!(fault("position_bias"), (2, 1, 0.5));
        assert_eq!(fault("unknown"), (1, 1, 1.0));
        let check = |c: &str| (s.by_check[c].rejections, s.by_check[c].wrong, s.by_check[c].precision);
        assert_eq!(check("uniform_labels"), (2, 1, 0.5));
        assert_eq!(check("position_bias"), (1, 1, 1.0));
        assert_eq!(check("too_fast"), (1, 1, 1.0));
        // (judge rejects, wrong): x1 (T, F), x2 (F, F), x3 (T, T), x4 (F, T), x5 (T, T): accuracy 3/5;
        // both reject 3/5 of the time: chance 0.6·0.6 + 0.4·0.4 = 0.52; κ = (0.6 − 0.52) / 0.48 = 1/6.
        assert!((s.agreement.accuracy - 0.6).abs() < 1e-12);
        assert!((s.agreement.kappa - 1.0 / 6.0).abs() < 1e-12, "{:?}", s.agreement);
        let text = report.to_string();
        assert!(text.contains("position_bias") && text.contains("falsely rejected: 1 of 2"), "{text}");

        // People's verdicts on a subset: x1 and x2 accepted, x3 rejected; the judge agrees on x2 and x3.
        let mut report = report;
        let human = [("x1".to_string(), true), ("x2".to_string(), true), ("x3".to_string(), false)].into();
        score_human_verdicts(&mut report, &journal, &human);
        let h = report.human_agreement.as_ref().unwrap();
        assert_eq!(h.annotations, 3);
        assert!((h.accuracy - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn wilson_intervals_match_published_values() {
        // 60 wins of 100: 0.502–0.691 (Wilson, 95%), the A/B bar's shape.
        let (low, high) = wilson_interval(60, 100);
        assert!((low - 0.5020).abs() < 1e-4 && (high - 0.6906).abs() < 1e-4, "{low} {high}");
        // All or nothing stays inside [0, 1] and is not degenerate.
        let (low, high) = wilson_interval(10, 10);
        assert!((low - 0.7225).abs() < 1e-4 && (high - 1.0).abs() < 1e-12, "{low} {high}");
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
        let (low, high) = wilson_interval(0, 5);
        assert!(low == 0.0 && (high - 0.4345).abs() < 1e-4, "{high}");
    }
}
