//! The relay's REST/JSON edge, on the same port as gRPC: the `EnterpriseApi`
//! as resources under `/v1`, for enterprises that do not speak gRPC. It is
//! an edge like `grpc/` and nothing more: it takes the API key from
//! `Authorization: Bearer`, turns JSON into the same validated domain types
//! (through the proto requests, so a field is named the same way in both
//! APIs' errors) and calls the same core — `service::Relay::send` for a
//! send, the gRPC handlers' own code for the rest. Errors are
//! `application/problem+json` naming the field; a rate-limited call is a
//! 429 with `Retry-After`; timestamps are RFC 3339, money integer yen.
//! The OpenAPI 3.1 document is generated from this module's types
//! ([`ApiDoc`]), served at `/v1/openapi.json` and checked in as
//! `docs/openapi.json` (a test proves the copy current).

pub mod auction;
pub mod messages;
mod problem;
pub mod reports;
pub mod send_body;
pub mod webhooks;
pub mod wire;

use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use utoipa::OpenApi;

pub use problem::Problem;

use crate::grpc::EnterpriseService;
use crate::service::Relay;

/// The OpenAPI document of the REST edge.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Chukei relay REST API",
        version = "1",
        description = "Send messages to people without knowing their carrier, follow them, \
                       and read what they cost. Every call takes `Authorization: Bearer <API key>`. \
                       Errors are RFC 9457 problem details naming the field; a rate-limited call \
                       is answered 429 with `Retry-After`. Times are RFC 3339; money is integer yen."
    ),
    paths(
        messages::send,
        messages::status,
        messages::explain,
        messages::quote,
        reports::registrations,
        reports::stats,
        reports::prices,
        reports::statement,
        auction::slots,
        auction::place_bid,
        auction::bid,
        webhooks::add,
        webhooks::list,
        webhooks::get,
        webhooks::remove,
        webhooks::rotate_secret,
        webhooks::resume,
        webhooks::attempts,
        openapi_json,
    ),
    modifiers(&BearerAuth, &ErrorResponses),
    security(("bearer" = [])),
    components(schemas(Problem, crate::webhooks::Payload)),
    tags(
        (name = "messages", description = "Send, follow and explain messages; quote them first."),
        (name = "reports", description = "Registrations, statistics, prices and statements."),
        (name = "auction", description = "The capacity auction: slots and sealed bids."),
        (name = "webhooks", description = "Status webhooks: endpoints the relay POSTs each person's events to, \
            signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`). \
            The body is an `events.batch` Payload."),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_default()
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some("An enterprise API key"))
                        .build(),
                ),
            );
    }
}

/// The problems any call may meet, documented on every operation that does
/// not say more: 400 (a field), 401 (the key), 404 (an id in the path, or
/// a ref), 415 and 422 (a body that is not the JSON asked for), 429 (the call
/// rate, with `Retry-After`) and 503 (storage unavailable; retry).
struct ErrorResponses;

impl utoipa::Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let problem = || {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build()
        };
        let common = [
            ("400", "A field is invalid (named in `field`)"),
            ("401", "No API key, or an unknown one"),
            ("404", "Not found (another enterprise's ids too)"),
            ("415", "The body is not JSON"),
            (
                "422",
                "The body is not the JSON asked for, or the request was refused",
            ),
            (
                "429",
                "Over the call rate: retry after `Retry-After` seconds",
            ),
            ("503", "Storage unavailable: retry later"),
        ];
        for (path, item) in openapi.paths.paths.iter_mut() {
            // The document itself takes no key and no body.
            if path == "/v1/openapi.json" {
                continue;
            }
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                for (status, description) in common {
                    if operation.responses.responses.contains_key(status) {
                        continue;
                    }
                    let mut response = ResponseBuilder::new()
                        .description(description)
                        .content("application/problem+json", problem());
                    if status == "429" {
                        use utoipa::openapi::schema::Type;
                        let header = |schema_type, description: &str| {
                            HeaderBuilder::new()
                                .schema(
                                    utoipa::openapi::ObjectBuilder::new().schema_type(schema_type),
                                )
                                .description(Some(description))
                                .build()
                        };
                        response = response
                            .header("Retry-After", header(Type::Integer, "Seconds to wait"))
                            .header(
                                "RateLimit",
                                header(Type::String, "\"per-enterprise\";r=0;t=<seconds>"),
                            );
                    }
                    operation
                        .responses
                        .responses
                        .insert(status.to_owned(), response.build().into());
                }
            }
        }
    }
}

/// The OpenAPI document, as served and as checked in.
pub fn openapi() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "reports", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi())
}

