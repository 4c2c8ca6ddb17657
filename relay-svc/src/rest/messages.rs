//! `/v1/messages` and `/v1/quotes`: send (idempotent by the `Idempotency-Key`
//! header), follow, explain and quote a message.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::enterprise_api_server::EnterpriseApi;
use chukei_proto::telemetry;
use serde::Serialize;
use utoipa::ToSchema;

use super::send_body::SendBody;
use super::wire;
use super::{Caller, Core, Problem};
use crate::content::Channel;
use crate::targeting::{MessageState, NewMessage};

/// A message's state by name.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageStateName {
    Accepted,
    Expanded,
    HandedOver,
}

impl MessageStateName {
    fn from_wire(number: i32) -> Self {
        match pb::MessageState::try_from(number) {
            Ok(pb::MessageState::HandedOver) => Self::HandedOver,
            Ok(pb::MessageState::Expanded) => Self::Expanded,
            _ => Self::Accepted,
        }
    }
}

/// A message accepted (durable before this answer).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub message_id: String,
    pub state: MessageStateName,
    /// People matched, once the recipients are extracted.
    pub matched: Option<u64>,
    pub accepted_at: String,
    /// This answer replays an earlier call with the same `Idempotency-Key`.
    pub replayed: bool,
}

/// Sends a message: refs are planned at once, campaigns extracted after
/// the answer. With the same `Idempotency-Key` and body, a retry answers
/// the first call's message (200, `Idempotent-Replayed: true`); with another
/// body, 409.
#[utoipa::path(post, path = "/v1/messages", tag = "messages", request_body = SendBody,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Makes a retry safe: the same key and body give the same message. Absent: a fresh key.")),
    responses(
        (status = 201, description = "Accepted", body = Accepted,
            headers(("Location" = String, description = "The message's status"))),
        (status = 200, description = "A replay of an earlier call with this key", body = Accepted,
            headers(("Idempotent-Replayed" = String, description = "true"))),
        (status = 400, description = "A field is invalid", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "A ref, service or bid not found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The key was used for another message", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Refused (minimum cohort, bid capacity)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the call rate", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
pub(super) async fn send(
    State(core): State<Core>,
    caller: Caller,
    headers: HeaderMap,
    Json(body): Json<SendBody>,
) -> Result<Response, Problem> {
    let enterprise_id = core.relay.enterprise_for_key(caller.key()?).await?;
    let key = match headers.get("idempotency-key") {
        Some(value) => value
            .to_str()
            .map_err(|_| Problem::invalid("Idempotency-Key", "must be visible ASCII"))?
            .to_owned(),
        None => crate::credentials::new_id("rest"),
    };
    let request = body.into_request(key)?;
    let mut message = NewMessage::try_from(request)?;
    let received = caller
        .traceparent
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    message.trace_parent = telemetry::traceparent(&tracing::Span::current(), received);
    let stored = core.relay.send(&enterprise_id, &message).await?;
    let row = stored.row;
    let accepted = Accepted {
        state: match row.state {
            MessageState::Accepted => MessageStateName::Accepted,
            MessageState::Expanded => MessageStateName::Expanded,
            MessageState::HandedOver => MessageStateName::HandedOver,
        },
        matched: row.matched,
        accepted_at: chukei_proto::clock::rfc3339(row.accepted_at),
        replayed: !stored.created,
        message_id: row.message_id,
    };
    let location = HeaderValue::from_str(&format!("/v1/messages/{}", accepted.message_id))
        .map_err(|_| Problem::from(crate::error::Error::Internal(anyhow::anyhow!("message id"))))?;
    let mut response = if stored.created {
        (StatusCode::CREATED, Json(accepted)).into_response()
    } else {
        let mut replay = Json(accepted).into_response();
        replay
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        replay
    };
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

/// A message's state and counts.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Status {
    pub message_id: String,
    pub state: MessageStateName,
    pub matched: u64,
    pub handed_over: u64,
    pub delivered: u64,
    pub opened: u64,
    pub failed: u64,
    pub expired: u64,
    pub unsupported: u64,
    /// Held by quiet periods around targeted messages.
    pub deferred: u64,
    /// Not sent (fatigue, consent withdrawn, no send time).
    pub skipped: u64,
    pub accepted_at: Option<String>,
    /// The plan in words.
    pub plan: String,
    pub follow_up_message_id: Option<String>,
    /// Yen charged so far.
    pub charged: i64,
    /// Deliveries not yet handed over.
    pub backlog: u64,
    /// When the backlog is expected to be handed over, at the recent pace.
    pub expected_drain_seconds: Option<u64>,
}

/// A message's state and counts.
#[utoipa::path(get, path = "/v1/messages/{message_id}", tag = "messages",
    params(("message_id" = String, Path)),
    responses(
        (status = 200, body = Status),
        (status = 404, description = "No such message of this enterprise", body = Problem, content_type = "application/problem+json"),
    ))]
