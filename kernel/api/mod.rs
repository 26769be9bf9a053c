//! The public gRPC API: one file per service. Handlers validate (convert.rs),
//! call into the stores and engines, and map errors in one place (status.rs).

pub mod convert;
mod flywheel;
mod generate;
mod knowledge;
mod page_token;
mod status;
mod support;

use std::sync::Arc;

pub use flywheel::Flywheel;
pub use knowledge::Knowledge;
pub use support::Support;

use crate::{
    feedback::{AnnotationIntake, InteractionBook},
    kb::{KnowledgeStore, QueryComposition, SemanticIndex},
    serving::{Generators, RankerSlot, ServedModels, Slot},
    trainlog::TrainingLog,
};

/// What the handlers share.
pub struct AppState {
    pub kb: Arc<KnowledgeStore>,
    pub log: TrainingLog,
    pub interactions: Arc<InteractionBook>,
    pub annotations: AnnotationIntake,
    /// The query encoder and its index, swapped together; empty when no
    /// embedding model is configured.
    pub semantic: Slot<SemanticIndex>,
    /// Empty when Rank has no model (see `models.ranker`).
    pub ranker: RankerSlot,
    /// The generator and its challenger.
    pub generators: Slot<Generators>,
    /// Knowledge writes hold this shared; a retriever switch holds it alone
    /// while it embeds what was written during its re-embedding.
    pub knowledge_writes: tokio::sync::RwLock<()>,
    /// What serves each role, for GetServingModels.
    pub serving: ServedModels,
    pub default_max_new_tokens: u32,
    pub query_composition: QueryComposition,
    pub default_top_k: u32,
    /// Largest response message (`limits.max_message_mib`): a response that
    /// would not fit is refused before it is logged as shown.
    pub max_message_bytes: usize,
}

/// Refuses a response that could not be delivered, before it is logged.
fn check_response_fits(call: &str, encoded_len: usize, max: usize, fewer: &str) -> crate::error::Result<()> {
    if encoded_len > max {
        return Err(crate::error::Error::ResourceExhausted(format!(
            "the {call} response would be {encoded_len} bytes, over limits.max_message_mib ({max} bytes); {fewer}"
        )));
    }
    Ok(())
}

/// Refuses, before any compute, a request whose interaction record could
/// not be logged (it carries the request).
fn check_request_loggable(call: &str, encoded_len: usize) -> crate::error::Result<()> {
    // Room for what the record adds: shown objects, models, timings.
    let limit = crate::trainlog::format::MAX_RECORD_LEN - (256 << 10);
    if encoded_len > limit {
        return Err(crate::error::Error::InvalidArgument(format!(
            "the {call} request is {encoded_len} bytes; the training log records at most {limit} bytes of a \
             request: send fewer or shorter passages or turns"
        )));
    }
    Ok(())
}

/// A tenant's knowledge objects by (id, version) — version 0 is the latest live one, any
/// other may have been deleted since (what an interaction showed) — in order;
/// a missing one is NOT_FOUND naming `field[i]`.
async fn fetch_knowledge(
    kb: &Arc<KnowledgeStore>,
    tenant: &str,
    field: &'static str,
    wanted: Vec<(String, u64)>,
) -> crate::error::Result<Vec<crate::proto::KnowledgeObject>> {
    let (kb, tenant) = (kb.clone(), tenant.to_string());
    blocking(move || {
        wanted
            .iter()
            .enumerate()
            .map(|(i, (id, version))| {
                kb.get(&tenant, id, *version, *version != 0).map_err(|e| match e {
                    crate::kb::KbError::NotFound(_) | crate::kb::KbError::Deleted { .. } => {
                        crate::error::Error::NotFound(format!("{field}[{i}]: {e}"))
                    }
                    other => other.into(),
                })
            })
            .collect()
    })
    .await
}

/// Runs a blocking store operation off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> crate::error::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| crate::error::Error::Internal(format!("store task failed: {e}")))?
}
