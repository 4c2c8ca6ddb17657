//! `chukei.relay.v1.EnterpriseApi`: the enterprise's view. The tenant is the
//! API key's enterprise; an enterprise only ever sees its own refs and counts.

use chukei_proto::clock::to_timestamp;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use chukei_proto::telemetry;
use chukei_proto::window::Window;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    Relay, age_range, channel_from_wire, explanation_to_wire, gender, market, occupation, optional,
    region, required, stats_query, stats_to_wire,
};
use crate::credentials;
use crate::error::{Error, Result};
use crate::policy::{
    FollowUp, MAX_RESENDS, MAX_SEND_TIME_HORIZON_MS, Policy, PolicyKind, Priority, SendTime,
    Timing, WindowMode,
};
use crate::stats::{self, Viewer};
use crate::storage::AuditEntry;
use crate::targeting::{self, Content, MessageState, NewMessage, Segment, Target};

const MAX_PAGE_SIZE: u32 = 1_000;

#[derive(Clone, Debug)]
pub struct EnterpriseService(pub Relay);

impl TryFrom<pb::SendMessageRequest> for NewMessage {
    type Error = Error;

    fn try_from(request: pb::SendMessageRequest) -> Result<Self> {
        let idempotency_key =
            required("idempotency_key", &request.idempotency_key, 128)?.to_owned();
        let content = content_from_wire("content", request.content)?;
        let channel = channel_from_wire("channel", request.channel)?;
        let policy = match request.policy {
            None => Policy::fixed(channel),
            Some(_) if channel.is_some() => {
                return Err(Error::invalid(
                    "channel",
                    "give the channels in policy.channels when a policy is given",
                ));
            }
            Some(policy) => policy_from_wire(policy)?,
        };
        let target = match request.target.and_then(|t| t.kind) {
            None => return Err(Error::invalid("target", "is required")),
            Some(pb::target::Kind::Refs(list)) => {
                if list.refs.is_empty() {
                    return Err(Error::invalid("target.refs", "must name at least one ref"));
                }
                if list.refs.len() > targeting::MAX_REFS {
                    return Err(Error::invalid(
                        "target.refs",
                        format!("must name at most {} refs", targeting::MAX_REFS),
                    ));
                }
                let mut seen = std::collections::HashSet::with_capacity(list.refs.len());
                let mut refs = Vec::with_capacity(list.refs.len());
                for (index, user_ref) in list.refs.iter().enumerate() {
                    let user_ref = required(&format!("target.refs[{index}]"), user_ref, 64)?;
                    if seen.insert(user_ref) {
                        refs.push(user_ref.to_owned());
                    }
                }
                Target::Refs(refs)
            }
            Some(pb::target::Kind::AllRegistered(true)) => Target::AllRegistered,
            Some(pb::target::Kind::AllRegistered(false)) => {
                return Err(Error::invalid(
                    "target.all_registered",
                    "must be true when given",
                ));
            }
            Some(pb::target::Kind::ServiceId(service_id)) => {
                Target::Service(required("target.service_id", &service_id, 64)?.to_owned())
            }
            Some(pb::target::Kind::Segment(segment)) => {
                Target::Segment(segment_from_wire(segment)?)
            }
        };
        let mode = match pb::WindowMode::try_from(request.window_mode) {
            Ok(pb::WindowMode::Unspecified | pb::WindowMode::HeldAtRelay) => {
                WindowMode::HeldAtRelay
            }
            Ok(pb::WindowMode::AtCarrier) => WindowMode::AtCarrier,
            Err(_) => {
                return Err(Error::invalid(
                    "window_mode",
                    format!("unknown window mode {}", request.window_mode),
                ));
            }
        };
        let expires_at = request
            .expires_at
            .as_ref()
            .map(|at| chukei_proto::validate::instant("expires_at", at))
            .transpose()?;
        let timing = Timing {
            window: Window::from_wire("window", request.window.as_ref())?,
            mode,
            expires_at,
            send_time: request.send_time.map(send_time_from_wire).transpose()?,
        };
        if timing.window.is_some() && timing.send_time.is_some() {
            return Err(Error::invalid(
                "send_time",
                "cannot be combined with a window: each person's time is chosen for them",
            ));
        }
        let follow_up = request.follow_up.map(follow_up_from_wire).transpose()?;
        let bid_id = optional("bid_id", &request.bid_id, 64)?;
        let priority = match pb::Priority::try_from(request.priority) {
            Ok(pb::Priority::Unspecified | pb::Priority::Normal) => Priority::Normal,
            Ok(pb::Priority::Low) => Priority::Low,
            Ok(pb::Priority::High) => Priority::High,
            Err(_) => {
                return Err(Error::invalid(
                    "priority",
                    format!("unknown priority {}", request.priority),
                ));
            }
        };
        Ok(Self {
            idempotency_key,
            target,
            content,
            policy,
            all_carriers: request.all_carriers,
            timing,
            follow_up,
            priority,
            bid_id,
            trace_parent: String::new(),
        })
    }
}