/// The REST routes, served beside the gRPC services.
pub fn router(relay: Relay) -> Router {
    let api = EnterpriseService(relay.clone());
    Router::new()
        .route("/v1/messages", post(messages::send))
        .route("/v1/messages/{message_id}", get(messages::status))
        .route(
            "/v1/messages/{message_id}/recipients/{user_ref}",
            get(messages::explain),
        )
        .route("/v1/quotes", post(messages::quote))
        .route("/v1/registrations", get(reports::registrations))
        .route("/v1/stats", get(reports::stats))
        .route("/v1/prices", get(reports::prices))
        .route("/v1/statements/{month}", get(reports::statement))
        .route("/v1/auction/slots", get(auction::slots))
        .route("/v1/auction/bids", post(auction::place_bid))
        .route("/v1/auction/bids/{bid_id}", get(auction::bid))
        .route("/v1/webhooks", post(webhooks::add).get(webhooks::list))
        .route(
            "/v1/webhooks/{webhook_id}",
            get(webhooks::get).delete(webhooks::remove),
        )
        .route(
            "/v1/webhooks/{webhook_id}/rotate-secret",
            post(webhooks::rotate_secret),
        )
        .route("/v1/webhooks/{webhook_id}/resume", post(webhooks::resume))
        .route(
            "/v1/webhooks/{webhook_id}/attempts",
            get(webhooks::attempts),
        )
        .route("/v1/openapi.json", get(openapi_json))
        .fallback(fallback)
        .with_state(Core {
            relay: relay.clone(),
            api,
        })
        .layer(axum::middleware::from_fn_with_state(
            Edge {
                http: relay.metrics.http.clone(),
                rate_per_sec: relay.limits.as_ref().map(|limits| limits.per_sec()),
            },
            metrics_and_problems,
        ))
}

/// What every REST handler calls.
#[derive(Clone)]
pub(crate) struct Core {
    relay: Relay,
    api: EnterpriseService,
}

/// The caller's API key and trace, as the gRPC handlers take them.
pub(crate) struct Caller {
    authorization: Option<axum::http::HeaderValue>,
    traceparent: Option<axum::http::HeaderValue>,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self {
            authorization: parts.headers.get(header::AUTHORIZATION).cloned(),
            traceparent: parts.headers.get("traceparent").cloned(),
        })
    }
}

impl Caller {
    /// `message` as a gRPC request carrying the caller's key and trace.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        for (name, value) in [
            ("authorization", &self.authorization),
            ("traceparent", &self.traceparent),
        ] {
            if let Some(value) = value
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                metadata.insert(name, value);
            }
        }
        request
    }

    /// The API key from `Authorization: Bearer`.
    pub(crate) fn key(&self) -> Result<&str, Problem> {
        self.authorization
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .ok_or_else(|| {
                Problem::from(crate::error::Error::Unauthenticated(
                    "authorization: missing API key",
                ))
            })
    }
}

/// Times every REST call by route (never by the ids in its path) and turns
/// axum's own rejections (an unknown route, a body that is not JSON) into
/// problem documents.
/// What the layer around every REST call needs.
#[derive(Clone)]
struct Edge {
    http: chukei_proto::metrics::Histogram,
    /// Each enterprise's call rate, when limited.
    rate_per_sec: Option<u32>,
}

async fn metrics_and_problems(
    axum::extract::State(edge): axum::extract::State<Edge>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().clone();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    edge.http.observe(
        &[("route", &route), ("status", response.status().as_str())],
        started.elapsed().as_secs_f64(),
    );
    let mut response = if response.status().is_client_error() && !is_problem(response.headers()) {
        as_problem(response, &method).await
    } else {
        response
    };
    if let Some(limit) = edge.rate_per_sec {
        rate_limit_headers(response.headers_mut(), limit);
    }
    response
}

/// axum's own refusal (no route, not JSON, not the JSON asked for) as a problem.
async fn as_problem(response: Response, method: &axum::http::Method) -> Response {
    let status = response.status();
    let detail = match status {
        StatusCode::NOT_FOUND => "no such resource".to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => format!("{method} is not allowed here"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            "body: send JSON with Content-Type: application/json".to_owned()
        }
        _ => {
            let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
                .await
                .unwrap_or_default();
            format!("body: {}", String::from_utf8_lossy(&bytes))
        }
    };
    Problem::new(status, detail, None).into_response()
}

/// Anything no route serves: a gRPC call to a service this port does not
/// host is UNIMPLEMENTED (as tonic answers), anything else a 404 problem.
async fn fallback(headers: HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let (parts, ()) = tonic::Status::unimplemented("")
            .into_http::<()>()
            .into_parts();
        return Response::from_parts(parts, axum::body::Body::empty());
    }
    Problem::new(StatusCode::NOT_FOUND, "no such resource".to_owned(), None).into_response()
}

/// The rate limit's fields (IETF `RateLimit-Policy` / `RateLimit`): the
/// policy on every answer, and on a 429 that nothing is left until
/// `Retry-After`.
fn rate_limit_headers(headers: &mut HeaderMap, limit: u32) {
    use axum::http::HeaderValue;
    if let Ok(policy) = HeaderValue::from_str(&format!("\"per-enterprise\";q={limit};w=1")) {
        headers.insert("ratelimit-policy", policy);
    }
    let reset = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(reset) = reset
        && let Ok(state) = HeaderValue::from_str(&format!("\"per-enterprise\";r=0;t={reset}"))
    {
        headers.insert("ratelimit", state);
    }
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"))
}
