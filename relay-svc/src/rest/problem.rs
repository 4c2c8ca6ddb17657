//! Errors as RFC 9457 problem details (`application/problem+json`): the HTTP
//! status, a title, the detail in words and — where one field is to blame —
//! its name, the same name the gRPC API gives.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;
use utoipa::ToSchema;

use crate::error::Error;

/// A problem document.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`about:blank`: see `title`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP status's phrase, e.g. "Bad Request".
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What was wrong, in words, e.g. `target.refs[2]: not registered with this enterprise`.
    pub detail: String,
    /// The request field to blame, when there is one, e.g. `target.refs[2]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For a rate-limited call: seconds to wait (also the `Retry-After` header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, detail: String, field: Option<String>) -> Self {
        Self {
            kind: "about:blank".to_owned(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            field,
            retry_after: None,
        }
    }

    /// A request field that is not what it must be.
    pub fn invalid(field: &str, reason: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            format!("{field}: {reason}"),
            Some(field.to_owned()),
        )
    }
}

impl From<tonic::Status> for Problem {
    fn from(status: tonic::Status) -> Self {
        use tonic_types::StatusExt;
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::FailedPrecondition => StatusCode::UNPROCESSABLE_ENTITY,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let retry_after = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
            .map(|delay| delay.as_millis().div_ceil(1000).max(1) as u64);
        // A quota that ran out (a winning bid's capacity) is not a rate limit.
        let http = if http == StatusCode::TOO_MANY_REQUESTS && retry_after.is_none() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            http
        };
        // "field: reason" names the field when the message starts with one
        // (a field name has no spaces).
        let detail = status.message().to_owned();
        let field = detail
            .split_once(": ")
            .map(|(field, _)| field)
            .filter(|field| !field.is_empty() && !field.contains(' '))
            .filter(|_| !matches!(http.as_u16(), 429 | 500..))
            .map(str::to_owned);
        Self {
            retry_after,
            ..Self::new(http, detail, field)
        }
    }
}

impl From<Error> for Problem {
    fn from(error: Error) -> Self {
        Self::from(tonic::Status::from(error))
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after;
        let mut response = (status, axum::Json(self)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_becomes_a_problem_naming_its_field() {
        let problem = Problem::from(tonic::Status::invalid_argument(
            "target.refs[2]: must not be empty",
        ));
        assert_eq!(problem.status, 400);
        assert_eq!(problem.field.as_deref(), Some("target.refs[2]"));
        let problem = Problem::from(tonic::Status::internal("internal error"));
        assert_eq!((problem.status, problem.field), (500, None));
    }

    #[test]
    fn a_rate_limit_is_429_with_retry_after() {
        let limited = Error::RateLimited {
            retry_after: std::time::Duration::from_millis(1_200),
        };
        let problem = Problem::from(limited);
        assert_eq!((problem.status, problem.retry_after), (429, Some(2)));
        let response = problem.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let exhausted = Error::exhausted("bid_id", "the winning bid has 0 messages left");
        assert_eq!(Problem::from(exhausted).status, 422);
    }
}
