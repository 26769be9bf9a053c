//! Annotation intake: validate an agent's feedback against the interaction it
//! is about, make it idempotent by `annotation_id`, and answer only once it is
//! durable in the training log.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use dashmap::{DashMap, mapref::entry::Entry};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::interactions::{InteractionBook, Shown};
use crate::{
    api::convert::{
        self, MAX_EXCERPT_BYTES, MAX_ID_BYTES, MAX_RATIONALE_BYTES, MAX_SENT_TEXT_BYTES, MAX_SHORT_ID_BYTES,
        MAX_TITLE_BYTES, MAX_URI_BYTES,
    },
    error::{Error, Result},
    kb::{KbError, KnowledgeStore},
    privacy::Redactor,
    proto::{
        AdoptionDecision, Annotation, AnnotationRecord, PreferenceStrength, RelevanceLabel, annotation::Kind,
        log_record::Body, missing_knowledge::Source,
    },
};

/// What SubmitAnnotation answers.
#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    pub sequence: u64,
    pub duplicate: bool,
    pub delay: Duration,
}

enum Slot {
    Durable {
        sha256: [u8; 32],
        sequence: u64,
    },
    /// Being written; a concurrent call with the same id waits for the outcome.
    Pending {
        done: watch::Receiver<bool>,
    },
}

pub struct AnnotationIntake {
    interactions: Arc<InteractionBook>,
    kb: Arc<KnowledgeStore>,
    log: crate::trainlog::TrainingLog,
    /// By [`slot_key`]: annotation ids are scoped per tenant.
    slots: Arc<DashMap<String, Slot>>,
    max_clock_skew: Duration,
    redactor: Arc<Redactor>,
}

impl AnnotationIntake {
    pub fn new(
        log: crate::trainlog::TrainingLog,
        interactions: Arc<InteractionBook>,
        kb: Arc<KnowledgeStore>,
        max_clock_skew: Duration,
        redactor: Arc<Redactor>,
    ) -> Self {
        AnnotationIntake { interactions, kb, log, slots: Arc::default(), max_clock_skew, redactor }
    }

    pub(crate) fn index(&self, record: &AnnotationRecord, sequence: u64) {
        let Some(annotation) = &record.annotation else { return };
        let Ok(sha256) = record.content_sha256.as_slice().try_into() else {
            return;
        };
        // The first record of an id wins, as it did when it was acknowledged.
        let key = slot_key(crate::tenancy::of_record(&record.tenant), &annotation.annotation_id);
        self.slots.entry(key).or_insert(Slot::Durable { sha256, sequence });
    }