pub(super) async fn status(
    State(core): State<Core>,
    caller: Caller,
    Path(message_id): Path<String>,
) -> Result<Json<Status>, Problem> {
    let s = core
        .api
        .get_message(caller.request(pb::GetMessageRequest { message_id }))
        .await?
        .into_inner();
    Ok(Json(Status {
        state: MessageStateName::from_wire(s.state),
        accepted_at: wire::instant(s.accepted_at.as_ref()),
        follow_up_message_id: Some(s.follow_up_message_id).filter(|id| !id.is_empty()),
        expected_drain_seconds: wire::whole_seconds(s.expected_drain.as_ref()),
        message_id: s.message_id,
        matched: s.matched,
        handed_over: s.handed_over,
        delivered: s.delivered,
        opened: s.opened,
        failed: s.failed,
        expired: s.expired,
        unsupported: s.unsupported,
        deferred: s.deferred,
        skipped: s.skipped,
        plan: s.plan,
        charged: s.charged,
        backlog: s.backlog,
    }))
}

/// One attempt of the decision trace.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Attempt {
    pub attempt: u32,
    pub channel: Option<Channel>,
    /// pending, waiting, handed_over, unsupported, expired, cancelled or skipped.
    pub state: String,
    pub not_before: Option<String>,
    pub handed_over_at: Option<String>,
    /// Why the attempt exists, and what was decided about it since.
    pub reason: String,
}

/// What happened, as the person's receipts say.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TraceEvent {
    pub kind: String,
    pub at: Option<String>,
    pub channel: Option<Channel>,
}

/// Why and how a message went (or did not go) to one ref.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Explanation {
    pub message_id: String,
    pub plan: String,
    pub attempts: Vec<Attempt>,
    pub events: Vec<TraceEvent>,
}

/// Why and how a message went (or did not go) to one of your refs. Not for
/// messages that chose people by consented attributes.
#[utoipa::path(get, path = "/v1/messages/{message_id}/recipients/{user_ref}", tag = "messages",
    params(("message_id" = String, Path), ("user_ref" = String, Path)),
    responses(
        (status = 200, body = Explanation),
        (status = 404, description = "No such message or ref", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A message chosen by attributes", body = Problem, content_type = "application/problem+json"),
    ))]
pub(super) async fn explain(
    State(core): State<Core>,
    caller: Caller,
    Path((message_id, user_ref)): Path<(String, String)>,
) -> Result<Json<Explanation>, Problem> {
    let e = core
        .api
        .explain_delivery(caller.request(pb::ExplainDeliveryRequest {
            message_id,
            user_ref,
        }))
        .await?
        .into_inner();
    Ok(Json(Explanation {
        message_id: e.message_id,
        plan: e.plan,
        attempts: e
            .attempts
            .into_iter()
            .map(|a| Attempt {
                attempt: a.attempt,
                channel: wire::channel(a.channel),
                state: a.state,
                not_before: wire::instant(a.not_before.as_ref()),
                handed_over_at: wire::instant(a.handed_over_at.as_ref()),
                reason: a.reason,
            })
            .collect(),
        events: e
            .events
            .into_iter()
            .map(|t| TraceEvent {
                kind: t.kind,
                at: wire::instant(t.at.as_ref()),
                channel: wire::channel(t.channel),
            })
            .collect(),
    }))
}

/// One channel and local hour a quoted message may be charged in.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct QuoteLine {
    pub channel: Option<Channel>,
    /// The local hour, 0–23.
    pub slot: u32,
    /// Yen per person delivered.
    pub delivered_price: i64,
    /// Yen per person who opens.
    pub opened_price: i64,
}

/// What a message would cost now, on the terms a send would get.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Quote {
    pub recipients: u64,
    /// The price table version (0: no rate card, nothing is charged).
    pub price_table: u64,
    pub lines: Vec<QuoteLine>,
    /// Yen if everyone is delivered, at the cheapest and dearest line.
    pub delivered_low: i64,
    pub delivered_high: i64,
    /// Yen more if everyone opens.
    pub opened_low: i64,
    pub opened_high: i64,
    /// Paid for by a winning bid.
    pub prepaid: bool,
    pub zone: String,
}

/// Prices a message for its current target instead of sending it.
#[utoipa::path(post, path = "/v1/quotes", tag = "messages", request_body = SendBody,
    responses(
        (status = 200, body = Quote),
        (status = 400, description = "A field is invalid", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Refused (minimum cohort)", body = Problem, content_type = "application/problem+json"),
    ))]
pub(super) async fn quote(
    State(core): State<Core>,
    caller: Caller,
    Json(body): Json<SendBody>,
) -> Result<Json<Quote>, Problem> {
    // The key only identifies a send; a quote stores nothing.
    let request = body.into_request("quote".to_owned())?;
    let q = core
        .api
        .quote_message(caller.request(request))
        .await?
        .into_inner();
    Ok(Json(Quote {
        recipients: q.recipients,
        price_table: q.price_table,
        lines: q
            .lines
            .into_iter()
            .map(|l| QuoteLine {
                channel: wire::channel(l.channel),
                slot: l.slot,
                delivered_price: l.delivered_price,
                opened_price: l.opened_price,
            })
            .collect(),
        delivered_low: q.delivered_low,
        delivered_high: q.delivered_high,
        opened_low: q.opened_low,
        opened_high: q.opened_high,
        prepaid: q.prepaid,
        zone: q.zone,
    }))
}
