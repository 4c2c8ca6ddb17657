//! `chukei.relay.v1.EnterpriseApi`: the enterprise's view. The tenant is the
//! API key's enterprise; an enterprise only ever sees its own refs and counts.

use chukei_proto::clock::to_timestamp;
use chukei_proto::relay::v1 as pb;
use chukei_proto::telemetry;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    Relay, explanation_to_wire, market, optional, required, stats_query, stats_to_wire, webhooks,
};
use crate::credentials;
use crate::error::{Error, Result};
use crate::stats::Viewer;
use crate::storage::AuditEntry;
use crate::targeting::{MessageState, NewMessage};

const MAX_PAGE_SIZE: u32 = 1_000;

#[derive(Clone, Debug)]
pub struct EnterpriseService(pub Relay);

fn state_to_wire(state: MessageState) -> pb::MessageState {
    match state {
        MessageState::Accepted => pb::MessageState::Accepted,
        MessageState::Expanded => pb::MessageState::Expanded,
        MessageState::HandedOver => pb::MessageState::HandedOver,
    }
}

/// Accepts one message of `enterprise_id` (`SendMessage`, and each request
/// of `SendMessages`) through [`Relay::send`] once it is valid. `received`
/// is the caller's trace.
async fn send(
    relay: &Relay,
    enterprise_id: &str,
    request: pb::SendMessageRequest,
    received: &str,
) -> Result<pb::SendMessageResponse> {
    let mut message = NewMessage::try_from(request)?;
    message.trace_parent = telemetry::traceparent(&tracing::Span::current(), received);
    let stored = relay.send(enterprise_id, &message).await?;
    tracing::Span::current().record("message_id", stored.row.message_id.as_str());
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
        let viewer = Viewer::Enterprise(enterprise_id);
        let query = stats_query(request.get_ref(), &viewer, relay.clock.now_ms(), "")?;
        let rows = relay.stats(&viewer, &query).await?;
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
        Ok(Response::new(
            relay.quote_to_wire(&enterprise_id, &message).await?,
        ))
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

    #[tracing::instrument(skip_all, fields(enterprise_id))]
    async fn add_webhook(
        &self,
        request: Request<pb::AddWebhookRequest>,
    ) -> Result<Response<pb::WebhookWithSecret>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        tracing::Span::current().record("enterprise_id", enterprise_id.as_str());
        let added = webhooks::add(relay, &enterprise_id, request.into_inner()).await?;
        Ok(Response::new(added))
    }

    #[tracing::instrument(skip_all)]
    async fn list_webhooks(
        &self,
        request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        Ok(Response::new(webhooks::list(relay, &enterprise_id).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn rotate_webhook_secret(
        &self,
        request: Request<pb::RotateWebhookSecretRequest>,
    ) -> Result<Response<pb::WebhookWithSecret>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let rotated = webhooks::rotate(relay, &enterprise_id, request.into_inner()).await?;
        Ok(Response::new(rotated))
    }

    #[tracing::instrument(skip_all)]
    async fn remove_webhook(
        &self,
        request: Request<pb::RemoveWebhookRequest>,
    ) -> Result<Response<pb::RemoveWebhookResponse>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        webhooks::remove(relay, &enterprise_id, &request.get_ref().webhook_id).await?;
        Ok(Response::new(pb::RemoveWebhookResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn resume_webhook(
        &self,
        request: Request<pb::ResumeWebhookRequest>,
    ) -> Result<Response<pb::Webhook>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let resumed =
            webhooks::resume(relay, &enterprise_id, &request.get_ref().webhook_id).await?;
        Ok(Response::new(resumed))
    }

    #[tracing::instrument(skip_all)]
    async fn list_webhook_attempts(
        &self,
        request: Request<pb::ListWebhookAttemptsRequest>,
    ) -> Result<Response<pb::ListWebhookAttemptsResponse>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let attempts =
            webhooks::attempts(relay, &enterprise_id, &request.get_ref().webhook_id).await?;
        Ok(Response::new(attempts))
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
