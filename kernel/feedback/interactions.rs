//! Interactions: what a model call showed, recorded durably before the
//! response leaves, so any annotation the agent makes can be checked against it.

use std::sync::Arc;

use dashmap::DashMap;

use crate::{
    proto::{InteractionKind, InteractionRecord, log_record::Body},
    trainlog::{LogError, TrainingLog},
};

/// What one interaction put in front of the agent.
#[derive(Debug)]
pub struct Shown {
    pub kind: InteractionKind,
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
    shown: DashMap<String, Arc<Shown>>,
}

impl InteractionBook {
    pub fn new(log: TrainingLog) -> Self {
        InteractionBook { log, shown: DashMap::new() }
    }

    /// Makes the interaction durable, then known to annotation checks.
    pub async fn record(&self, record: InteractionRecord) -> Result<u64, LogError> {
        let body = Body::Interaction(record);
        let sequence = self.log.append(&body).await?;
        if let Body::Interaction(record) = &body {
            self.index(record);
        }
        Ok(sequence)
    }

    pub fn get(&self, interaction_id: &str) -> Option<Arc<Shown>> {
        self.shown.get(interaction_id).map(|entry| entry.clone())
    }

    pub fn len(&self) -> usize {
        self.shown.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shown.is_empty()
    }

    pub(crate) fn index(&self, record: &InteractionRecord) {
        let shown = Shown {
            kind: record.kind(),
            candidate_ids: record.candidates.iter().map(|c| c.candidate_id.clone()).collect(),
            knowledge: record.shown_knowledge.iter().map(|k| (k.knowledge_id.clone(), k.version)).collect(),
        };
        self.shown.insert(record.interaction_id.clone(), Arc::new(shown));
    }
}
