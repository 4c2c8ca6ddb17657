//! `chukei.carrier.v1.Carrier.Deliver`: the relay's streams. Batches come
//! down and are acked once durable (duplicates dropped by delivery id). On
//! the main stream receipts go up from the outbox until the relay acks
//! them, and count reports on an interval; the priority stream (version 3,
//! `chukei-deliver-lane: priority`) carries the priority lane's batches and
//! their acks only, in a loop of its own, so they do not wait behind a
//! campaign's batches; what of them can go to a terminal at once is pushed
//! while the batch commits, and acked after. A newer stream of either kind supersedes the older
//! one of that kind.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chukei_proto::auth;
use chukei_proto::carrier::v1 as pb;
use chukei_proto::clock::{from_timestamp, to_timestamp};
use chukei_proto::telemetry;
use chukei_proto::window::Window;
use chukei_proto::{crash, deliver};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::Shared;
use crate::model::{Lanes, MessageDeliveries, Recipient};
use crate::storage::MessageCount;
use crate::terminals;

/// Receipt batches sent but not yet acked: bounds what is in flight so neither
/// side ever blocks the other's reads.
const RECEIPT_WINDOW: usize = 4;
const RECEIPTS_PER_BATCH: u32 = 1_000;

#[derive(Clone, Debug)]
pub struct DeliverService(pub Shared);

#[tonic::async_trait]
impl pb::carrier_server::Carrier for DeliverService {
    type DeliverStream = ReceiverStream<Result<pb::CarrierToRelay, Status>>;

    async fn deliver(
        &self,
        request: Request<Streaming<pb::RelayToCarrier>>,
    ) -> Result<Response<Self::DeliverStream>, Status> {
        let shared = self.0.clone();
        auth::require_secret(request.metadata(), &shared.relay_token)
            .map_err(Status::unauthenticated)?;
        if shared.tls.verifies_clients() {
            chukei_proto::tls::require_peer(&request, chukei_proto::tls::RELAY_NAME)?;
        }
        // A relay on another protocol version is refused at once, naming both.
        deliver::check_version("relay", deliver::version_in(request.metadata()))
            .map_err(Status::failed_precondition)?;
        let stream = deliver::stream_in(request.metadata()).map_err(Status::invalid_argument)?;
        let mut generation = 0;
        shared.relay_session.send_modify(|g| {
            g[stream as usize] += 1;
            generation = g[stream as usize];
        });
        let (up, up_rx) = mpsc::channel(64);
        let inbound = request.into_inner();
        shared.tasks.spawn({
            let shared = shared.clone();
            async move {
                tracing::info!(stream = stream.name(), "relay stream open");
                let ended = match stream {
                    deliver::Stream::Main => session(&shared, generation, inbound, &up).await,
                    deliver::Stream::Priority => {
                        priority_session(&shared, generation, inbound, &up).await
                    }
                };
                if let Err(error) = ended {
                    tracing::warn!(stream = stream.name(), %error, "relay stream ended");
                    let _ = up
                        .send(Err(Status::unavailable("carrier stream ended")))
                        .await;
                }
            }
        });
        let mut response = Response::new(ReceiverStream::new(up_rx));
        deliver::put_version(response.metadata_mut());
        Ok(response)
    }
}

type Up = mpsc::Sender<Result<pb::CarrierToRelay, Status>>;

