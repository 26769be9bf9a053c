//! The feedback spine: every Retrieve/Rank/Generate call becomes an
//! interaction in the training log, and agents' annotations are validated
//! against what that interaction showed before they are logged.
//!
//! The in-memory indexes here (what each interaction showed, which
//! annotation ids are taken) are derived from the log and rebuilt from it at
//! start, so the log stays the single source of truth.

mod annotations;
mod interactions;

use std::ops::ControlFlow;

pub use annotations::{Accepted, AnnotationIntake};
pub use interactions::{InteractionBook, Shown, new_interaction_id};

use crate::{
    proto::log_record::Body,
    trainlog::{LogError, LogReader, TrainingLog},
};

/// Rebuilds both indexes from the whole log.
pub fn rebuild(
    log: &TrainingLog,
    interactions: &InteractionBook,
    annotations: &AnnotationIntake,
) -> Result<u64, LogError> {
    let mut records = 0;
    LogReader::new(log.dir()).read_from(1, |record| {
        records += 1;
        match record.body {
            Some(Body::Interaction(interaction)) => interactions.index(&interaction),
            Some(Body::Annotation(annotation)) => annotations.index(&annotation, record.sequence),
            None => {}
        }
        ControlFlow::Continue(())
    })?;
    Ok(records)
}
