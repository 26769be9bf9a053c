//! The Virtual Judge's consistency checks: the noise gate between agents'
//! labels and training. Each check looks at one annotation with what the
//! journal knows (the interaction it refers to, the agent's other
//! annotations on it, the agent's history, the other agents' labels) and
//! returns verdicts that are stored beside the label, never replacing it. A
//! check that needs two annotations (a preference and the adoption of the
//! same interaction) runs when the second arrives and puts its verdict on
//! the one it doubts.
//!
//! Checks about an agent's habits do not count against fixed numbers tuned
//! to one data set: they compare the agent with the other agents (an exact
//! binomial test of the agent's rate of a pattern against the population's
//! pooled rate, a z test of a change against the population's own change
//! and spread) and run only with a minimum of evidence (`min_evidence`).
//! On a data set whose questions each have many relevant objects every
//! careful agent labels many objects relevant, so none stands out. When such
//! a test turns significant, the agent's earlier annotations that fit the
//! pattern (kept while the evidence was short) are failed too: a verdict
//! may arrive later than its annotation, and the latest one counts.
//!
//! Missing-knowledge reports are never failed for being reports or for being
//! late: they feed the knowledge-gap queue for people (which reads no
//! verdicts). Only a late report naming an object the other agents' labels
//! on similar questions call irrelevant is failed (`late_report`), which
//! keeps it out of training.

use std::collections::{HashMap, HashSet, VecDeque};

use super::{
    journal::Journal,
    rows::{AnnotationRow, Decision, Feedback, InteractionRow, Label, Verdict},
    stats, text,
};

pub use crate::config::judge::{JudgeMode, JudgeOptions};

/// Rationales that say nothing, whoever writes them.
const BOILERPLATE: &[&str] =
    &["ok", "okay", "fine", "good", "better", "bad", "n a", "na", "none", "no reason", "same", "idk", "-"];

/// Earlier labels kept per object: enough for a majority, bounded in memory.
const VOTES_PER_OBJECT: usize = 256;

/// Trials of a pattern and how often it was seen.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    trials: usize,
    hits: usize,
}

impl Count {
    fn add(&mut self, hit: bool) {
        self.trials += 1;
        self.hits += usize::from(hit);
    }
}

#[derive(Default)]
struct AgentHistory {
    rationales: HashMap<String, usize>,
    /// Relevance checks of at least `uniform_min_judgements` objects; hits: all relevant.
    uniform: Count,
    /// Relevance checks of more than `position_top` objects; hits: top relevant, a lower one not.
    top_heavy: Count,
    /// Preferences and adoptions; hits: the first candidate chosen.
    first: Count,
    /// (position in `Judge::shares`, relevant share) of each relevance check.
    shares: Vec<(usize, f64)>,
    /// Σ share and Σ share² of `shares`.
    share_sums: (f64, f64),
    /// (annotation, default selection) of the latest relevance checks,
    /// preferences and adoptions, at most `fatigue_window`.
    defaults: VecDeque<(String, bool)>,
    fatigue_failed: HashSet<String>,
    /// Per check: annotations that fit its pattern while the agent's test
    /// was not (yet) significant.
    pending: HashMap<&'static str, Vec<String>>,
}

/// An earlier label of an object.
struct Vote {
    case: String,
    query: String,
    relevant: bool,
}

/// The outcome of an agent's rate test.
struct RateTest {
    hits: usize,
    trials: usize,
    /// The population's rate the agent is compared with.
    expected: f64,
    p_value: f64,
}

pub struct Judge {
    options: JudgeOptions,
    index: HashMap<String, usize>,
    agents: Vec<AgentHistory>,
    /// (agent, relevant share) of every relevance check, in judging order.
    shares: Vec<(usize, f64)>,
    /// Knowledge id → its latest labels.
    votes: HashMap<String, VecDeque<Vote>>,
}

fn verdict(a: &AnnotationRow, check: &str, pass: bool, score: f64, reason: String) -> Verdict {
    verdict_on(&a.annotation_id, check, pass, score, reason)
}

fn verdict_on(annotation_id: &str, check: &str, pass: bool, score: f64, reason: String) -> Verdict {
    Verdict { annotation_id: annotation_id.to_string(), check: check.into(), pass, score, reason }
}

