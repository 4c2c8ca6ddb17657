//! Bearer credentials in gRPC metadata: reading them on the server side and
//! attaching them (with the caller's trace context) on the client side. What a credential *means* is decided by
//! each service; this module only moves it.

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The token of an `authorization: Bearer <token>` header, if present.
pub fn bearer(metadata: &MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// A client interceptor that sends `authorization: Bearer <token>` on every call.
#[derive(Clone, Debug)]
pub struct BearerInterceptor {
    value: Option<AsciiMetadataValue>,
}

impl BearerInterceptor {
    /// Fails when the token cannot be sent as a header value.
    pub fn new(token: &str) -> Result<Self, Status> {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::invalid_argument("token: not a valid header value"))?;
        Ok(Self { value: Some(value) })
    }

    /// Sends no credential (for testing how servers refuse that).
    pub fn none() -> Self {
        Self { value: None }
    }
}

impl Interceptor for BearerInterceptor {
    /// Attaches the credential, and the calling span's trace context
    /// (`traceparent`) so the server's spans join the caller's trace.
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.value {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        if let Some(traceparent) = crate::telemetry::outgoing_traceparent()
            && let Ok(value) = traceparent.parse()
        {
            request.metadata_mut().insert("traceparent", value);
        }
        Ok(request)
    }
}

/// Checks that the call presents exactly `expected` (a shared secret such as an
/// admin or relay token). The error says what is wrong, for `UNAUTHENTICATED`.
pub fn require_secret(metadata: &MetadataMap, expected: &str) -> Result<(), &'static str> {
    let presented = bearer(metadata).ok_or("authorization: missing token")?;
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err("authorization: wrong token")
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
