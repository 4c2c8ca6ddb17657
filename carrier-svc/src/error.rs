//! The carrier's one error type and its one mapping to `tonic::Status`;
//! internal causes are logged, never returned.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{field}: {reason}")]
    NotFound { field: String, reason: String },
    /// Well-formed, but not acceptable in the current state.
    #[error("{field}: {reason}")]
    Refused { field: String, reason: String },
    /// The relay refused or could not be reached; its status is passed on.
    #[error("relay: {0}")]
    Relay(Status),
    #[error("storage error")]
    Storage(#[from] sqlx::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn not_found(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::NotFound {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl Error {
    pub fn refused(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Refused {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<chukei_proto::validate::FieldError> for Error {
    fn from(error: chukei_proto::validate::FieldError) -> Self {
        Self::InvalidArgument {
            field: error.field,
            reason: error.reason,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument { .. } => Status::new(Code::InvalidArgument, error.to_string()),
            Error::Unauthenticated(_) => Status::new(Code::Unauthenticated, error.to_string()),
            Error::NotFound { .. } => Status::new(Code::NotFound, error.to_string()),
            Error::Refused { .. } => Status::new(Code::FailedPrecondition, error.to_string()),
            Error::Relay(status) => {
                tracing::warn!(code = ?status.code(), "relay call failed");
                match status.code() {
                    Code::InvalidArgument
                    | Code::NotFound
                    | Code::AlreadyExists
                    | Code::FailedPrecondition
                    | Code::ResourceExhausted => {
                        Status::new(status.code(), format!("relay: {}", status.message()))
                    }
                    _ => Status::new(Code::Unavailable, "relay unavailable, retry later"),
                }
            }
            Error::Storage(cause) => {
                tracing::error!(error = %cause, "storage error");
                Status::new(Code::Unavailable, "storage unavailable, retry later")
            }
        }
    }
}