/// The text the agent sent, if the adoption sent one.
fn sent_text<'a>(feedback: &'a Feedback, interaction: &'a InteractionRow) -> Option<&'a str> {
    match feedback {
        Feedback::Adoption { decision: Decision::Edited, sent_text, .. } => Some(sent_text),
        Feedback::Adoption { decision: Decision::AdoptedAsIs, candidate_id, .. } => {
            interaction.candidate(candidate_id).map(|c| c.text.as_str())
        }
        _ => None,
    }
}

/// What the agent-level checks read off one annotation.
#[derive(Debug, Default)]
struct Features {
    relevance: Option<RelevanceFeatures>,
    /// A preference or adoption between at least two candidates: whether it chose the first.
    first: Option<bool>,
    /// A default selection (all relevant, the first candidate adopted as is
    /// or preferred); None for annotations that make no selection.
    default: Option<bool>,
}

#[derive(Debug)]
struct RelevanceFeatures {
    judged: usize,
    share: f64,
    all_relevant: bool,
    /// The top `position_top` positions all relevant, a lower one not.
    top_heavy: bool,
}

impl Features {
    fn of(a: &AnnotationRow, interaction: &InteractionRow, options: &JudgeOptions) -> Self {
        let first_candidate =
            (interaction.candidates.len() >= 2).then(|| interaction.candidates[0].candidate_id.as_str());
        match &a.feedback {
            Feedback::Relevance { judgements } if !judgements.is_empty() => {
                let relevant = judgements.iter().filter(|(_, l)| *l == Label::Relevant).count();
                let all_relevant = relevant == judgements.len();
                // Positions as shown (1 = top); the order of the judgements when the object was not shown.
                let position = |i: usize, id: &str| {
                    interaction
                        .shown
                        .iter()
                        .position(|s| s.knowledge_id == id)
                        .map_or(i + 1, |p| interaction.shown[p].rank.max(1) as usize)
                };
                let top = options.position_top;
                let (mut top_seen, mut top_relevant, mut lower_not) = (0, 0, false);
                for (i, (id, label)) in judgements.iter().enumerate() {
                    if position(i, id) <= top {
                        top_seen += 1;
                        top_relevant += usize::from(*label == Label::Relevant);
                    } else if *label != Label::Relevant {
                        lower_not = true;
                    }
                }
                let top_heavy =
                    top > 0 && judgements.len() > top && top_seen == top && top_relevant == top && lower_not;
                Features {
                    relevance: Some(RelevanceFeatures {
                        judged: judgements.len(),
                        share: relevant as f64 / judgements.len() as f64,
                        all_relevant,
                        top_heavy,
                    }),
                    first: None,
                    default: (judgements.len() >= 2).then_some(all_relevant),
                }
            }
            Feedback::Preference { preferred, .. } => {
                let first = first_candidate.map(|c| c == preferred);
                Features { first, default: first, ..Features::default() }
            }
            Feedback::Adoption { candidate_id, decision, .. } => {
                let first = first_candidate.map(|c| c == candidate_id && *decision != Decision::Rejected);
                let default = first_candidate.map(|c| c == candidate_id && *decision == Decision::AdoptedAsIs);
                Features { first, default, ..Features::default() }
            }
            _ => Features::default(),
        }
    }
}

impl Judge {
    pub fn new(options: JudgeOptions) -> Self {
        Judge { options, index: HashMap::new(), agents: Vec::new(), shares: Vec::new(), votes: HashMap::new() }
    }

    pub fn options(&self) -> &JudgeOptions {
        &self.options
    }

    /// Rebuilds the agents' histories and the population from journaled
    /// annotations (at start), judging them again in order and discarding
    /// the verdicts, so the state is the one the original run ended with.
    pub fn replay(&mut self, journal: &Journal) {
        for a in &journal.annotations {
            let _ = self.judge(a, journal);
        }
    }

    fn agent(&mut self, id: &str) -> usize {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        self.agents.push(AgentHistory::default());
        self.index.insert(id.to_string(), self.agents.len() - 1);
        self.agents.len() - 1
    }

