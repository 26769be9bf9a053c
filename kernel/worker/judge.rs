//! The Virtual Judge's consistency checks: the noise gate between agents'
//! labels and training. Each check looks at one annotation with what the
//! journal knows (the interaction it refers to, the agent's other
//! annotations on it, the agent's history) and returns verdicts that are
//! stored beside the label, never replacing it. A check that needs two
//! annotations (a preference and the adoption of the same interaction)
//! runs when the second arrives and puts its verdict on the one it doubts.
//!
//! Missing-knowledge reports are never failed here: they feed the
//! knowledge-gap queue for people.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{
    journal::Journal,
    rows::{AnnotationRow, Decision, Feedback, InteractionRow, Label, Verdict},
    text,
};

/// Thresholds of the checks; the defaults are documented in the README.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeOptions {
    /// Off for ablations: no verdicts, every label trains.
    pub enabled: bool,
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
    /// A relevance check of at least this many objects all labelled relevant.
    pub uniform_min_judgements: usize,
    /// The language-model judge: "off", "default" (the embedded generator) or
    /// the path of a GGUF file or Hugging Face folder. Off by default: on a
    /// CPU each check is a prefill of a few hundred tokens.
    pub llm: String,
    /// How sure the language model must be before it fails a label.
    pub llm_confidence: f64,
    /// Judgements per window when comparing an agent's early and recent labels.
    pub drift_window: usize,
    /// A change of the share of "relevant" labels beyond this between the
    /// agent's first and latest windows is drift.
    pub drift_threshold: f64,
}

impl Default for JudgeOptions {
    fn default() -> Self {
        JudgeOptions {
            enabled: true,
            min_seconds_per_decision: 3.0,
            min_seconds_per_judgement: 0.5,
            similarity_margin: 0.05,
            min_rationale_words: 3,
            repeated_rationale: 3,
            uniform_min_judgements: 5,
            llm: "off".into(),
            llm_confidence: 0.8,
            drift_window: 40,
            drift_threshold: 0.3,
        }
    }
}

/// Rationales that say nothing, whoever writes them.
const BOILERPLATE: &[&str] =
    &["ok", "okay", "fine", "good", "better", "bad", "n a", "na", "none", "no reason", "same", "idk", "-"];

#[derive(Default)]
struct AgentHistory {
    rationales: HashMap<String, usize>,
    /// Each relevance judgement: relevant or not, in order.
    relevant: Vec<bool>,
}

pub struct Judge {
    options: JudgeOptions,
    agents: HashMap<String, AgentHistory>,
}

fn verdict(a: &AnnotationRow, check: &str, pass: bool, score: f64, reason: String) -> Verdict {
    Verdict { annotation_id: a.annotation_id.clone(), check: check.into(), pass, score, reason }
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

impl Judge {
    pub fn new(options: JudgeOptions) -> Self {
        Judge { options, agents: HashMap::new() }
    }

    /// Rebuilds the agents' histories from journaled annotations (at start).
    pub fn replay(&mut self, annotations: &[AnnotationRow]) {
        annotations.iter().for_each(|a| self.observe(a));
    }

    fn observe(&mut self, a: &AnnotationRow) {
        let history = self.agents.entry(a.agent_id.clone()).or_default();
        match &a.feedback {
            Feedback::Preference { rationale, .. } | Feedback::Adoption { rationale, .. } => {
                let key = text::words(rationale).collect::<Vec<_>>().join(" ");
                if !key.is_empty() {
                    *history.rationales.entry(key).or_insert(0) += 1;
                }
            }
            Feedback::Relevance { judgements } => {
                history.relevant.extend(judgements.iter().map(|(_, l)| *l == Label::Relevant));
            }
            Feedback::Missing { .. } => {}
        }
    }

    /// Verdicts on `a` (and on earlier annotations it contradicts), given
    /// the journal as it was before `a`.
    pub fn judge(&mut self, a: &AnnotationRow, journal: &Journal) -> Vec<Verdict> {
        if !self.options.enabled {
            return Vec::new();
        }
        let mut out = Vec::new();
        let Some(interaction) = journal.interactions.get(&a.interaction_id) else {
            out.push(verdict(a, "joined", false, 0.0, "the interaction is not in the log".into()));
            return out;
        };
        self.rationale(a, &mut out);
        self.too_fast(a, &mut out);
        // Earlier annotations of the same agent on the same interaction.
        let siblings: Vec<&AnnotationRow> =
            journal.annotations_on(&a.interaction_id).filter(|b| b.agent_id == a.agent_id).collect();
        self.preference_vs_adoption(a, &siblings, interaction, &mut out);
        self.relevance_vs_missing(a, &siblings, &mut out);
        self.uniform_labels(a, &mut out);
        self.observe(a);
        self.agent_drift(a, &mut out);
        out
    }

    fn rationale(&self, a: &AnnotationRow, out: &mut Vec<Verdict>) {
        let rationale = match &a.feedback {
            Feedback::Preference { rationale, .. } => rationale,
            // An unchanged adoption needs no explanation.
            Feedback::Adoption { rationale, decision, .. } if *decision != Decision::AdoptedAsIs => rationale,
            _ => return,
        };
        let words: Vec<String> = text::words(rationale).collect();
        let key = words.join(" ");
        let repeats = self.agents.get(&a.agent_id).and_then(|h| h.rationales.get(&key)).copied().unwrap_or(0);
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

    fn uniform_labels(&self, a: &AnnotationRow, out: &mut Vec<Verdict>) {
        let Feedback::Relevance { judgements } = &a.feedback else { return };
        if judgements.len() < self.options.uniform_min_judgements {
            return;
        }
        let all_relevant = judgements.iter().all(|(_, l)| *l == Label::Relevant);
        let reason = if all_relevant {
            format!("all {} shown objects labelled relevant", judgements.len())
        } else {
            "mixed labels".into()
        };
        out.push(verdict(a, "uniform_labels", !all_relevant, judgements.len() as f64, reason));
    }

    fn agent_drift(&self, a: &AnnotationRow, out: &mut Vec<Verdict>) {
        if !matches!(a.feedback, Feedback::Relevance { .. }) {
            return;
        }
        let Some(history) = self.agents.get(&a.agent_id) else { return };
        let w = self.options.drift_window;
        if w == 0 || history.relevant.len() < 2 * w {
            return;
        }
        let share = |s: &[bool]| s.iter().filter(|&&r| r).count() as f64 / s.len() as f64;
        let (early, recent) = (share(&history.relevant[..w]), share(&history.relevant[history.relevant.len() - w..]));
        let pass = (recent - early).abs() <= self.options.drift_threshold;
        let reason = format!(
            "share of relevant labels {early:.2} in the agent's first {w} judgements, {recent:.2} in the latest"
        );
        out.push(verdict(a, "agent_drift", pass, recent - early, reason));
    }
}