/// A per-person send time; the horizon is required and at most 24 h.
fn send_time_from_wire(send_time: pb::SendTime) -> Result<SendTime> {
    let within = |field: &str, within: Option<prost_types::Duration>| -> Result<i64> {
        let within = within.ok_or_else(|| Error::invalid(field, "is required"))?;
        let ms = within.seconds.saturating_mul(1000) + i64::from(within.nanos) / 1_000_000;
        if ms <= 0 || ms > MAX_SEND_TIME_HORIZON_MS {
            return Err(Error::invalid(field, "must be more than 0 and at most 24h"));
        }
        Ok(ms)
    };
    match send_time.kind {
        Some(pb::send_time::Kind::BestHour(best)) => Ok(SendTime::BestHour {
            within_ms: within("send_time.best_hour.within", best.within)?,
        }),
        Some(pb::send_time::Kind::PlaceHour(place)) => {
            if !(place.min_open_rate > 0.0 && place.min_open_rate <= 1.0) {
                return Err(Error::invalid(
                    "send_time.place_hour.min_open_rate",
                    "must be more than 0 and at most 1",
                ));
            }
            Ok(SendTime::PlaceHour {
                min_rate_permille: (place.min_open_rate * 1000.0).round() as i64,
                within_ms: within("send_time.place_hour.within", place.within)?,
            })
        }
        None => Err(Error::invalid(
            "send_time",
            "best_hour or place_hour is required",
        )),
    }
}

/// Message content named `field`: text required and bounded, media an http(s)
/// URL, at most 11 suggested replies of 25 characters (RCS's limits).
fn content_from_wire(field: &str, content: Option<common::Content>) -> Result<Content> {
    let content = content.ok_or_else(|| Error::invalid(field, "is required"))?;
    if content.text.trim().is_empty() {
        return Err(Error::invalid(format!("{field}.text"), "must not be empty"));
    }
    if content.text.len() > targeting::MAX_TEXT_BYTES {
        return Err(Error::invalid(
            format!("{field}.text"),
            format!("must be at most {} bytes", targeting::MAX_TEXT_BYTES),
        ));
    }
    let media_url_ok = content.media_url.is_empty()
        || content.media_url.starts_with("https://")
        || content.media_url.starts_with("http://");
    if !media_url_ok {
        return Err(Error::invalid(
            format!("{field}.media_url"),
            "must be an http(s) URL",
        ));
    }
    if content.subject.chars().count() > 200 || content.subject.contains(['\r', '\n']) {
        return Err(Error::invalid(
            format!("{field}.subject"),
            "must be one line of at most 200 characters",
        ));
    }
    if content.suggested_replies.len() > 11 {
        return Err(Error::invalid(
            format!("{field}.suggested_replies"),
            "at most 11 suggested replies",
        ));
    }
    for (index, reply) in content.suggested_replies.iter().enumerate() {
        let count = reply.chars().count();
        if count == 0 || count > 25 || reply.contains('\n') {
            return Err(Error::invalid(
                format!("{field}.suggested_replies[{index}]"),
                "must be one line of 1 to 25 characters",
            ));
        }
    }
    Ok(Content {
        text: content.text,
        media_url: content.media_url,
        subject: content.subject,
        suggested_replies: content.suggested_replies,
    })
}