    /// Verdicts on `a` (and on earlier annotations it contradicts or
    /// reveals), given the journal as it was before `a`.
    pub fn judge(&mut self, a: &AnnotationRow, journal: &Journal) -> Vec<Verdict> {
        if !self.options.enabled {
            return Vec::new();
        }
        let mut out = Vec::new();
        let Some(interaction) = journal.interactions.get(&a.interaction_id) else {
            out.push(verdict(a, "joined", false, 0.0, "the interaction is not in the log".into()));
            return out;
        };
        let agent = self.agent(&a.agent_id);
        let features = Features::of(a, interaction, &self.options);
        let case = if a.case_id.is_empty() { interaction.case_id.as_str() } else { a.case_id.as_str() };

        self.rationale(agent, a, &mut out);
        self.too_fast(a, &mut out);
        // Earlier annotations of the same agent on the same interaction.
        let siblings: Vec<&AnnotationRow> = journal
            .annotations_on(&a.interaction_id)
            .filter(|b| b.agent_id == a.agent_id && b.annotation_id != a.annotation_id)
            .collect();
        self.preference_vs_adoption(a, &siblings, interaction, &mut out);
        self.relevance_vs_missing(a, &siblings, &mut out);
        self.consistency(a, case, &interaction.query, &mut out);
        self.late_report(a, case, &interaction.query, &mut out);
        let improbable = self.improbable_all_relevant(a, &features, case, &interaction.query);

        // Only labels no check doubts become evidence about the objects.
        let doubted = out.iter().any(|v| !v.pass && v.annotation_id == a.annotation_id);
        self.observe(agent, a, &features, case, &interaction.query, doubted);
        self.uniform_labels(agent, a, &features, improbable, &mut out);
        self.position_bias(agent, a, &features, &mut out);
        self.first_candidate(agent, a, &features, &mut out);
        self.agent_drift(agent, a, &features, &mut out);
        self.fatigue(agent, a, &features, &mut out);
        out
    }

    fn observe(
        &mut self,
        agent: usize,
        a: &AnnotationRow,
        features: &Features,
        case: &str,
        query: &str,
        doubted: bool,
    ) {
        let options = &self.options;
        let history = &mut self.agents[agent];
        match &a.feedback {
            Feedback::Preference { rationale, .. } | Feedback::Adoption { rationale, .. } => {
                let key = text::words(rationale).collect::<Vec<_>>().join(" ");
                if !key.is_empty() {
                    *history.rationales.entry(key).or_insert(0) += 1;
                }
            }
            Feedback::Relevance { judgements } if !doubted => {
                for (id, label) in judgements {
                    if *label == Label::PartiallyRelevant {
                        continue;
                    }
                    let votes = self.votes.entry(id.clone()).or_default();
                    if votes.len() >= VOTES_PER_OBJECT {
                        votes.pop_front();
                    }
                    votes.push_back(Vote {
                        case: case.to_string(),
                        query: query.to_string(),
                        relevant: *label == Label::Relevant,
                    });
                }
            }
            Feedback::Relevance { .. } | Feedback::Missing { .. } => {}
        }
        if let Some(r) = &features.relevance {
            if r.judged >= options.uniform_min_judgements {
                history.uniform.add(r.all_relevant);
            }
            if options.position_top > 0 && r.judged > options.position_top {
                history.top_heavy.add(r.top_heavy);
            }
            history.shares.push((self.shares.len(), r.share));
            history.share_sums.0 += r.share;
            history.share_sums.1 += r.share * r.share;
            self.shares.push((agent, r.share));
        }
        if let Some(first) = features.first {
            history.first.add(first);
        }
        if let Some(default) = features.default {
            if history.defaults.len() >= options.fatigue_window.max(1) {
                history.defaults.pop_front();
            }
            history.defaults.push_back((a.annotation_id.clone(), default));
        }
    }

    fn rationale(&self, agent: usize, a: &AnnotationRow, out: &mut Vec<Verdict>) {
        let rationale = match &a.feedback {
            Feedback::Preference { rationale, .. } => rationale,
            // An unchanged adoption needs no explanation, but one that gives
            // a boilerplate one says how the agent works.
            Feedback::Adoption { rationale, decision, .. }
                if *decision != Decision::AdoptedAsIs || !rationale.trim().is_empty() =>
            {
                rationale
            }
            _ => return,
        };
        let words: Vec<String> = text::words(rationale).collect();
        let key = words.join(" ");
        let repeats = self.agents[agent].rationales.get(&key).copied().unwrap_or(0);
        let (pass, reason) = if words.is_empty() {
            (false, "empty rationale".to_string())
        } else if BOILERPLATE.contains(&key.as_str()) || words.len() < self.options.min_rationale_words {
            (false, format!("boilerplate rationale {rationale:?}"))
        } else if repeats + 1 >= self.options.repeated_rationale {
            (false, format!("the agent has given the rationale {rationale:?} {} times", repeats + 1))
        } else {
            (true, format!("{} words", words.len()))
        };
        out.push(verdict(a, "rationale", pass, words.len() as f64, reason));
    }

