//! The worker's view of the log: interactions and annotations flattened to
//! what judging and training need, and the judge's verdicts. Rows are JSON
//! lines in the worker's journal (see `journal.rs`), so people and scripts
//! can read them without protobuf.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::proto::{
    AdoptionDecision, AnnotationRecord, ConversationTurn, InteractionKind, InteractionRecord, RelevanceLabel, Speaker,
    annotation, interaction_record, missing_knowledge,
};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

fn millis(t: Option<&prost_types::Timestamp>) -> Millis {
    t.map_or(0, |t| t.seconds * 1_000 + i64::from(t.nanos) / 1_000_000)
}

pub fn now_millis() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Retrieve,
    Rank,
    Generate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// "customer" or "agent".
    pub speaker: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShownRow {
    pub knowledge_id: String,
    pub version: u64,
    pub rank: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateRow {
    pub candidate_id: String,
    pub text: String,
    pub cited: Vec<String>,
    pub model_version: String,
}

/// What one Retrieve/Rank/Generate call asked and showed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InteractionRow {
    pub sequence: u64,
    pub interaction_id: String,
    pub kind: Kind,
    pub created_ms: Millis,
    pub agent_id: String,
    pub case_id: String,
    /// The customer's question (Generate: the last customer turn).
    pub query: String,
    /// Earlier turns, oldest first (Generate: the whole conversation before the question).
    pub context: Vec<Turn>,
    pub shown: Vec<ShownRow>,
    pub candidates: Vec<CandidateRow>,
    /// Generate's system prompt when the request replaced the default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system_prompt: String,
    /// Model role → version that served the call.
    pub models: BTreeMap<String, String>,
    /// The tenant it was shown to (rows from before tenants: the default).
    #[serde(default = "crate::tenancy::default_tenant")]
    pub tenant: String,
}

impl InteractionRow {
    pub fn from_record(sequence: u64, record: &InteractionRecord) -> Self {
        let turn = |t: &ConversationTurn| Turn {
            speaker: if t.speaker == Speaker::Agent as i32 { "agent" } else { "customer" }.into(),
            text: t.text.clone(),
        };
        let kind = match InteractionKind::try_from(record.kind) {
            Ok(InteractionKind::Rank) => Kind::Rank,
            Ok(InteractionKind::Generate) => Kind::Generate,
            _ => Kind::Retrieve,
        };
        let (query, context, system_prompt) = match &record.request {
            Some(interaction_record::Request::Retrieve(r)) => {
                (r.query.clone(), r.context.iter().map(turn).collect(), "")
            }
            Some(interaction_record::Request::Rank(r)) => (r.query.clone(), r.context.iter().map(turn).collect(), ""),
            Some(interaction_record::Request::Generate(g)) => {
                let last_customer = g.conversation.iter().rposition(|t| t.speaker != Speaker::Agent as i32);
                let query = last_customer.map(|i| g.conversation[i].text.clone()).unwrap_or_default();
                let before = last_customer.map_or(&g.conversation[..], |i| &g.conversation[..i]);
                (query, before.iter().map(turn).collect(), g.system_prompt.as_str())
            }
            None => (String::new(), Vec::new(), ""),
        };
        let mut models = BTreeMap::new();
        if let Some(m) = &record.models {
            for (role, version) in [("embedder", &m.embedder), ("ranker", &m.ranker), ("generator", &m.generator)] {
                if !version.is_empty() {
                    models.insert(role.to_string(), version.clone());
                }
            }
        }
        let context_of = record.request_context.clone().unwrap_or_default();
        InteractionRow {
            sequence,
            interaction_id: record.interaction_id.clone(),
            kind,
            created_ms: millis(record.created_at.as_ref()),
            agent_id: crate::tenancy::scoped(&record.tenant, &context_of.agent_id),
            case_id: crate::tenancy::scoped(&record.tenant, &context_of.case_id),
            query,
            context,
            shown: record
                .shown_knowledge
                .iter()
                .map(|s| ShownRow { knowledge_id: s.knowledge_id.clone(), version: s.version, rank: s.rank })
                .collect(),
            candidates: record
                .candidates
                .iter()
                .map(|c| CandidateRow {
                    candidate_id: c.candidate_id.clone(),
                    text: c.text.clone(),
                    cited: c.cited_knowledge_ids.clone(),
                    model_version: c.model_version.clone(),
                })
                .collect(),
            system_prompt: system_prompt.to_string(),
            models,
            tenant: crate::tenancy::of_record(&record.tenant).to_string(),
        }
    }

    pub fn candidate(&self, id: &str) -> Option<&CandidateRow> {
        self.candidates.iter().find(|c| c.candidate_id == id)
    }