/// A channel field: unspecified is `None`, an unknown number is refused.
/// Milliseconds of a wire duration; negative or absurd ones are refused.
pub(super) fn duration_ms(field: &str, duration: Option<&prost_types::Duration>) -> Result<i64> {
    let Some(duration) = duration else {
        return Ok(0);
    };
    if duration.seconds < 0 || duration.nanos < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    if duration.seconds > MAX_DELAY_SECS {
        return Err(Error::invalid(field, "must be at most 30 days"));
    }
    Ok(duration.seconds * 1000 + i64::from(duration.nanos) / 1_000_000)
}

/// The longest timeout or delay a message may ask for.
const MAX_DELAY_SECS: i64 = 30 * 24 * 3600;

fn policy_from_wire(policy: pb::DeliveryPolicy) -> Result<Policy> {
    let kind = match pb::PolicyKind::try_from(policy.kind) {
        Ok(pb::PolicyKind::Unspecified) => {
            return Err(Error::invalid("policy.kind", "is required"));
        }
        Ok(pb::PolicyKind::Fixed) => PolicyKind::Fixed,
        Ok(pb::PolicyKind::MostUsed) => PolicyKind::MostUsed,
        Ok(pb::PolicyKind::Fallback) => PolicyKind::Fallback,
        Ok(pb::PolicyKind::Multi) => PolicyKind::Multi,
        Ok(pb::PolicyKind::Resend) => PolicyKind::Resend,
        Ok(pb::PolicyKind::Best) => PolicyKind::Best,
        Err(_) => {
            return Err(Error::invalid(
                "policy.kind",
                format!("unknown policy {}", policy.kind),
            ));
        }
    };
    let mut channels = Vec::with_capacity(policy.channels.len());
    for (index, number) in policy.channels.iter().enumerate() {
        let field = format!("policy.channels[{index}]");
        let channel = channel_from_wire(&field, *number)?
            .ok_or_else(|| Error::invalid(&field, "must name a channel"))?;
        if channels.contains(&channel) {
            return Err(Error::invalid(field, "names a channel twice"));
        }
        channels.push(channel);
    }
    let least = match kind {
        PolicyKind::Fixed | PolicyKind::Resend => 1,
        PolicyKind::Fallback | PolicyKind::Multi => 2,
        PolicyKind::MostUsed | PolicyKind::Best => 0,
    };
    if channels.len() < least {
        let reason = if least == 1 {
            "must name at least one channel".to_owned()
        } else {
            format!("must name at least {least} channels for {}", kind.as_str())
        };
        return Err(Error::invalid("policy.channels", reason));
    }
    if kind == PolicyKind::Resend && channels.len() > 1 {
        return Err(Error::invalid(
            "policy.channels",
            "resend sends on exactly one channel",
        ));
    }
    let timeout_ms = duration_ms("policy.timeout", policy.timeout.as_ref())?;
    let timed = matches!(kind, PolicyKind::Fallback | PolicyKind::Resend);
    if timed && timeout_ms <= 0 {
        return Err(Error::invalid(
            "policy.timeout",
            format!("must be positive for {}", kind.as_str()),
        ));
    }
    if !timed && policy.timeout.is_some() {
        return Err(Error::invalid(
            "policy.timeout",
            "only fallback and resend use a timeout",
        ));
    }
    match kind {
        PolicyKind::Resend if !(1..=MAX_RESENDS).contains(&policy.max_resends) => {
            return Err(Error::invalid(
                "policy.max_resends",
                format!("must be between 1 and {MAX_RESENDS}"),
            ));
        }
        PolicyKind::Resend => {}
        _ if policy.max_resends != 0 => {
            return Err(Error::invalid(
                "policy.max_resends",
                "only resend sends again",
            ));
        }
        _ => {}
    }
    let resend_until_delivered = match pb::ResendUntil::try_from(policy.resend_until) {
        Ok(pb::ResendUntil::Unspecified | pb::ResendUntil::Opened) => false,
        Ok(pb::ResendUntil::Delivered) => true,
        Err(_) => {
            return Err(Error::invalid(
                "policy.resend_until",
                format!("unknown value {}", policy.resend_until),
            ));
        }
    };
    Ok(Policy {
        kind,
        channels,
        timeout_ms,
        max_resends: policy.max_resends,
        resend_until_delivered,
    })
}

