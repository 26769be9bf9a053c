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
    /// The call presented no valid API key.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's key may not do this.
    #[error("{0}")]
    PermissionDenied(String),
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

    /// What a server answered a call of ours, kept typed (the reverse of
    /// `api/status.rs`), so that a remote server's INVALID_ARGUMENT reaches
    /// the user as one; `call` says which call it was.
    pub fn from_status(call: impl std::fmt::Display, status: &tonic::Status) -> Self {
        use tonic::Code;
        let message = format!("{call}: {}", status.message());
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(message),
            Code::NotFound => Error::NotFound(message),
            Code::AlreadyExists => Error::AlreadyExists(message),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => Error::Unavailable(message),
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            code => Error::Internal(format!("{call}: {code:?}: {}", status.message())),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every typed error survives a trip to the wire and back: its kind and its message.
    #[test]
    fn a_status_a_server_answered_stays_typed() {
        let errors = [
            Error::InvalidArgument("top_k: 0".into()),
            Error::NotFound("kb-1".into()),
            Error::AlreadyExists("kb-1".into()),
            Error::Unavailable("no ranker".into()),
            Error::ResourceExhausted("queue full".into()),
            Error::FailedPrecondition("nothing to roll back".into()),
            Error::Unauthenticated("no key".into()),
            Error::PermissionDenied("role reader".into()),
            Error::Internal("boom".into()),
        ];
        for error in errors {
            let (kind, message) = (std::mem::discriminant(&error), error.to_string());
            let back = Error::from_status("Retrieve q1", &tonic::Status::from(error));
            assert_eq!(std::mem::discriminant(&back), kind, "{back:?}");
            assert!(back.to_string().starts_with("Retrieve q1: ") && back.to_string().contains(&message), "{back}");
        }
        let lost = Error::from_status("Rank q2", &tonic::Status::data_loss("log corrupt"));
        assert_eq!(lost.to_string(), "Rank q2: DataLoss: log corrupt");
    }
}