/// Stores a batch from the relay (duplicates dropped) and acknowledges it.
async fn accept(shared: &Shared, up: &Up, batch: pb::DeliveryBatch) -> anyhow::Result<()> {
    let traces = telemetry::step_per_message(
        "carrier.accept",
        batch
            .messages
            .iter()
            .map(|m| (m.message_id.as_str(), m.trace_parent.as_str())),
    );
    let records: Vec<MessageDeliveries> = batch
        .messages
        .into_iter()
        .filter_map(|m| deliveries_from_wire(m, shared.default_channel, &traces))
        .collect();
    let received: usize = records.iter().map(|r| r.recipients.len()).sum();
    let lanes = Lanes {
        priority: records.iter().any(|r| r.priority),
        bulk: records.iter().any(|r| !r.priority),
    };
    let accepted = shared
        .store
        .accept_batch_pushing(
            records,
            shared.clock.now_ms(),
            shared.gateways,
            |pushable| terminals::push_at_once(shared, pushable),
        )
        .await?;
    crash::point(crash::CARRIER_BATCH_STORED);
    send(
        up,
        pb::carrier_to_relay::Kind::BatchAck(pb::BatchAck {
            batch_id: batch.batch_id,
        }),
    )
    .await?;
    tracing::debug!(
        batch_id = batch.batch_id,
        received,
        fresh = accepted.fresh,
        pushed_at_once = accepted.pushed,
        "batch accepted"
    );
    shared.metrics.accepted.add(&[], accepted.fresh);
    // What was pushed at once needs no read; anything held does.
    if accepted.fresh > accepted.pushed {
        shared.terminals.new_work_in(lanes);
    }
    Ok(())
}

/// Acts on the relay's erasure notices and acknowledges them: a person who
/// left the whole hub has every message still held for them dropped.
async fn forget(shared: &Shared, up: &Up, batch: pb::ErasureBatch) -> anyhow::Result<()> {
    let leaving: Vec<&str> = batch
        .erasures
        .iter()
        .filter(|e| e.enterprise_id.is_empty())
        .map(|e| e.user_id.as_str())
        .collect();
    let dropped = shared.store.drop_held(&leaving).await?;
    tracing::info!(
        notices = batch.erasures.len(),
        dropped,
        "erasure notices applied"
    );
    send(
        up,
        pb::carrier_to_relay::Kind::ErasureAck(pb::ErasureAck {
            notice_ids: batch.erasures.iter().map(|e| e.notice_id).collect(),
        }),
    )
    .await
}

/// A carrier's capacity in deliveries per second (real time): each batch is
/// taken when the previous ones' share of it has passed.
struct Pace {
    per_sec: u32,
    next_free: tokio::time::Instant,
}

impl Pace {
    fn new(per_sec: u32) -> Self {
        Self {
            per_sec,
            next_free: tokio::time::Instant::now(),
        }
    }

    /// When a batch of `deliveries` may be taken (`None`: at once, unpaced).
    fn slot(&mut self, deliveries: usize) -> Option<tokio::time::Instant> {
        if self.per_sec == 0 {
            return None;
        }
        let start = self.next_free.max(tokio::time::Instant::now());
        self.next_free =
            start + Duration::from_secs_f64(deliveries as f64 / f64::from(self.per_sec));
        Some(start)
    }
}

async fn session(
    shared: &Shared,
    generation: u64,
    mut inbound: Streaming<pb::RelayToCarrier>,
    up: &Up,
) -> anyhow::Result<()> {
    let mut sessions = shared.relay_session.subscribe();
    let mut outbox_changed = shared.outbox_changed.subscribe();
    let interval = Duration::from_secs(shared.report_interval_secs);
    let mut next_report = Box::pin(shared.clock.sleep(interval));
    let mut outbox = Outbox::default();
    // A paced carrier takes each batch when its capacity allows: the relay's
    // unacknowledged batches are the only buffer, so the backlog stays in the
    // relay's database.
    let mut pace = Pace::new(shared.pace_per_sec);
    let mut waiting: VecDeque<(tokio::time::Instant, pb::DeliveryBatch)> = VecDeque::new();
    // A new relay session gets every count again with the next report.
    shared.store.mark_counts_changed().await?;
    loop {
        outbox.send(shared, up).await?;
        let next_slot = waiting.front().map(|(at, _)| *at);
        tokio::select! {
            () = shared.cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep_until(next_slot.unwrap_or_else(tokio::time::Instant::now)), if next_slot.is_some() => {
                if let Some((_, batch)) = waiting.pop_front() {
                    accept(shared, up, batch).await?;
                }
            }
            changed = sessions.changed() => {
                changed?;
                if superseded(&sessions, deliver::Stream::Main, generation) {
                    return Ok(());
                }
            }
            message = inbound.message() => {
                let Some(message) = message? else { return Ok(()) };
                match message.kind {
                    Some(pb::relay_to_carrier::Kind::Batch(batch)) => match pace.slot(batch.messages.iter().map(|m| m.delivery_ids.len()).sum()) {
                        None => accept(shared, up, batch).await?,
                        Some(at) => waiting.push_back((at, batch)),
                    },
                    Some(pb::relay_to_carrier::Kind::ReceiptAck(ack)) => {
                        outbox.acked(shared, ack.up_to_seq as i64).await?;
                    }
                    Some(pb::relay_to_carrier::Kind::Erasures(batch)) => forget(shared, up, batch).await?,
                    None => {}
                }
            }
            changed = outbox_changed.changed() => {
                changed?;
                outbox.unread = true;
            }
            () = &mut next_report => {
                next_report = Box::pin(shared.clock.sleep(interval));
                report_counts(shared, up).await?;
            }
        }
    }
}