    fn too_fast(&self, a: &AnnotationRow, out: &mut Vec<Verdict>) {
        let floor = match &a.feedback {
            Feedback::Preference { .. } | Feedback::Adoption { .. } => self.options.min_seconds_per_decision,
            Feedback::Relevance { judgements } => self.options.min_seconds_per_judgement * judgements.len() as f64,
            Feedback::Missing { .. } => return,
        };
        let seconds = a.delay_seconds();
        let pass = seconds >= floor;
        let reason = if pass {
            format!("{seconds:.1} s")
        } else {
            format!("annotated {seconds:.1} s after seeing the output; reading it takes at least {floor:.1} s")
        };
        out.push(verdict(a, "too_fast", pass, seconds, reason));
    }

    fn preference_vs_adoption(
        &self,
        a: &AnnotationRow,
        siblings: &[&AnnotationRow],
        interaction: &InteractionRow,
        out: &mut Vec<Verdict>,
    ) {
        let pairs: Vec<(&AnnotationRow, &str)> = match &a.feedback {
            Feedback::Preference { .. } => {
                siblings.iter().filter_map(|b| sent_text(&b.feedback, interaction).map(|sent| (a, sent))).collect()
            }
            Feedback::Adoption { .. } => match sent_text(&a.feedback, interaction) {
                Some(sent) => siblings
                    .iter()
                    .filter(|b| matches!(b.feedback, Feedback::Preference { .. }))
                    .map(|b| (*b, sent))
                    .collect(),
                None => Vec::new(),
            },
            _ => Vec::new(),
        };
        for (preference, sent) in pairs {
            let Feedback::Preference { preferred, other, .. } = &preference.feedback else { continue };
            let (Some(preferred), Some(other)) = (interaction.candidate(preferred), interaction.candidate(other))
            else {
                continue;
            };
            let (to_preferred, to_other) =
                (text::similarity(sent, &preferred.text), text::similarity(sent, &other.text));
            let pass = to_other <= to_preferred + self.options.similarity_margin;
            let reason = if pass {
                format!("the sent text is closer to the preferred candidate ({to_preferred:.2} vs {to_other:.2})")
            } else {
                format!(
                    "the text sent to the customer is closer to the other candidate ({to_other:.2} vs {to_preferred:.2})"
                )
            };
            out.push(verdict(preference, "preference_vs_adoption", pass, to_preferred - to_other, reason));
        }
    }