    pub fn shown_version(&self, knowledge_id: &str) -> Option<u64> {
        self.shown.iter().find(|s| s.knowledge_id == knowledge_id).map(|s| s.version)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    AdoptedAsIs,
    Edited,
    Rejected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    Relevant,
    PartiallyRelevant,
    Irrelevant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Feedback {
    Preference { preferred: String, other: String, strength: u32, rationale: String },
    Adoption { candidate_id: String, decision: Decision, sent_text: String, rationale: String },
    Relevance { judgements: Vec<(String, Label)> },
    Missing { knowledge_id: Option<String>, title: String, uri: String, excerpt: String, note: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnotationRow {
    pub sequence: u64,
    /// This and the agent and case ids are [`crate::tenancy::scoped`]: the
    /// journal pools every tenant's rows.
    pub annotation_id: String,
    pub interaction_id: String,
    pub agent_id: String,
    pub case_id: String,
    pub shown_ms: Millis,
    pub annotated_ms: Millis,
    pub feedback: Feedback,
    #[serde(default = "crate::tenancy::default_tenant")]
    pub tenant: String,
}

impl AnnotationRow {
    /// None for an annotation without a kind (the server refuses those).
    pub fn from_record(sequence: u64, record: &AnnotationRecord) -> Option<Self> {
        let a = record.annotation.as_ref()?;
        let feedback = match a.kind.as_ref()? {
            annotation::Kind::Preference(p) => Feedback::Preference {
                preferred: p.preferred_candidate_id.clone(),
                other: p.other_candidate_id.clone(),
                strength: p.strength as u32,
                rationale: p.rationale.clone(),
            },
            annotation::Kind::Adoption(d) => Feedback::Adoption {
                candidate_id: d.candidate_id.clone(),
                decision: match AdoptionDecision::try_from(d.decision) {
                    Ok(AdoptionDecision::Edited) => Decision::Edited,
                    Ok(AdoptionDecision::Rejected) => Decision::Rejected,
                    _ => Decision::AdoptedAsIs,
                },
                sent_text: d.sent_text.clone(),
                rationale: d.rationale.clone(),
            },
            annotation::Kind::Relevance(r) => Feedback::Relevance {
                judgements: r
                    .judgements
                    .iter()
                    .map(|j| {
                        let label = match RelevanceLabel::try_from(j.label) {
                            Ok(RelevanceLabel::Relevant) => Label::Relevant,
                            Ok(RelevanceLabel::PartiallyRelevant) => Label::PartiallyRelevant,
                            _ => Label::Irrelevant,
                        };
                        (j.knowledge_id.clone(), label)
                    })
                    .collect(),
            },
            annotation::Kind::MissingKnowledge(m) => {
                let (knowledge_id, external) = match &m.source {
                    Some(missing_knowledge::Source::KnowledgeId(id)) => (Some(id.clone()), None),
                    Some(missing_knowledge::Source::External(e)) => (None, Some(e.clone())),
                    None => (None, None),
                };
                let external = external.unwrap_or_default();
                Feedback::Missing {
                    knowledge_id,
                    title: external.title,
                    uri: external.uri,
                    excerpt: external.excerpt,
                    note: m.note.clone(),
                }
            }
        };
        Some(AnnotationRow {
            sequence,
            annotation_id: crate::tenancy::scoped(&record.tenant, &a.annotation_id),
            interaction_id: a.interaction_id.clone(),
            agent_id: crate::tenancy::scoped(&record.tenant, &a.agent_id),
            case_id: crate::tenancy::scoped(&record.tenant, &a.case_id),
            shown_ms: millis(a.shown_at.as_ref()),
            annotated_ms: millis(a.annotated_at.as_ref()),
            feedback,
            tenant: crate::tenancy::of_record(&record.tenant).to_string(),
        })
    }

    /// Seconds between seeing the interaction's output and annotating it.
    pub fn delay_seconds(&self) -> f64 {
        (self.annotated_ms - self.shown_ms) as f64 / 1_000.0
    }
}

/// One check's finding on one annotation, stored beside the human label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub annotation_id: String,
    /// Which check: `preference_vs_adoption`, `relevance_vs_missing`,
    /// `rationale`, `too_fast`, `uniform_labels`, `agent_drift`, `llm_*`.
    pub check: String,
    pub pass: bool,
    /// The measured quantity the check compared (similarity, seconds, share).
    pub score: f64,
    pub reason: String,
}

/// A line of the worker's journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Row {
    Interaction(InteractionRow),
    Annotation(AnnotationRow),
    Verdict(Verdict),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Annotation, KnowledgeRelevance, RequestContext};

    fn annotation_record(tenant: &str) -> AnnotationRecord {
        AnnotationRecord {
            annotation: Some(Annotation {
                annotation_id: "a1".into(),
                interaction_id: "ix-1".into(),
                agent_id: "alice".into(),
                kind: Some(annotation::Kind::Relevance(KnowledgeRelevance::default())),
                ..Default::default()
            }),
            tenant: tenant.into(),
            ..Default::default()
        }
    }

    #[test]
    fn rows_keep_tenants_apart_and_rows_from_before_tenants_read_as_the_default() {
        let acme = AnnotationRow::from_record(1, &annotation_record("acme")).unwrap();
        let old = AnnotationRow::from_record(2, &annotation_record("")).unwrap();
        assert_eq!(
            (acme.annotation_id.as_str(), acme.agent_id.as_str(), acme.tenant.as_str()),
            ("acme/a1", "acme/alice", "acme")
        );
        assert_eq!(
            (old.annotation_id.as_str(), old.agent_id.as_str(), old.tenant.as_str()),
            ("a1", "alice", "default")
        );
        let record = InteractionRecord {
            tenant: "acme".into(),
            request_context: Some(RequestContext { agent_id: "alice".into(), ..Default::default() }),
            ..Default::default()
        };
        let interaction = InteractionRow::from_record(3, &record);
        assert_eq!((interaction.agent_id.as_str(), interaction.case_id.as_str()), ("acme/alice", ""));

        // A journal line written before tenants has no tenant field.
        for row in [Row::Annotation(acme), Row::Interaction(interaction)] {
            let mut json = serde_json::to_value(&row).unwrap();
            let fields = json.as_object_mut().unwrap().values_mut().next().unwrap().as_object_mut().unwrap();
            assert_eq!(fields.remove("tenant").unwrap(), "acme");
            match serde_json::from_value::<Row>(json).unwrap() {
                Row::Annotation(a) => assert_eq!(a.tenant, "default"),
                Row::Interaction(i) => assert_eq!(i.tenant, "default"),
                Row::Verdict(_) => unreachable!(),
            }
        }
    }
}