/// Whether the relay opened a newer stream of this kind (said at INFO).
fn superseded(
    sessions: &tokio::sync::watch::Receiver<[u64; 2]>,
    stream: deliver::Stream,
    generation: u64,
) -> bool {
    let newer = sessions.borrow()[stream as usize] != generation;
    if newer {
        tracing::info!(
            stream = stream.name(),
            "relay stream superseded by a newer one"
        );
    }
    newer
}

/// The priority stream: its batches accepted and acked as they come, not
/// paced (a paced carrier's capacity is for campaigns), nothing else.
async fn priority_session(
    shared: &Shared,
    generation: u64,
    mut inbound: Streaming<pb::RelayToCarrier>,
    up: &Up,
) -> anyhow::Result<()> {
    let mut sessions = shared.relay_session.subscribe();
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return Ok(()),
            changed = sessions.changed() => {
                changed?;
                if superseded(&sessions, deliver::Stream::Priority, generation) {
                    return Ok(());
                }
            }
            message = inbound.message() => {
                let Some(message) = message? else { return Ok(()) };
                match message.kind {
                    Some(pb::relay_to_carrier::Kind::Batch(batch)) => accept(shared, up, batch).await?,
                    Some(_) => anyhow::bail!("the priority stream carries delivery batches only"),
                    None => {}
                }
            }
        }
    }
}

/// The receipt outbox as this relay session has sent it.
struct Outbox {
    /// The last sequence sent of each batch not yet acknowledged.
    unacked: VecDeque<i64>,
    sent_seq: i64,
    /// The outbox is read again only when receipts were queued since, or
    /// when a full window kept some back: not on every batch or ack.
    unread: bool,
}

impl Default for Outbox {
    fn default() -> Self {
        Self {
            unacked: VecDeque::new(),
            sent_seq: 0,
            unread: true,
        }
    }
}

impl Outbox {
    /// Sends queued receipts up, a batch at a time, while the window allows.
    async fn send(&mut self, shared: &Shared, up: &Up) -> anyhow::Result<()> {
        while self.unread && self.unacked.len() < RECEIPT_WINDOW {
            let (receipts, drained) = shared
                .store
                .outbox_read(self.sent_seq, RECEIPTS_PER_BATCH)
                .await?;
            self.unread = !drained;
            let Some(last) = receipts.last() else { break };
            self.sent_seq = last.seq;
            self.unacked.push_back(self.sent_seq);
            let batch = receipts_to_wire(self.sent_seq, receipts);
            send(up, pb::carrier_to_relay::Kind::Receipts(batch)).await?;
        }
        Ok(())
    }

    /// The relay holds every receipt up to `up_to`: they leave the outbox.
    async fn acked(&mut self, shared: &Shared, up_to: i64) -> anyhow::Result<()> {
        shared.store.ack_outbox(up_to);
        while self.unacked.front().is_some_and(|seq| *seq <= up_to) {
            self.unacked.pop_front();
        }
        Ok(())
    }
}

