//! The training log: the flywheel's append-only memory of interactions and
//! annotations. An append is acknowledged only once it is on disk
//! (fdatasync, shared by concurrent appends: group commit), so an agent's
//! acknowledged annotation survives `kill -9` and power loss. The layout is
//! specified in [`format`]; the write path follows the segment-and-frame
//! design of write-ahead logs such as qdrant's WAL.

pub mod cursor;
pub mod faults;
pub mod format;
mod reader;
mod writer;

use std::{io, path::PathBuf};

pub use cursor::Cursor;
pub use faults::{Fault, FaultInjector};
pub use reader::{LogReader, LogStats, SegmentStats};
pub use writer::{LogHealth, LogOptions, RecoveryReport, TrainingLog};

#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("training log I/O error on {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("training log is corrupt: {path} at byte offset {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("training log disk is full: {0}")]
    DiskFull(String),
    #[error("training log cannot write: {0}")]
    WriteFailed(String),
    #[error("training log queue is full ({0} appends waiting); retry with backoff")]
    QueueFull(usize),
    #[error("training log is closed")]
    Closed,
    #[error("record of {0} bytes exceeds the training log's limit of {limit} bytes", limit = format::MAX_RECORD_LEN)]
    RecordTooLarge(usize),
    #[error("training log at {0} is in use by another process (is an `aitl serve` running on this data dir?)")]
    Locked(PathBuf),
    #[error("invalid cursor name {0:?}: use 1 to 64 characters from a-z, 0-9, '-' and '_'")]
    InvalidCursorName(String),
}

impl LogError {
    pub(crate) fn io(path: impl Into<PathBuf>, err: io::Error) -> Self {
        LogError::Io { path: path.into(), message: err.to_string() }
    }

    /// Classifies a failed append: a full disk is the operator's to fix and
    /// maps to RESOURCE_EXHAUSTED, anything else to UNAVAILABLE.
    pub(crate) fn from_write(err: &io::Error) -> Self {
        let full = err.kind() == io::ErrorKind::StorageFull
            || matches!(err.raw_os_error(), Some(28 /* ENOSPC */) | Some(122 /* EDQUOT */));
        if full { LogError::DiskFull(err.to_string()) } else { LogError::WriteFailed(err.to_string()) }
    }
}
