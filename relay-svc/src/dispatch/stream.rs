//! One of a carrier's two `Carrier.Deliver` streams: the dispatcher's
//! session and its reconnects. The main stream carries the bulk lane's
//! batches and erasure notices down, and acks, receipts, count reports and
//! erasure acks up; the priority stream the priority lane's batches and
//! their acks only, so a targeted message never waits behind a campaign's
//! batches, on the wire or in either end's loop over the stream.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::carrier::v1 as pb;
use chukei_proto::clock::Clock;
use chukei_proto::telemetry;
use chukei_proto::{crash, deliver};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::handed::OpenLane;
use super::wire::{WindowCache, count_report_from_wire, pack, receipts_from_wire};
use super::{DispatchConfig, DispatchHandle};
use crate::storage::{DueDelivery, Lane, Store};

/// One of a carrier's dispatchers: holds its stream while this replica holds
/// the carrier's lease.
pub(super) struct Dispatcher {
    pub(super) carrier_id: String,
    /// Which of the carrier's streams this is.
    pub(super) stream: deliver::Stream,
    pub(super) store: Store,
    pub(super) clock: Clock,
    pub(super) config: Arc<DispatchConfig>,
    pub(super) handle: DispatchHandle,
}

impl Dispatcher {
    pub(super) async fn run(self, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            let result = self.session(&cancel, &mut backoff).await;
            if self.stream == deliver::Stream::Main {
                self.handle.set_connected(&self.carrier_id, false);
            }
            match result {
                Ok(()) => break,
                Err(error) => {
                    self.config
                        .metrics
                        .reconnects
                        .inc(&[("carrier", self.carrier_id.as_str())]);
                    tracing::warn!(carrier_id = %self.carrier_id, stream = self.stream.name(), %error, retry_in_ms = backoff.as_millis() as u64, "carrier stream ended");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One connected stream, until it fails (error) or `cancel` (Ok).
    async fn session(
        &self,
        cancel: &CancellationToken,
        backoff: &mut Duration,
    ) -> anyhow::Result<()> {
        let mut client = self.connect().await?;
        let (down, down_rx) =
            mpsc::channel::<pb::RelayToCarrier>(self.config.batches_in_flight + 4);
        let mut request = tonic::Request::new(ReceiverStream::new(down_rx));
        deliver::put_version(request.metadata_mut());
        deliver::put_stream(request.metadata_mut(), self.stream);
        // gRPC does not oblige a server to send its response headers before
        // it has something to say, and a carrier may send them only with its
        // first acknowledgement — which comes only after a batch. So batches
        // go down while the headers are awaited; acknowledgements are read,
        // and the carrier's protocol version checked, once they came (no
        // batch counts as handed over before). A carrier that stays silent
        // though batches are in flight is named at WARN.
        let mut response = Box::pin(async move { client.deliver(request).await });
        let mut up: Option<tonic::Streaming<pb::CarrierToRelay>> = None;
        let opened = tokio::time::Instant::now();
        let mut warned = false;

        let mut new_work = self.handle.new_work.subscribe();
        let mut seen = *new_work.borrow_and_update();
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state = StreamState {
            look_at_outbox: self.stream == deliver::Stream::Main,
            ..StreamState::default()
        };
        // The priority lane takes what the accepts hand over (`handed.rs`)
        // from now on; what they handed before is read below.
        let open_lane = (self.stream == deliver::Stream::Priority)
            .then(|| self.handle.handed.open(&self.carrier_id));
        loop {
            self.send_due(&mut state, &down).await?;
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                answered = &mut response, if up.is_none() => {
                    up = Some(self.stream_open(answered?)?);
                    *backoff = Duration::from_millis(100);
                }
                message = next_message(&mut up) => {
                    let Some(message) = message? else {
                        anyhow::bail!("carrier closed the stream");
                    };
                    self.on_message(message, &mut state, &down).await?;
                }
                () = handed_arrived(open_lane.as_ref()) => {
                    if let Some(lane) = &open_lane {
                        let (due, overflowed) = lane.handed.take();
                        state.handed.extend(due);
                        // Those left out are read with the lane's rows.
                        if overflowed {
                            state.lane.drained = false;
                        }
                    }
                }
                changed = new_work.changed() => {
                    changed?;
                    let work = *new_work.borrow_and_update();
                    if work.of(self.lane()) != seen.of(self.lane()) {
                        state.look_at_outbox = self.stream == deliver::Stream::Main;
                        state.lane.drained = false;
                    }
                    seen = work;
                }
                _ = poll.tick() => {
                    if up.is_none() && !state.in_flight.is_empty() && !warned && opened.elapsed() >= SILENT_CARRIER {
                        warned = true;
                        self.name_silent_carrier(opened.elapsed());
                    }
                    state.look_at_outbox = self.stream == deliver::Stream::Main;
                    (state.lane.catch_up, state.lane.drained) = (true, false);
                }
            }
        }
    }

    /// Sends what is due on this stream: on the main one erasure notices
    /// (one batch at a time, deleted when acknowledged), then the bulk lane;
    /// on the priority one its lane.
    async fn send_due(
        &self,
        state: &mut StreamState,
        down: &mpsc::Sender<pb::RelayToCarrier>,
    ) -> anyhow::Result<()> {
        if state.look_at_outbox && !state.notices_in_flight {
            state.look_at_outbox = false;
            state.notices_in_flight = self.send_notices(down).await?;
        }
        let mut batch = Batching {
            in_flight: &mut state.in_flight,
            next_batch_id: &mut state.next_batch_id,
            windows: &mut state.windows,
            down,
        };
        self.send_handed(&mut state.handed, &mut state.lane, &mut batch)
            .await?;
        self.fill(&mut state.lane, &mut batch).await
    }

    /// Sends deliveries the accepts handed over, in batches while the
    /// window has room. Those that find it full are left to the lane's
    /// read once it frees: a read sees what became of them meanwhile
    /// (skipped for a person who unregistered, cancelled, expired), a
    /// queue kept behind a slow carrier would not. A read of the lane
    /// sent those at or below its cursor already: SQLite commits in id
    /// order, so a read that returned a row saw every row below it (on
    /// PostgreSQL a row committed out of order waits for the catch-up
    /// read, as it would after a wake-up); those in flight went too.
    async fn send_handed(
        &self,
        handed: &mut Vec<DueDelivery>,
        lane: &mut LaneState,
        batch: &mut Batching<'_>,
    ) -> anyhow::Result<()> {
        if handed.is_empty() {
            return Ok(());
        }
        let in_flight = in_flight_ids(batch.in_flight);
        handed.retain(|d| d.id > lane.cursor && !in_flight.contains(&d.id));
        handed.sort_unstable_by_key(|d| d.id);
        let size = self.config.batch_size.max(1) as usize;
        while !handed.is_empty() && batch.in_flight.len() < self.window() {
            let rest = handed.split_off(handed.len().min(size));
            let due = std::mem::replace(handed, rest);
            self.send(due, batch).await?;
        }
        if !handed.is_empty() {
            handed.clear();
            lane.drained = false;
        }
        Ok(())
    }

    /// The lane this stream carries.
    fn lane(&self) -> Lane {
        match self.stream {
            deliver::Stream::Main => Lane::Bulk,
            deliver::Stream::Priority => Lane::Priority,
        }
    }

    /// How many of this stream's batches may be in flight at once.
    fn window(&self) -> usize {
        match self.stream {
            deliver::Stream::Main => self.config.batches_in_flight,
            deliver::Stream::Priority => PRIORITY_IN_FLIGHT,
        }
    }

    /// A message up the stream: an erasure ack frees the outbox, the rest
    /// is `handle_up`'s.
    async fn on_message(
        &self,
        message: pb::CarrierToRelay,
        state: &mut StreamState,
        down: &mpsc::Sender<pb::RelayToCarrier>,
    ) -> anyhow::Result<()> {
        if let Some(pb::carrier_to_relay::Kind::ErasureAck(ack)) = &message.kind {
            let ids: Vec<i64> = ack.notice_ids.iter().map(|id| *id as i64).collect();
            self.store.outbox_done(&self.carrier_id, &ids).await?;
            state.notices_in_flight = false;
            state.look_at_outbox = true;
        }
        self.handle_up(message, &mut state.in_flight, down).await
    }

    /// The carrier answered the stream: its protocol version checked, its
    /// messages to be read from now on.
    fn stream_open(
        &self,
        answered: tonic::Response<tonic::Streaming<pb::CarrierToRelay>>,
    ) -> anyhow::Result<tonic::Streaming<pb::CarrierToRelay>> {
        deliver::check_version("carrier", deliver::version_in(answered.metadata()))
            .map_err(anyhow::Error::msg)?;
        if self.stream == deliver::Stream::Main {
            self.handle.set_connected(&self.carrier_id, true);
        }
        tracing::info!(carrier_id = %self.carrier_id, stream = self.stream.name(), "carrier stream open");
        Ok(answered.into_inner())
    }

    /// Names (at WARN) a carrier silent for `silent` though batches were sent.
    fn name_silent_carrier(&self, silent: Duration) {
        tracing::warn!(
            carrier_id = %self.carrier_id,
            silent_secs = silent.as_secs(),
            "carrier has not answered the Deliver stream (no response headers, no acknowledgements) though batches were sent to it"
        );
    }

    /// Dials the carrier's registered endpoint.
    async fn connect(
        &self,
    ) -> anyhow::Result<
        pb::carrier_client::CarrierClient<
            tonic::service::interceptor::InterceptedService<
                tonic::transport::Channel,
                BearerInterceptor,
            >,
        >,
    > {
        let Some(endpoint) = self.store.carrier_endpoint(&self.carrier_id).await? else {
            anyhow::bail!("carrier is not registered");
        };
        let channel = self
            .config
            .tls
            .endpoint(&endpoint)?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect()
            .await?;
        Ok(pb::carrier_client::CarrierClient::with_interceptor(
            channel,
            BearerInterceptor::new(&self.config.deliver_token)?,
        )
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024))
    }

    /// Sends the carrier's oldest erasure notices, if any, as one batch;
    /// whether a batch went.
    async fn send_notices(&self, down: &mpsc::Sender<pb::RelayToCarrier>) -> anyhow::Result<bool> {
        let notices = self
            .store
            .outbox(&self.carrier_id, NOTICES_PER_BATCH)
            .await?;
        if notices.is_empty() {
            return Ok(false);
        }
        let erasures = notices
            .into_iter()
            .map(|(id, user_id, enterprise_id)| pb::Erasure {
                notice_id: id as u64,
                user_id,
                enterprise_id,
            })
            .collect();
        down.send(pb::RelayToCarrier {
            kind: Some(pb::relay_to_carrier::Kind::Erasures(pb::ErasureBatch {
                erasures,
            })),
        })
        .await?;
        Ok(true)
    }

    /// Sends due deliveries of the stream's lane in batches while fewer than
    /// its window are in flight, from where `state` stands.
    async fn fill(&self, state: &mut LaneState, batch: &mut Batching<'_>) -> anyhow::Result<()> {
        let LaneState {
            cursor,
            catch_up,
            drained,
        } = state;
        let (lane, window) = (self.lane(), self.window());
        if *catch_up && batch.in_flight.len() < window {
            *catch_up = false;
            self.catch_up(*cursor, batch).await?;
        }
        while !*drained && batch.in_flight.len() < window {
            let started = std::time::Instant::now();
            let due = self
                .store
                .due_in_lane(
                    &self.carrier_id,
                    lane,
                    *cursor..i64::MAX,
                    self.clock.now_ms(),
                    self.config.batch_size,
                )
                .await?;
            tracing::debug!(
                due = due.len(),
                ?lane,
                elapsed_us = started.elapsed().as_micros() as u64,
                "due deliveries read"
            );
            *drained = due.len() < self.config.batch_size as usize;
            let Some(last) = due.last() else {
                if batch.in_flight.is_empty() {
                    *cursor = 0;
                }
                break;
            };
            *cursor = last.id;
            // Rows handed over by their accepts (the priority lane only)
            // may be in flight above the cursor; still pending, the read
            // finds them again.
            let due: Vec<DueDelivery> = match lane {
                Lane::Priority => {
                    let in_flight = in_flight_ids(batch.in_flight);
                    due.into_iter()
                        .filter(|d| !in_flight.contains(&d.id))
                        .collect()
                }
                Lane::Bulk => due,
            };
            if !due.is_empty() {
                self.send(due, batch).await?;
            }
        }
        Ok(())
    }

    /// Reads the rows of the stream's lane below its lowest batch in flight
    /// (below `cursor` when none is) and sends them as one batch.
    async fn catch_up(&self, cursor: i64, batch: &mut Batching<'_>) -> anyhow::Result<()> {
        if cursor == 0 {
            return Ok(());
        }
        let lane = self.lane();
        let lowest_in_flight = batch
            .in_flight
            .values()
            .filter_map(|ids| ids.first().copied())
            .min()
            .unwrap_or(cursor + 1);
        let due = self
            .store
            .due_in_lane(
                &self.carrier_id,
                lane,
                0..lowest_in_flight,
                self.clock.now_ms(),
                self.config.batch_size,
            )
            .await?;
        if !due.is_empty() {
            tracing::debug!(due = due.len(), ?lane, "rows found below the cursor");
            self.send(due, batch).await?;
        }
        Ok(())
    }

    /// Sends `due` as one batch of the stream's lane and keeps it in flight.
    async fn send(&self, due: Vec<DueDelivery>, batch: &mut Batching<'_>) -> anyhow::Result<()> {
        let ids: Vec<i64> = due.iter().map(|d| d.id).collect();
        let traces = telemetry::step_per_message(
            "relay.hand_over",
            due.iter()
                .map(|d| (d.message_id.as_str(), d.message.trace_parent.as_str())),
        );
        let batch_id = *batch.next_batch_id;
        let deliveries = pb::DeliveryBatch {
            batch_id,
            // The carrier keeps the lane too: its push queue is by arrival otherwise.
            messages: pack(due, self.lane() == Lane::Priority, batch.windows, &traces),
        };
        batch
            .down
            .send(pb::RelayToCarrier {
                kind: Some(pb::relay_to_carrier::Kind::Batch(deliveries)),
            })
            .await?;
        batch.in_flight.insert(batch_id, ids);
        *batch.next_batch_id += 1;
        Ok(())
    }

    async fn handle_up(
        &self,
        message: pb::CarrierToRelay,
        in_flight: &mut InFlight,
        down: &mpsc::Sender<pb::RelayToCarrier>,
    ) -> anyhow::Result<()> {
        match message.kind {
            Some(pb::carrier_to_relay::Kind::BatchAck(ack)) => {
                if let Some(ids) = in_flight.remove(&ack.batch_id) {
                    let started = std::time::Instant::now();
                    crash::point(crash::RELAY_BATCH_ACKED);
                    self.store
                        .mark_handed_over_in(self.lane(), &ids, self.clock.now_ms())
                        .await?;
                    let attempts = ids.len();
                    self.handle.handed_over(&self.carrier_id, attempts as u64);
                    self.config
                        .metrics
                        .handed_over
                        .add(&[("carrier", self.carrier_id.as_str())], attempts as u64);
                    tracing::debug!(
                        batch_id = ack.batch_id,
                        deliveries = attempts,
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "batch handed over"
                    );
                }
            }
            Some(pb::carrier_to_relay::Kind::Receipts(batch)) => {
                let up_to_seq = batch.seq;
                telemetry::step_per_message(
                    "relay.receipt",
                    batch
                        .messages
                        .iter()
                        .map(|r| (r.message_id.as_str(), r.trace_parent.as_str())),
                );
                let receipts = receipts_from_wire(batch.messages);
                let follow_ups = self
                    .store
                    .record_receipts(&self.carrier_id, &receipts, self.clock.now_ms())
                    .await?;
                crash::point(crash::RELAY_RECEIPTS_STORED);
                if follow_ups > 0 {
                    // Openers' follow-ups, on whichever carriers they are with.
                    self.handle.new_work_in(Lane::Bulk);
                }
                let mut kinds: HashMap<&'static str, u64> = HashMap::new();
                for receipt in &receipts {
                    *kinds.entry(receipt.kind.as_str()).or_default() += 1;
                }
                for (kind, count) in kinds {
                    self.config.metrics.receipts.add(
                        &[("carrier", self.carrier_id.as_str()), ("kind", kind)],
                        count,
                    );
                }
                down.send(pb::RelayToCarrier {
                    kind: Some(pb::relay_to_carrier::Kind::ReceiptAck(pb::ReceiptAck {
                        up_to_seq,
                    })),
                })
                .await?;
            }
            Some(pb::carrier_to_relay::Kind::CountReport(report)) => {
                let report = count_report_from_wire(report, self.clock.now_ms());
                self.store
                    .store_count_report(&self.carrier_id, &report)
                    .await?;
            }
            // Handled in the session loop, which owns the notices in flight.
            Some(pb::carrier_to_relay::Kind::ErasureAck(_)) | None => {}
        }
        Ok(())
    }
}

/// Batches of each carrier's priority lane in flight on its stream.
const PRIORITY_IN_FLIGHT: usize = 2;

/// Where one carrier stream stands: its batches in flight, its lane, the
/// erasure notices (the main stream's).
struct StreamState {
    in_flight: InFlight,
    next_batch_id: u64,
    windows: WindowCache,
    /// A batch of erasure notices awaits its acknowledgement.
    notices_in_flight: bool,
    /// The outbox is looked at when woken for new work or by the poll, and
    /// after an acknowledgement, not on every message up the stream.
    look_at_outbox: bool,
    /// The lane the stream carries.
    lane: LaneState,
    /// Deliveries the accepts handed over, not sent yet (the priority lane).
    handed: Vec<DueDelivery>,
}

impl Default for StreamState {
    fn default() -> Self {
        Self {
            in_flight: HashMap::new(),
            next_batch_id: 1,
            windows: WindowCache::default(),
            notices_in_flight: false,
            look_at_outbox: true,
            lane: LaneState::default(),
            handed: Vec::new(),
        }
    }
}

/// Where one lane of a carrier stream stands.
#[derive(Clone, Copy, Debug, Default)]
struct LaneState {
    /// The lane's last id sent; it starts over from the lowest when the
    /// lane has nothing due and nothing in flight.
    cursor: i64,
    /// A row can appear below the cursor while the lane stays busy —
    /// committed out of id order by another writer, or released from
    /// waiting (a quiet period, a send time, a window) — so after each poll
    /// the rows below the lane's lowest batch in flight are read first, at
    /// the lane's next free place in the window; cleared once done.
    catch_up: bool,
    /// The last read came back short: nothing more is due until new work is
    /// signalled, receipts plan follow-ups, or the poll (an acknowledgement
    /// alone does not send the lane back to the database).
    drained: bool,
}

/// Batches sent and not yet acknowledged: their delivery ids by batch id.
type InFlight = HashMap<u64, Vec<i64>>;

/// What sending a batch on one carrier stream updates.
struct Batching<'a> {
    in_flight: &'a mut InFlight,
    next_batch_id: &'a mut u64,
    windows: &'a mut WindowCache,
    down: &'a mpsc::Sender<pb::RelayToCarrier>,
}

/// Erasure notices sent to a carrier at once.
const NOTICES_PER_BATCH: u32 = 1_000;

/// How long a carrier may stay silent with batches in flight before it is named.
const SILENT_CARRIER: Duration = Duration::from_secs(10);

/// The ids of every batch in flight.
fn in_flight_ids(in_flight: &InFlight) -> HashSet<i64> {
    in_flight.values().flatten().copied().collect()
}

/// Deliveries were handed to the stream's lane; never, for a stream
/// without one (the main stream).
async fn handed_arrived(lane: Option<&OpenLane>) {
    match lane {
        Some(lane) => lane.handed.arrived.notified().await,
        None => std::future::pending().await,
    }
}

/// The next message of an answered stream; never, while unanswered.
async fn next_message(
    up: &mut Option<tonic::Streaming<pb::CarrierToRelay>>,
) -> Result<Option<pb::CarrierToRelay>, tonic::Status> {
    match up {
        Some(up) => up.message().await,
        None => std::future::pending().await,
    }
}
