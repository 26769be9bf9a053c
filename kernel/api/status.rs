//! The single table from our errors to gRPC statuses.

use tonic::{Code, Status};

use crate::{backend::cuda::CudaError, error::Error, kb::KbError, trainlog::LogError};

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let code = match &error {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Unavailable(_) => Code::Unavailable,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Internal(_) => Code::Internal,
            Error::Cuda(cuda) => match cuda {
                CudaError::Unavailable(_) => Code::Unavailable,
                CudaError::Driver { detail, .. } if detail.contains("OUT_OF_MEMORY") => Code::ResourceExhausted,
                CudaError::Unsupported { .. } => Code::Unimplemented,
                CudaError::Driver { .. } | CudaError::Compile { .. } => Code::Internal,
            },
            Error::Log(log) => match log {
                LogError::DiskFull(_) | LogError::QueueFull(_) => Code::ResourceExhausted,
                LogError::RecordTooLarge(_) | LogError::InvalidCursorName(_) => Code::InvalidArgument,
                LogError::Corrupt { .. } => Code::DataLoss,
                LogError::Io { .. } | LogError::WriteFailed(_) | LogError::Closed | LogError::Locked(_) => {
                    Code::Unavailable
                }
            },
            Error::Knowledge(kb) => match kb {
                KbError::NotFound(_) | KbError::VersionNotFound { .. } | KbError::Deleted { .. } => Code::NotFound,
                KbError::Locked { .. } | KbError::Storage(_) => Code::Unavailable,
            },
        };
        if matches!(code, Code::Internal | Code::Unavailable | Code::DataLoss) {
            tracing::warn!(%error, ?code, "request failed");
        }
        Status::new(code, error.to_string())
    }
}