    fn relevance_vs_missing(&self, a: &AnnotationRow, siblings: &[&AnnotationRow], out: &mut Vec<Verdict>) {
        let pairs: Vec<(&AnnotationRow, &str)> = match &a.feedback {
            Feedback::Missing { knowledge_id: Some(id), .. } => siblings
                .iter()
                .filter(|b| matches!(b.feedback, Feedback::Relevance { .. }))
                .map(|b| (*b, id.as_str()))
                .collect(),
            Feedback::Relevance { .. } => siblings
                .iter()
                .filter_map(|b| match &b.feedback {
                    Feedback::Missing { knowledge_id: Some(id), .. } => Some((a, id.as_str())),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        for (relevance, missing) in pairs {
            let Feedback::Relevance { judgements } = &relevance.feedback else { continue };
            let contradicted = judgements.iter().any(|(id, label)| id == missing && *label == Label::Irrelevant);
            let reason = if contradicted {
                format!("labelled {missing} irrelevant, yet reported it as the missing knowledge")
            } else {
                format!("consistent with the missing-knowledge report of {missing}")
            };
            out.push(verdict(relevance, "relevance_vs_missing", !contradicted, f64::from(!contradicted as u8), reason));
        }
    }

    /// Earlier labels of `id` on questions similar to (`case`, `query`):
    /// (relevant, irrelevant).
    fn tally(&self, id: &str, case: &str, query: &str) -> (usize, usize) {
        let Some(votes) = self.votes.get(id) else { return (0, 0) };
        votes
            .iter()
            .filter(|v| {
                (!case.is_empty() && v.case == case) || text::similarity(&v.query, query) >= self.options.similar_query
            })
            .fold((0, 0), |(r, i), v| if v.relevant { (r + 1, i) } else { (r, i + 1) })
    }

    /// The agent's labels against the majority of earlier labels (other
    /// agents' and the agent's own) of the same objects on similar questions.
    fn consistency(&self, a: &AnnotationRow, case: &str, query: &str, out: &mut Vec<Verdict>) {
        let Feedback::Relevance { judgements } = &a.feedback else { return };
        let (mut evidenced, mut disagreements) = (0usize, Vec::new());
        for (id, label) in judgements {
            if *label == Label::PartiallyRelevant {
                continue;
            }
            let (relevant, irrelevant) = self.tally(id, case, query);
            let votes = relevant + irrelevant;
            if votes < self.options.consistency_min_votes.max(1) {
                continue;
            }
            evidenced += 1;
            let against = if *label == Label::Relevant { irrelevant } else { relevant };
            if against as f64 / votes as f64 >= self.options.consistency_majority {
                disagreements.push(format!("{id} ({label:?}; {against} of {votes} earlier labels disagree)"));
            }
        }
        if evidenced == 0 {
            return;
        }
        let pass = disagreements.is_empty();
        let reason = if pass {
            format!("{evidenced} objects agree with the earlier labels on similar questions")
        } else {
            format!("against the majority on similar questions: {}", disagreements.join(", "))
        };
        out.push(verdict(a, "consistency", pass, disagreements.len() as f64 / evidenced as f64, reason));
    }

    /// A late missing-knowledge report: passes (it is informational and
    /// weighs less in weight mode) unless the object it names is, by the
    /// majority of earlier labels on similar questions, irrelevant.
    fn late_report(&self, a: &AnnotationRow, case: &str, query: &str, out: &mut Vec<Verdict>) {
        let Feedback::Missing { knowledge_id, .. } = &a.feedback else { return };
        let seconds = a.delay_seconds();
        if seconds <= self.options.late_report_seconds {
            return;
        }
        let hours = seconds / 3_600.0;
        let contradicted = knowledge_id.as_deref().and_then(|id| {
            let (relevant, irrelevant) = self.tally(id, case, query);
            let votes = relevant + irrelevant;
            (votes >= self.options.consistency_min_votes.max(1)
                && irrelevant as f64 / votes as f64 >= self.options.consistency_majority)
                .then(|| {
                    format!("{id}: {irrelevant} of {votes} earlier labels on similar questions call it irrelevant")
                })
        });
        let (pass, reason) = match contradicted {
            Some(why) => {
                (false, format!("reported {hours:.1} h late, naming an object others found irrelevant ({why})"))
            }
            None => (true, format!("reported {hours:.1} h after the interaction was shown")),
        };
        out.push(verdict(a, "late_report", pass, seconds, reason));
    }

    /// For an all-relevant check: the chance that all its objects are
    /// relevant given earlier labels of them on similar questions, when at
    /// least two objects have enough labels and it is below the threshold.
    fn improbable_all_relevant(
        &self,
        a: &AnnotationRow,
        features: &Features,
        case: &str,
        query: &str,
    ) -> Option<(f64, usize)> {
        features.relevance.as_ref().filter(|r| r.all_relevant && r.judged >= self.options.uniform_min_judgements)?;
        let Feedback::Relevance { judgements } = &a.feedback else { return None };
        let (mut chance, mut evidenced) = (1.0, 0usize);
        for (id, _) in judgements {
            let (relevant, irrelevant) = self.tally(id, case, query);
            if relevant + irrelevant >= self.options.consistency_min_votes.max(1) {
                evidenced += 1;
                chance *= (relevant as f64 + 1.0) / ((relevant + irrelevant) as f64 + 2.0);
            }
        }
        (evidenced >= 2 && chance < self.options.uniform_question_probability).then_some((chance, evidenced))
    }

    /// The agent's rate of a pattern (`count`) against the other agents'
    /// pooled rate, Laplace-smoothed: P(X ≥ hits | trials, rate). None
    /// without enough evidence on either side (then `fallback` stands in
    /// for the population's rate, when given).
    fn rate_test(
        &self,
        agent: usize,
        count: impl Fn(&AgentHistory) -> Count,
        fallback: Option<f64>,
    ) -> Option<RateTest> {
        let own = count(&self.agents[agent]);
        if own.trials < self.options.min_evidence.max(1) {
            return None;
        }
        let others = self
            .agents
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != agent)
            .map(|(_, h)| count(h))
            .fold(Count::default(), |s, c| Count { trials: s.trials + c.trials, hits: s.hits + c.hits });
        let expected = if others.trials >= self.options.min_evidence.max(1) {
            (others.hits as f64 + 1.0) / (others.trials as f64 + 2.0)
        } else {
            fallback?
        };
        Some(RateTest {
            hits: own.hits,
            trials: own.trials,
            expected,
            p_value: stats::binomial_upper_tail(own.hits, own.trials, expected),
        })
    }

    /// The verdicts of a pattern check: an annotation that fits the pattern
    /// fails when the agent's rate test is significant, together with the
    /// agent's earlier ones kept pending; otherwise it is kept pending.
    fn pattern_verdicts(
        &mut self,
        agent: usize,
        a: &AnnotationRow,
        check: &'static str,
        fits: bool,
        test: Option<RateTest>,
        pattern: &str,
        out: &mut Vec<Verdict>,
    ) {
        let Some(t) = test else {
            if fits {
                self.agents[agent].pending.entry(check).or_default().push(a.annotation_id.clone());
            }
            return;
        };
        let significant = t.p_value < self.options.significance;
        let rates = format!(
            "{} of the agent's {} ({:.2}) {pattern}, the other agents {:.2}: p = {:.2e}",
            t.hits,
            t.trials,
            t.hits as f64 / t.trials.max(1) as f64,
            t.expected,
            t.p_value
        );
        if significant && fits {
            for earlier in self.agents[agent].pending.remove(check).unwrap_or_default() {
                out.push(verdict_on(&earlier, check, false, t.p_value, format!("{rates} (seen later)")));
            }
            out.push(verdict(a, check, false, t.p_value, rates));
        } else {
            if fits {
                self.agents[agent].pending.entry(check).or_default().push(a.annotation_id.clone());
            }
            let reason = if fits { rates } else { format!("does not fit the pattern; {rates}") };
            out.push(verdict(a, check, true, t.p_value, reason));
        }
    }

    /// All objects of a check labelled relevant, from an agent who does so
    /// significantly more often than the others, or where earlier labels of
    /// the same objects make it improbable.
    fn uniform_labels(
        &mut self,
        agent: usize,
        a: &AnnotationRow,
        features: &Features,
        improbable: Option<(f64, usize)>,
        out: &mut Vec<Verdict>,
    ) {
        let Some(r) = features.relevance.as_ref().filter(|r| r.judged >= self.options.uniform_min_judgements) else {
            return;
        };
        if let Some((chance, evidenced)) = improbable {
            out.push(verdict(
                a,
                "uniform_labels",
                false,
                chance,
                format!(
                    "all {} objects labelled relevant; earlier labels of {evidenced} of them on similar questions \
                     give that a chance of {chance:.3}",
                    r.judged
                ),
            ));
            return;
        }
        let test = self.rate_test(agent, |h| h.uniform, None);
        if test.is_none() && r.all_relevant {
            out.push(verdict(
                a,
                "uniform_labels",
                true,
                1.0,
                format!("all {} objects labelled relevant; too few checks yet to compare the agent", r.judged),
            ));
        }
        self.pattern_verdicts(agent, a, "uniform_labels", r.all_relevant, test, "checks all relevant", out);
    }

    /// Relevant labels on the top positions beyond the population's
    /// position profile: checks whose top `position_top` are all relevant
    /// while a lower object is not, at a significantly higher rate.
    fn position_bias(&mut self, agent: usize, a: &AnnotationRow, features: &Features, out: &mut Vec<Verdict>) {
        let Some(r) = features.relevance.as_ref().filter(|r| r.judged > self.options.position_top) else { return };
        if self.options.position_top == 0 {
            return;
        }
        let test = self.rate_test(agent, |h| h.top_heavy, None);
        let pattern = format!("checks with the top {} relevant and a lower object not", self.options.position_top);
        self.pattern_verdicts(agent, a, "position_bias", r.top_heavy, test, &pattern, out);
    }

    /// The first candidate preferred or adopted beyond chance: against the
    /// other agents' rate, or ½ while they have too few decisions.
    fn first_candidate(&mut self, agent: usize, a: &AnnotationRow, features: &Features, out: &mut Vec<Verdict>) {
        let Some(first) = features.first else { return };
        let test = self.rate_test(agent, |h| h.first, Some(0.5));
        self.pattern_verdicts(agent, a, "first_candidate", first, test, "decisions for the first candidate", out);
    }

    /// The change of the agent's relevant share between its first and
    /// latest `drift_window` checks, less the other agents' change over the
    /// same periods, in units of what the population's spread of per-check
    /// shares explains for windows of that size: a two-sided z test.
    fn agent_drift(&self, agent: usize, a: &AnnotationRow, features: &Features, out: &mut Vec<Verdict>) {
        if features.relevance.is_none() {
            return;
        }
        let w = self.options.drift_window;
        let history = &self.agents[agent];
        if w == 0 || history.shares.len() < 2 * w {
            return;
        }
        let (own_n, own_sum, own_squares) = (history.shares.len(), history.share_sums.0, history.share_sums.1);
        let others_n = self.shares.len() - own_n;
        if others_n < 2 * w.max(self.options.min_evidence) {
            return;
        }
        let total: (f64, f64) =
            self.agents.iter().fold((0.0, 0.0), |s, h| (s.0 + h.share_sums.0, s.1 + h.share_sums.1));
        let mean = (total.0 - own_sum) / others_n as f64;
        let sd = ((total.1 - own_squares) / others_n as f64 - mean * mean).max(0.0).sqrt();
        let mean_of = |s: &[(usize, f64)]| s.iter().map(|(_, v)| v).sum::<f64>() / s.len() as f64;
        let (early, recent) = (&history.shares[..w], &history.shares[history.shares.len() - w..]);
        let (own_early, own_recent) = (mean_of(early), mean_of(recent));
        // The other agents' shares while the agent made each window.
        let others_during = |window: &[(usize, f64)]| -> Option<f64> {
            let (from, to) = (window[0].0, window[window.len() - 1].0);
            let values = self.shares[from..=to].iter().filter(|(who, _)| *who != agent).map(|(_, v)| *v);
            let (m, _, n) = stats::mean_sd(values);
            (n > 0).then_some(m)
        };
        let expected = match (others_during(early), others_during(recent)) {
            (Some(before), Some(after)) => after - before,
            _ => 0.0,
        };
        let change = own_recent - own_early;
        let z = (change - expected) / (sd.max(self.options.drift_min_sd) * (2.0 / w as f64).sqrt());
        let p_value = 2.0 * stats::normal_upper_tail(z.abs());
        let pass = p_value >= self.options.significance;
        let reason = format!(
            "relevant share {own_early:.2} in the agent's first {w} checks, {own_recent:.2} in the latest; the \
             other agents moved {expected:+.2} (spread {sd:.2}): z = {z:.1}, p = {p_value:.2e}"
        );
        out.push(verdict(a, "agent_drift", pass, z, reason));
    }

    /// Default selections (all relevant, the first candidate) rising over
    /// the agent's latest `fatigue_window` annotations: a one-sided
    /// Cochran–Armitage trend test. Fails the default selections of the
    /// window's later half.
    fn fatigue(&mut self, agent: usize, a: &AnnotationRow, features: &Features, out: &mut Vec<Verdict>) {
        let Some(default) = features.default else { return };
        let window = self.options.fatigue_window;
        let history = &mut self.agents[agent];
        if window < 4 || history.defaults.len() < window {
            return;
        }
        let outcomes: Vec<bool> = history.defaults.iter().map(|(_, d)| *d).collect();
        let z = stats::trend_z(&outcomes);
        let p_value = stats::normal_upper_tail(z);
        let significant = p_value < self.options.significance;
        let (early, late) = outcomes.split_at(window / 2);
        let share = |s: &[bool]| s.iter().filter(|&&d| d).count() as f64 / s.len().max(1) as f64;
        let reason = format!(
            "default selections {:.2} in the earlier half of the agent's latest {window} annotations, {:.2} in \
             the later: trend z = {z:.1}, p = {p_value:.2e}",
            share(early),
            share(late)
        );
        if significant {
            let later: Vec<String> = history
                .defaults
                .iter()
                .skip(window / 2)
                .filter(|(id, d)| *d && *id != a.annotation_id && !history.fatigue_failed.contains(id))
                .map(|(id, _)| id.clone())
                .collect();
            for id in later {
                out.push(verdict_on(&id, "fatigue", false, z, format!("{reason} (seen later)")));
                history.fatigue_failed.insert(id);
            }
        }
        let pass = !(significant && default);
        if !pass {
            history.fatigue_failed.insert(a.annotation_id.clone());
        }
        out.push(verdict(a, "fatigue", pass, z, reason));
    }
}

#[cfg(test)]
mod tests;
