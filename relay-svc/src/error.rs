//! The relay's one error type and its one mapping to `tonic::Status`.
//!
//! Validation errors name the field (`target.refs[2]: not registered with this
//! enterprise`). Internal causes (database errors) are logged here and never
//! returned to the caller.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{field}: {reason}")]
    NotFound { field: String, reason: String },
    #[error("{field}: {reason}")]
    AlreadyExists { field: String, reason: String },
    /// The request is well formed but the state does not allow it (a closed
    /// auction, a bid that did not win, a slot sold by auction).
    #[error("{field}: {reason}")]
    FailedPrecondition { field: String, reason: String },
    /// A quota ran out (a winning bid's capacity).
    #[error("{field}: {reason}")]
    ResourceExhausted { field: String, reason: String },
    /// The enterprise is over its call rate; try again after `retry_after`.
    #[error("rate limit: too many calls from this enterprise; retry after {} ms", retry_after.as_millis())]
    RateLimited { retry_after: std::time::Duration },
    #[error("storage unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
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

    pub fn already_exists(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::AlreadyExists {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl Error {
    pub fn refused(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::FailedPrecondition {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn exhausted(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::ResourceExhausted {
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

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        if is_unavailable(&error) {
            Self::Unavailable(error)
        } else {
            Self::Internal(error.into())
        }
    }
}

impl Error {
    /// A failure shared by several callers (a group commit that failed):
    /// the same class as [`From<sqlx::Error>`] gives, its cause in words.
    pub fn shared(cause: &sqlx::Error) -> Self {
        let words = format!("shared commit failed: {cause}");
        if is_unavailable(cause) {
            Self::Unavailable(sqlx::Error::Io(std::io::Error::other(words)))
        } else {
            Self::Internal(anyhow::anyhow!(words))
        }
    }
}

/// A lost, full, busy or closed database: the caller may retry.
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => is_transient(db.as_ref()),
        _ => false,
    }
}

/// Busy/locked (SQLite), full disk, or a serialization failure / lost connection (PostgreSQL).
fn is_transient(error: &dyn sqlx::error::DatabaseError) -> bool {
    matches!(
        error.code().as_deref(),
        Some("5" | "6" | "13" | "517" | "40001" | "40P01" | "53100" | "57P01" | "08006")
    )
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::InvalidArgument { .. } => Status::new(Code::InvalidArgument, error.to_string()),
            Error::Unauthenticated(_) => Status::new(Code::Unauthenticated, error.to_string()),
            Error::NotFound { .. } => Status::new(Code::NotFound, error.to_string()),
            Error::AlreadyExists { .. } => Status::new(Code::AlreadyExists, error.to_string()),
            Error::FailedPrecondition { .. } => {
                Status::new(Code::FailedPrecondition, error.to_string())
            }
            Error::ResourceExhausted { .. } => {
                Status::new(Code::ResourceExhausted, error.to_string())
            }
            Error::RateLimited { retry_after } => {
                use tonic_types::{ErrorDetails, StatusExt};
                Status::with_error_details(
                    Code::ResourceExhausted,
                    error.to_string(),
                    ErrorDetails::with_retry_info(Some(*retry_after)),
                )
            }
            Error::Unavailable(cause) => {
                tracing::warn!(error = %cause, "storage unavailable");
                Status::new(Code::Unavailable, "storage unavailable, retry later")
            }
            Error::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                Status::new(Code::Internal, "internal error")
            }
        }
    }
}