    /// Accepts the tenant's annotation once it is durable; an id already
    /// acknowledged answers as a duplicate (same content) or ALREADY_EXISTS.
    pub async fn submit(&self, tenant: &str, submitted: Annotation) -> Result<Accepted> {
        // What is written and hashed is the redacted annotation (redaction is
        // deterministic, so a retry hashes the same); limits apply to what
        // the client sent.
        let mut annotation = submitted.clone();
        let redactions = self.redactor.annotation(&mut annotation);
        let sha256: [u8; 32] = Sha256::digest(annotation.encode_to_vec()).into();
        // A retry of an acknowledged annotation is answered before validation,
        // so it stays OK even if what it refers to changed since.
        let key = slot_key(tenant, &annotation.annotation_id);
        let delay = match self.durable_sequence(&key, &sha256) {
            Some(sequence) => {
                return Ok(Accepted { sequence, duplicate: true, delay: delay_of(&annotation)? });
            }
            None => self.validate(tenant, &submitted)?,
        };
        loop {
            let done_tx = match self.slots.entry(key.clone()) {
                Entry::Occupied(slot) => match slot.get() {
                    Slot::Durable { sha256: seen, sequence } if *seen == sha256 => {
                        return Ok(Accepted { sequence: *sequence, duplicate: true, delay });
                    }
                    Slot::Durable { .. } => {
                        return Err(Error::AlreadyExists(format!(
                            "annotation_id {:?} was already submitted with different content; \
                             use a new annotation_id for a new annotation",
                            annotation.annotation_id
                        )));
                    }
                    Slot::Pending { done } => {
                        // A concurrent call is writing this id: wait for its
                        // outcome (it may fail), then look again.
                        let mut done = done.clone();
                        drop(slot);
                        let _ = done.wait_for(|finished| *finished).await;
                        continue;
                    }
                },
                Entry::Vacant(slot) => {
                    let (tx, rx) = watch::channel(false);
                    slot.insert(Slot::Pending { done: rx });
                    tx
                }
            };
            let record = AnnotationRecord {
                annotation: Some(annotation.clone()),
                received_at: Some(SystemTime::now().into()),
                delay: prost_types::Duration::try_from(delay).ok(),
                content_sha256: sha256.to_vec(),
                redactions: redactions.clone(),
                tenant: tenant.to_string(),
            };
            // Spawned so that a client that gives up mid-write cannot leave
            // the slot pending: the append and its bookkeeping always finish.
            let (log, slots, id) = (self.log.clone(), self.slots.clone(), key.clone());
            let write = tokio::spawn(async move {
                let result = log.append(&Body::Annotation(record)).await;
                match &result {
                    Ok(sequence) => slots.insert(id, Slot::Durable { sha256, sequence: *sequence }),
                    Err(_) => slots.remove(&id).map(|(_, slot)| slot),
                };
                let _ = done_tx.send(true);
                result
            });
            let sequence = write.await.map_err(|e| Error::Internal(format!("annotation write task: {e}")))??;
            return Ok(Accepted { sequence, duplicate: false, delay });
        }
    }

    fn durable_sequence(&self, key: &str, sha256: &[u8; 32]) -> Option<u64> {
        match self.slots.get(key).as_deref() {
            Some(Slot::Durable { sha256: seen, sequence }) if seen == sha256 => Some(*sequence),
            _ => None,
        }
    }

    /// Checks everything a client can get wrong; returns the annotation delay.
    fn validate(&self, tenant: &str, a: &Annotation) -> Result<Duration> {
        convert::check_id("annotation.annotation_id", &a.annotation_id, MAX_SHORT_ID_BYTES)?;
        convert::check_id("annotation.interaction_id", &a.interaction_id, MAX_SHORT_ID_BYTES)?;
        convert::check_id("annotation.agent_id", &a.agent_id, MAX_SHORT_ID_BYTES)?;
        convert::check_optional_id("annotation.case_id", &a.case_id, MAX_SHORT_ID_BYTES)?;
        convert::check_optional_id("annotation.tenant", &a.tenant, MAX_SHORT_ID_BYTES)?;
        let delay = delay_of(a)?;
        let shown_at = convert::timestamp("annotation.shown_at", a.shown_at.as_ref())?;
        let annotated_at = convert::timestamp("annotation.annotated_at", a.annotated_at.as_ref())?;
        let horizon = SystemTime::now() + self.max_clock_skew;
        for (field, at) in [("annotation.shown_at", shown_at), ("annotation.annotated_at", annotated_at)] {
            if at > horizon {
                return Err(Error::invalid(
                    field,
                    format!(
                        "is more than {} s ahead of the server's clock; check the client's clock",
                        self.max_clock_skew.as_secs()
                    ),
                ));
            }
        }
        let kind = a.kind.as_ref().ok_or_else(|| {
            Error::invalid("annotation.kind", "set one of preference, adoption, relevance, missing_knowledge")
        })?;
        check_kind_fields(kind)?;
        let shown = self.interactions.get(tenant, &a.interaction_id).ok_or_else(|| {
            Error::NotFound(format!(
                "annotation.interaction_id: interaction {:?} is unknown to this server; use the interaction_id of a Retrieve, Rank or Generate response",
                a.interaction_id
            ))
        })?;
        if let Some(created_at) = shown.created_at
            && shown_at + self.max_clock_skew < created_at
        {
            return Err(Error::invalid(
                "annotation.shown_at",
                format!(
                    "is {} s before interaction {:?} was answered; set it to when the agent saw the response \
                     (the server allows annotations.max_clock_skew_s of clock difference)",
                    created_at.duration_since(shown_at).unwrap_or_default().as_secs(),
                    a.interaction_id
                ),
            ));
        }
        self.check_against_interaction(tenant, kind, &a.interaction_id, &shown)?;
        Ok(delay)
    }

