//! Interactions: what a model call showed, recorded durably before the
//! response leaves, so any annotation the agent makes can be checked against it.

use std::sync::Arc;

use dashmap::DashMap;
use prost::Message;

use crate::{
    privacy::Redactor,
    proto::{InteractionKind, InteractionRecord, log_record::Body},
    trainlog::{LogError, TrainingLog},
};

/// Records larger than this are redacted on a blocking thread.
const REDACT_INLINE_BYTES: usize = 64 << 10;

/// What one interaction put in front of the agent.
#[derive(Debug)]
pub struct Shown {
    /// The tenant it was shown to; only that tenant can refer to it.
    pub tenant: String,
    pub kind: InteractionKind,
    /// When the server answered; nothing can have been shown before it.
    pub created_at: Option<std::time::SystemTime>,
    pub candidate_ids: Vec<String>,
    /// (knowledge_id, version) in the order shown.
    pub knowledge: Vec<(String, u64)>,
}

impl Shown {
    pub fn shows_candidate(&self, id: &str) -> bool {
        self.candidate_ids.iter().any(|c| c == id)
    }

    pub fn shows_knowledge(&self, id: &str) -> bool {
        self.knowledge.iter().any(|(k, _)| k == id)
    }
}

/// Server-issued, time-ordered (UUIDv7) and unguessable.
pub fn new_interaction_id() -> String {
    format!("ix-{}", uuid::Uuid::now_v7().simple())
}

pub struct InteractionBook {
    log: TrainingLog,
    redactor: Arc<Redactor>,
    shown: DashMap<String, Arc<Shown>>,
}

impl InteractionBook {
    pub fn new(log: TrainingLog, redactor: Arc<Redactor>) -> Self {
        InteractionBook { log, redactor, shown: DashMap::new() }
    }

    /// Redacts the interaction's texts, makes it durable, then known to
    /// annotation checks.
    pub async fn record(&self, mut record: InteractionRecord) -> Result<u64, LogError> {
        // Redaction costs up to ~50 µs per KB: a Rank with many raw passages
        // would hold an async thread for a noticeable time.
        if record.encoded_len() > REDACT_INLINE_BYTES {
            let redactor = self.redactor.clone();
            record = tokio::task::spawn_blocking(move || {
                redactor.interaction(&mut record);
                record
            })
            .await
            .map_err(|e| LogError::WriteFailed(format!("redacting the interaction: {e}")))?;
        } else {
            self.redactor.interaction(&mut record);
        }
        let body = Body::Interaction(record);
        let sequence = self.log.append(&body).await?;
        if let Body::Interaction(record) = &body {
            self.index(record);
        }
        Ok(sequence)
    }

    /// The interaction, if the tenant was shown it: another tenant's is as
    /// unknown as one that never happened.
    pub fn get(&self, tenant: &str, interaction_id: &str) -> Option<Arc<Shown>> {
        self.shown.get(interaction_id).map(|entry| entry.clone()).filter(|shown| shown.tenant == tenant)
    }

    pub fn len(&self) -> usize {
        self.shown.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shown.is_empty()
    }

    pub(crate) fn index(&self, record: &InteractionRecord) {
        let shown = Shown {
            tenant: crate::tenancy::of_record(&record.tenant).to_string(),
            kind: record.kind(),
            created_at: record.created_at.and_then(|t| std::time::SystemTime::try_from(t).ok()),
            candidate_ids: record.candidates.iter().map(|c| c.candidate_id.clone()).collect(),
            knowledge: record.shown_knowledge.iter().map(|k| (k.knowledge_id.clone(), k.version)).collect(),
        };
        self.shown.insert(record.interaction_id.clone(), Arc::new(shown));
    }
}