/// Reports the counts that changed since the last report, if any.
async fn report_counts(shared: &Shared, up: &Up) -> anyhow::Result<()> {
    let counts = shared.store.take_changed_counts().await?;
    if counts.is_empty() {
        return Ok(());
    }
    let report = pb::CountReport {
        at: Some(to_timestamp(shared.clock.now_ms())),
        counts: counts.into_iter().map(count_to_wire).collect(),
    };
    send(up, pb::carrier_to_relay::Kind::CountReport(report)).await
}

async fn send(up: &Up, kind: pb::carrier_to_relay::Kind) -> anyhow::Result<()> {
    up.send(Ok(pb::CarrierToRelay { kind: Some(kind) }))
        .await
        .map_err(|_| anyhow::anyhow!("relay stream closed"))
}

/// One packed record as the carrier keeps it, or `None` (logged) for a
/// malformed one; a delivery without ids is dropped from it.
fn deliveries_from_wire(
    record: pb::MessageDeliveries,
    default_channel: i64,
    traces: &HashMap<String, String>,
) -> Option<MessageDeliveries> {
    if let Err(error) = deliver::deliveries_len(&record) {
        tracing::warn!(%error, "malformed delivery record dropped");
        return None;
    }
    let content = record.content.unwrap_or_default();
    let window = record
        .window
        .as_ref()
        .and_then(|w| match Window::from_wire("window", Some(w)) {
            Ok(window) => window.map(|w| w.encode()),
            Err(error) => {
                tracing::warn!(%error, "delivery window refused; delivering without it");
                None
            }
        });
    let channel_of = |number: i32| match number {
        1..=4 => i64::from(number),
        _ => default_channel,
    };
    let recipients: Vec<Recipient> = record
        .delivery_ids
        .into_iter()
        .zip(record.user_ids)
        .enumerate()
        .filter_map(|(i, (delivery_id, user_id))| {
            if delivery_id == 0 || user_id.is_empty() {
                tracing::warn!("delivery without ids dropped");
                return None;
            }
            Some(Recipient {
                delivery_id,
                user_id,
                channel: channel_of(
                    record
                        .channels
                        .get(i)
                        .map_or(record.channel, |&c| i32::from(c)),
                ),
                not_before: record
                    .not_before_each_ms
                    .get(i)
                    .copied()
                    .unwrap_or(record.not_before_ms),
            })
        })
        .collect();
    Some(MessageDeliveries {
        trace_parent: telemetry::passed_on(traces, &record.message_id, record.trace_parent),
        message_id: record.message_id,
        text: content.text,
        media_url: content.media_url,
        subject: content.subject,
        suggested_replies: content.suggested_replies,
        expires_at: record.expires_at.as_ref().map_or(i64::MAX, from_timestamp),
        window,
        single_attempt: record.single_attempt,
        priority: record.priority,
        recipients,
    })
}

/// Outbox receipts packed per message (version 2 of the Deliver protocol),
/// with the outbox sequence of the last one.
fn receipts_to_wire(seq: i64, receipts: Vec<crate::model::Receipt>) -> pb::ReceiptBatch {
    let mut packers: Vec<deliver::ReceiptPacker> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    for r in receipts {
        let index = *index_of.entry(r.message_id.clone()).or_insert_with(|| {
            packers.push(deliver::ReceiptPacker::new(r.message_id.clone()));
            packers.len() - 1
        });
        packers[index].push(
            r.delivery_id,
            r.user_id,
            r.kind as u8,
            r.channel as u8,
            r.at,
            &r.region,
            &r.trace_parent,
        );
    }
    pb::ReceiptBatch {
        seq: seq as u64,
        messages: packers
            .into_iter()
            .map(deliver::ReceiptPacker::finish)
            .collect(),
    }
}

/// A message's counts on the wire (the periodic report and `GetCounts`).
pub(crate) fn count_to_wire(count: MessageCount) -> pb::MessageCount {
    pb::MessageCount {
        message_id: count.message_id,
        sent: count.sent,
        opened: count.opened,
        sms_segments: count.sms_segments,
        unsupported: count.unsupported,
        expired: count.expired,
    }
}