    fn check_against_interaction(&self, tenant: &str, kind: &Kind, interaction_id: &str, shown: &Shown) -> Result<()> {
        let candidate = |field: &str, id: &str| -> Result<()> {
            if shown.shows_candidate(id) {
                return Ok(());
            }
            Err(Error::invalid(
                field,
                format!(
                    "candidate {id:?} was not shown in interaction {interaction_id:?} (it showed {})",
                    list_or_none(shown.candidate_ids.iter().map(String::as_str))
                ),
            ))
        };
        match kind {
            Kind::Preference(p) => {
                candidate("annotation.preference.preferred_candidate_id", &p.preferred_candidate_id)?;
                candidate("annotation.preference.other_candidate_id", &p.other_candidate_id)
            }
            Kind::Adoption(a) => candidate("annotation.adoption.candidate_id", &a.candidate_id),
            Kind::Relevance(r) => {
                for (i, j) in r.judgements.iter().enumerate() {
                    if !shown.shows_knowledge(&j.knowledge_id) {
                        return Err(Error::invalid(
                            &format!("annotation.relevance.judgements[{i}].knowledge_id"),
                            format!(
                                "knowledge object {:?} was not shown in interaction {interaction_id:?} (it showed {} objects)",
                                j.knowledge_id,
                                shown.knowledge.len()
                            ),
                        ));
                    }
                }
                Ok(())
            }
            Kind::MissingKnowledge(m) => match &m.source {
                Some(Source::KnowledgeId(id)) => match self.kb.get(tenant, id, 0, false) {
                    Ok(_) => Ok(()),
                    Err(KbError::NotFound(_) | KbError::Deleted { .. }) => Err(Error::NotFound(format!(
                        "annotation.missing_knowledge.knowledge_id: {id:?} is not in the knowledge base; \
                         report a source outside it as missing_knowledge.external"
                    ))),
                    Err(e) => Err(e.into()),
                },
                _ => Ok(()),
            },
        }
    }
}

/// Where an annotation id lives: ids are the tenant's own, so two tenants
/// may use the same one.
fn slot_key(tenant: &str, annotation_id: &str) -> String {
    format!("{tenant}\u{0}{annotation_id}")
}

/// annotated_at - shown_at; both required, in that order.
fn delay_of(a: &Annotation) -> Result<Duration> {
    let shown_at = convert::timestamp("annotation.shown_at", a.shown_at.as_ref())?;
    let annotated_at = convert::timestamp("annotation.annotated_at", a.annotated_at.as_ref())?;
    annotated_at.duration_since(shown_at).map_err(|_| {
        Error::invalid(
            "annotation.annotated_at",
            "is before annotation.shown_at; an annotation follows what it is about",
        )
    })
}

fn list_or_none<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let items: Vec<_> = items.map(|i| format!("{i:?}")).collect();
    if items.is_empty() { "no candidates".into() } else { items.join(", ") }
}

