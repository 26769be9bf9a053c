//! The crate's error type: what went wrong, in terms a client can act on.
//! `api/status.rs` is the one place these become gRPC statuses.

use crate::{kb::KbError, trainlog::LogError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The system is not in the state the operation needs (nothing to roll back to).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Knowledge(#[from] KbError),
    #[error(transparent)]
    Cuda(#[from] crate::backend::cuda::CudaError),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Self {
        Error::InvalidArgument(format!("{field}: {problem}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