fn follow_up_from_wire(follow_up: pb::FollowUp) -> Result<FollowUp> {
    Ok(FollowUp {
        content: content_from_wire("follow_up.content", follow_up.content)?,
        delay_ms: duration_ms("follow_up.delay", follow_up.delay.as_ref())?,
        channel: channel_from_wire("follow_up.channel", follow_up.channel)?,
    })
}

fn segment_from_wire(segment: pb::Segment) -> Result<Segment> {
    let parsed = Segment {
        gender: gender("target.segment.gender", segment.gender)?,
        age: age_range("target.segment.age", segment.age_min, segment.age_max)?,
        regions: segment
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| region(&format!("target.segment.regions[{i}]"), r))
            .collect::<Result<_>>()?,
        occupations: segment
            .occupations
            .iter()
            .enumerate()
            .map(|(i, o)| occupation(&format!("target.segment.occupations[{i}]"), o))
            .collect::<Result<_>>()?,
        service_id: optional("target.segment.service_id", &segment.service_id, 64)?,
    };
    if !parsed.has_criteria() {
        return Err(Error::invalid(
            "target.segment",
            "must give at least one of gender, age, regions, occupations",
        ));
    }
    if parsed.regions.len() > 64 || parsed.occupations.len() > 64 {
        return Err(Error::invalid(
            "target.segment",
            "at most 64 regions and 64 occupations",
        ));
    }
    Ok(parsed)
}

fn state_to_wire(state: MessageState) -> pb::MessageState {
    match state {
        MessageState::Accepted => pb::MessageState::Accepted,
        MessageState::Expanded => pb::MessageState::Expanded,
        MessageState::HandedOver => pb::MessageState::HandedOver,
    }
}

/// Accepts one message of `enterprise_id` (`SendMessage`, and each request
/// of `SendMessages`): validated, checked against the minimum cohort and the
/// auction terms, durable before the answer, audited when it uses attributes.
/// `received` is the caller's trace.
async fn send(
    relay: &Relay,
    enterprise_id: &str,
    request: pb::SendMessageRequest,
    received: &str,
) -> Result<pb::SendMessageResponse> {
    let mut message = NewMessage::try_from(request)?;
    message.trace_parent = telemetry::traceparent(&tracing::Span::current(), received);
    let now = relay.clock.now_ms();
    relay.check_cohort(enterprise_id, &message, now).await?;
    let expires_at = match message.timing.expires_at {
        Some(at) if at <= now => {
            return Err(Error::invalid("expires_at", "must be in the future"));
        }
        Some(at) => at,
        None => now + relay.message_ttl_ms,
    };
    let terms = relay
        .terms(enterprise_id, &message, now, expires_at)
        .await?;
    let stored = relay
        .store
        .accept_on_terms(
            enterprise_id,
            &credentials::new_id("msg"),
            &message,
            now,
            expires_at,
            &relay.attention,
            &terms,
        )
        .await?;
    tracing::Span::current().record("message_id", stored.row.message_id.as_str());
    if let (true, Target::Segment(segment)) = (stored.created, &message.target) {
        let entry = AuditEntry::new(
            format!("enterprise:{enterprise_id}"),
            "attributes.used",
            stored.row.message_id.as_str(),
            format!("purpose: targeting; fields: {}", segment.fields()),
        );
        relay.store.audit(now, &entry).await?;
    }
    if stored.created {
        relay
            .metrics
            .accepted
            .inc(&[("target", message.target.kind())]);
        tracing::info!(target_kind = message.target.kind(), matched = ?stored.row.matched, "message accepted");
        match stored.row.state {
            MessageState::Accepted => relay.expand.notify_one(),
            _ => relay.dispatch.new_work(),
        }
    }
    Ok(pb::SendMessageResponse {
        message_id: stored.row.message_id,
        state: state_to_wire(stored.row.state) as i32,
        matched: stored.row.matched,
        accepted_at: Some(to_timestamp(stored.row.accepted_at)),
    })
}