/// Field checks that need no server state.
fn check_kind_fields(kind: &Kind) -> Result<()> {
    match kind {
        Kind::Preference(p) => {
            convert::check_id(
                "annotation.preference.preferred_candidate_id",
                &p.preferred_candidate_id,
                MAX_SHORT_ID_BYTES,
            )?;
            convert::check_id("annotation.preference.other_candidate_id", &p.other_candidate_id, MAX_SHORT_ID_BYTES)?;
            if p.preferred_candidate_id == p.other_candidate_id {
                return Err(Error::invalid(
                    "annotation.preference.other_candidate_id",
                    "must differ from preferred_candidate_id",
                ));
            }
            if matches!(PreferenceStrength::try_from(p.strength), Ok(PreferenceStrength::Unspecified) | Err(_)) {
                return Err(Error::invalid(
                    "annotation.preference.strength",
                    "use SLIGHTLY_BETTER, BETTER or SIGNIFICANTLY_BETTER",
                ));
            }
            convert::check_len("annotation.preference.rationale", &p.rationale, MAX_RATIONALE_BYTES)
        }
        Kind::Adoption(a) => {
            convert::check_id("annotation.adoption.candidate_id", &a.candidate_id, MAX_SHORT_ID_BYTES)?;
            match AdoptionDecision::try_from(a.decision) {
                Ok(AdoptionDecision::Edited) => {
                    convert::check_text("annotation.adoption.sent_text", &a.sent_text, MAX_SENT_TEXT_BYTES)?
                }
                Ok(AdoptionDecision::AdoptedAsIs | AdoptionDecision::Rejected) => {
                    if !a.sent_text.is_empty() {
                        return Err(Error::invalid(
                            "annotation.adoption.sent_text",
                            "is only accepted with decision EDITED",
                        ));
                    }
                }
                _ => {
                    return Err(Error::invalid(
                        "annotation.adoption.decision",
                        "use ADOPTED_AS_IS, EDITED or REJECTED",
                    ));
                }
            }
            convert::check_len("annotation.adoption.rationale", &a.rationale, MAX_RATIONALE_BYTES)
        }
        Kind::Relevance(r) => {
            if r.judgements.is_empty() || r.judgements.len() > convert::MAX_ITEMS {
                return Err(Error::invalid(
                    "annotation.relevance.judgements",
                    format!("has {} judgements; send 1 to {}", r.judgements.len(), convert::MAX_ITEMS),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for (i, j) in r.judgements.iter().enumerate() {
                let field = format!("annotation.relevance.judgements[{i}]");
                convert::check_id(&format!("{field}.knowledge_id"), &j.knowledge_id, MAX_ID_BYTES)?;
                if !seen.insert(j.knowledge_id.as_str()) {
                    return Err(Error::invalid(
                        &format!("{field}.knowledge_id"),
                        format!("{:?} is judged twice", j.knowledge_id),
                    ));
                }
                if matches!(RelevanceLabel::try_from(j.label), Ok(RelevanceLabel::Unspecified) | Err(_)) {
                    return Err(Error::invalid(
                        &format!("{field}.label"),
                        "use RELEVANT, PARTIALLY_RELEVANT or IRRELEVANT",
                    ));
                }
            }
            Ok(())
        }
        Kind::MissingKnowledge(m) => {
            match &m.source {
                None => {
                    return Err(Error::invalid("annotation.missing_knowledge.source", "set knowledge_id or external"));
                }
                Some(Source::KnowledgeId(id)) => {
                    convert::check_id("annotation.missing_knowledge.knowledge_id", id, MAX_ID_BYTES)?
                }
                Some(Source::External(e)) => {
                    if e.title.trim().is_empty() && e.uri.trim().is_empty() {
                        return Err(Error::invalid("annotation.missing_knowledge.external", "needs a title or a uri"));
                    }
                    convert::check_len("annotation.missing_knowledge.external.title", &e.title, MAX_TITLE_BYTES)?;
                    convert::check_len("annotation.missing_knowledge.external.uri", &e.uri, MAX_URI_BYTES)?;
                    convert::check_len("annotation.missing_knowledge.external.excerpt", &e.excerpt, MAX_EXCERPT_BYTES)?;
                }
            }
            convert::check_len("annotation.missing_knowledge.note", &m.note, MAX_RATIONALE_BYTES)
        }
    }
}