/// Requests of one `SendMessages` stream accepted at once.
const SENDS_IN_FLIGHT: usize = 64;

/// The caller's W3C traceparent, if it sent one.
fn caller_trace(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tonic::async_trait]
impl pb::enterprise_api_server::EnterpriseApi for EnterpriseService {
    #[tracing::instrument(skip_all, fields(enterprise_id, message_id))]
    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        tracing::Span::current().record("enterprise_id", enterprise_id.as_str());
        let received = caller_trace(request.metadata());
        Ok(Response::new(
            send(relay, &enterprise_id, request.into_inner(), &received).await?,
        ))
    }

    type SendMessagesStream = ReceiverStream<std::result::Result<pb::SendMessagesResult, Status>>;

    #[tracing::instrument(skip_all, fields(enterprise_id))]
    async fn send_messages(
        &self,
        request: Request<tonic::Streaming<pb::SendMessageRequest>>,
    ) -> Result<Response<Self::SendMessagesStream>, Status> {
        let relay = self.0.clone();
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        tracing::Span::current().record("enterprise_id", enterprise_id.as_str());
        let received = caller_trace(request.metadata());
        let mut inbound = request.into_inner();
        let (results, results_rx) = tokio::sync::mpsc::channel(SENDS_IN_FLIGHT);
        tokio::spawn(async move {
            // Up to SENDS_IN_FLIGHT requests are accepted at once, so they
            // share group commits (one fsync for many) as concurrent unary
            // calls would; each result is sent once its message is durable.
            let mut in_flight = tokio::task::JoinSet::new();
            let mut index = 0_u64;
            loop {
                let next = tokio::select! {
                    next = inbound.message(), if in_flight.len() < SENDS_IN_FLIGHT => next,
                    Some(done) = in_flight.join_next() => {
                        let Ok(result) = done else { continue };
                        if results.send(Ok(result)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                let request = match next {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "send stream ended by the caller");
                        break;
                    }
                };
                let (relay, enterprise_id, received) =
                    (relay.clone(), enterprise_id.clone(), received.clone());
                in_flight.spawn(async move {
                    let key = request.idempotency_key.clone();
                    // Each request is a call for the enterprise's rate limit.
                    let outcome = match relay.take_call(&enterprise_id) {
                        Ok(()) => send(&relay, &enterprise_id, request, &received).await,
                        Err(error) => Err(error),
                    };
                    pb::SendMessagesResult {
                        index,
                        idempotency_key: key,
                        outcome: Some(match outcome {
                            Ok(accepted) => pb::send_messages_result::Outcome::Accepted(accepted),
                            Err(error) => {
                                let status = Status::from(error);
                                pb::send_messages_result::Outcome::Refused(pb::Refusal {
                                    code: status.code() as i32,
                                    message: status.message().to_owned(),
                                })
                            }
                        }),
                    }
                });
                index += 1;
            }
            while let Some(done) = in_flight.join_next().await {
                if let Ok(result) = done
                    && results.send(Ok(result)).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(results_rx)))
    }

    #[tracing::instrument(skip_all)]
    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::MessageStatus>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let message_id = required("message_id", &request.get_ref().message_id, 64)?;
        let row = relay
            .store
            .message(&enterprise_id, message_id)
            .await?
            .ok_or_else(|| Error::not_found("message_id", "no such message"))?;
        let counts = relay.store.message_counts(message_id).await?;
        let charged = relay.store.message_charges(message_id).await?;
        let matched = row.matched.unwrap_or(0);
        let settled = counts.handed_over + counts.skipped + counts.expired;
        // Only the message's own people count; the estimate uses every
        // carrier's recent rate, as a message waits behind the others.
        let backlog = matched.saturating_sub(settled);
        let expected_drain = match backlog {
            0 => None,
            _ => relay
                .dispatch
                .drain_estimate(None, backlog)
                .map(|d| prost_types::Duration {
                    seconds: d.as_secs() as i64,
                    nanos: d.subsec_nanos() as i32,
                }),
        };
        let state = if row.state == MessageState::Expanded && settled >= matched {
            MessageState::HandedOver
        } else {
            row.state
        };
        Ok(Response::new(pb::MessageStatus {
            message_id: row.message_id,
            state: state_to_wire(state) as i32,
            matched,
            handed_over: counts.handed_over,
            delivered: counts.delivered,
            opened: counts.opened,
            failed: counts.failed,
            accepted_at: Some(to_timestamp(row.accepted_at)),
            expired: counts.expired,
            unsupported: counts.unsupported,
            deferred: counts.deferred,
            skipped: counts.skipped,
            plan: row.plan,
            follow_up_message_id: row.follow_up_id.unwrap_or_default(),
            charged,
            backlog,
            expected_drain,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn explain_delivery(
        &self,
        request: Request<pb::ExplainDeliveryRequest>,
    ) -> Result<Response<pb::DeliveryExplanation>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let request = request.into_inner();
        let message_id = required("message_id", &request.message_id, 64)?;
        let user_ref = required("user_ref", &request.user_ref, 64)?;
        let message = relay
            .store
            .message(&enterprise_id, message_id)
            .await?
            .ok_or_else(|| Error::not_found("message_id", "no such message"))?;
        if message.by_attributes {
            return Err(Error::refused(
                "message_id",
                "chose its people by consented attributes: who it reached is not shown per person",
            )
            .into());
        }
        let user_id = relay
            .store
            .user_for_ref(&enterprise_id, user_ref)
            .await?
            .ok_or_else(|| Error::not_found("user_ref", "not registered with this enterprise"))?;
        let explanation = relay.store.explain(message_id, &user_id).await?;
        Ok(Response::new(explanation_to_wire(
            message_id,
            explanation,
            false,
        )))
    }

    #[tracing::instrument(skip_all)]
    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let now = relay.clock.now_ms();
        let viewer = Viewer::Enterprise(enterprise_id.clone());
        let query = stats_query(request.get_ref(), &viewer, now, "")?;
        let attributes: Vec<&str> = query
            .by
            .iter()
            .filter(|d| d.is_attribute())
            .map(|d| d.name())
            .collect();
        if !attributes.is_empty() {
            let entry = AuditEntry::new(
                format!("enterprise:{enterprise_id}"),
                "attributes.used",
                "statistics",
                format!("purpose: statistics; fields: {}", attributes.join(",")),
            );
            relay.store.audit(now, &entry).await?;
        }
        let rows = stats::breakdown(&relay.store, &viewer, &query, relay.thresholds).await?;
        Ok(Response::new(stats_to_wire(&query, rows, relay.thresholds)))
    }

    #[tracing::instrument(skip_all)]
    async fn quote_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::Quote>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let message = NewMessage::try_from(request.into_inner())?;
        relay
            .check_cohort(&enterprise_id, &message, relay.clock.now_ms())
            .await?;
        Ok(Response::new(relay.quote(&enterprise_id, &message).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn get_prices(
        &self,
        request: Request<pb::GetPricesRequest>,
    ) -> Result<Response<pb::PriceTable>, Status> {
        let relay = &self.0;
        relay.enterprise(request.metadata()).await?;
        Ok(Response::new(relay.prices().await?))
    }

    #[tracing::instrument(skip_all)]
    async fn get_statement(
        &self,
        request: Request<pb::GetStatementRequest>,
    ) -> Result<Response<pb::Statement>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let statement = relay
            .statement(&enterprise_id, &request.get_ref().month)
            .await?;
        Ok(Response::new(statement))
    }

    #[tracing::instrument(skip_all)]
    async fn list_auction_slots(
        &self,
        request: Request<pb::ListAuctionSlotsRequest>,
    ) -> Result<Response<pb::ListAuctionSlotsResponse>, Status> {
        let relay = &self.0;
        relay.enterprise(request.metadata()).await?;
        Ok(Response::new(relay.list_slots(false).await?))
    }

    #[tracing::instrument(skip_all, fields(enterprise_id, bid_id))]
    async fn place_bid(
        &self,
        request: Request<pb::PlaceBidRequest>,
    ) -> Result<Response<pb::Bid>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let (slot_id, quantity, price) = market::bid_from_wire(request.get_ref())?;
        let bid_id = credentials::new_id("bid");
        tracing::Span::current()
            .record("enterprise_id", enterprise_id.as_str())
            .record("bid_id", bid_id.as_str());
        let bid = relay
            .store
            .place_bid(
                &enterprise_id,
                &bid_id,
                &slot_id,
                quantity,
                price,
                relay.clock.now_ms(),
            )
            .await?;
        tracing::info!(slot_id = %slot_id, "bid placed");
        Ok(Response::new(market::bid_to_wire(bid)))
    }

    #[tracing::instrument(skip_all)]
    async fn get_bid(
        &self,
        request: Request<pb::GetBidRequest>,
    ) -> Result<Response<pb::Bid>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let bid_id = required("bid_id", &request.get_ref().bid_id, 64)?;
        let bid = relay
            .store
            .bid(&enterprise_id, bid_id)
            .await?
            .ok_or_else(|| Error::not_found("bid_id", "no such bid"))?;
        Ok(Response::new(market::bid_to_wire(bid)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_registrations(
        &self,
        request: Request<pb::ListRegistrationsRequest>,
    ) -> Result<Response<pb::ListRegistrationsResponse>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => 100,
            size if size > MAX_PAGE_SIZE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE_SIZE}"),
                )
                .into());
            }
            size => size,
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(
                request
                    .page_token
                    .split_once('/')
                    .ok_or_else(|| Error::invalid("page_token", "malformed"))?,
            )
        };
        let service_id = optional("service_id", &request.service_id, 64)?;
        let rows = relay
            .store
            .list_registrations(&enterprise_id, service_id.as_deref(), after, page_size)
            .await?;
        let entry = AuditEntry::new(
            format!("enterprise:{enterprise_id}"),
            "export.registrations",
            service_id
                .as_deref()
                .map_or("all".to_owned(), |s| format!("service:{s}")),
            format!("{} refs", rows.len()),
        );
        relay.store.audit(relay.clock.now_ms(), &entry).await?;
        let next_page_token = if rows.len() == page_size as usize {
            rows.last()
                .map(|row| format!("{}/{}", row.user_ref, row.service_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRegistrationsResponse {
            registrations: rows
                .into_iter()
                .map(|row| pb::Registration {
                    user_ref: row.user_ref,
                    service_id: row.service_id,
                    registered_at: Some(to_timestamp(row.registered_at)),
                })
                .collect(),
            next_page_token,
        }))
    }
}
