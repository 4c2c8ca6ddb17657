//! Transfer: one dispatcher per registered carrier keeps a long-lived
//! `Carrier.Deliver` stream open, streams due deliveries down in batches, and
//! takes acks, receipts and count reports back up.
//!
//! A batch counts as handed over only when the carrier acks it; un-acked
//! batches are simply read again after a reconnect (carriers drop duplicate
//! delivery ids), so while a carrier is down its deliveries wait durably in the
//! database. This module is the relay's client-side gRPC edge for carriers:
//! it converts between prost types and the core's domain types, and it must
//! never hold a database transaction across an RPC.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::carrier::v1 as pb;
use chukei_proto::clock::{Clock, from_timestamp, to_timestamp};
use chukei_proto::common::v1 as common;
use chukei_proto::deliver;
use chukei_proto::telemetry;
use chukei_proto::window::Window;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::receipts::{CountReport, EventKind, MessageCount, Receipt};
use crate::storage::{DueDelivery, Lane, Store};
use crate::targeting::Channel;

/// How the dispatchers batch and pace.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    pub deliver_token: String,
    pub batch_size: u32,
    pub batches_in_flight: usize,
    pub poll_interval: Duration,
    pub metrics: crate::metrics::RelayMetrics,
    /// Each carrier's stream is held by one replica at a time.
    pub lease: crate::lease::Lease,
    /// How carriers' https:// endpoints are dialled (CA, client certificate).
    pub tls: chukei_proto::tls::TlsArgs,
}

/// A cheap-to-clone handle to the dispatch supervisor.
#[derive(Clone, Debug)]
pub struct DispatchHandle {
    new_work: Arc<watch::Sender<u64>>,
    commands: mpsc::Sender<String>,
    connected: Arc<Mutex<HashSet<String>>>,
    /// Recent hand-overs per carrier, for the drain estimates.
    throughput: Arc<Mutex<HashMap<String, Throughput>>>,
}

/// Hand-overs acknowledged by one carrier over the last [`THROUGHPUT_WINDOW`].
#[derive(Debug, Default)]
struct Throughput {
    acks: std::collections::VecDeque<(Instant, u64)>,
}

/// How far back the hand-over rate looks.
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(30);

impl Throughput {
    fn record(&mut self, at: Instant, attempts: u64) {
        self.acks.push_back((at, attempts));
        while self
            .acks
            .front()
            .is_some_and(|(when, _)| at.duration_since(*when) > THROUGHPUT_WINDOW)
        {
            self.acks.pop_front();
        }
    }

    /// Attempts per second over the window (`None`: nothing recent).
    fn rate(&self, now: Instant) -> Option<f64> {
        let (first, _) = self.acks.front()?;
        if now.duration_since(*first) > THROUGHPUT_WINDOW {
            return None;
        }
        let total: u64 = self.acks.iter().map(|(_, n)| n).sum();
        let span = now.duration_since(*first).max(Duration::from_secs(1));
        Some(total as f64 / span.as_secs_f64())
    }
}

impl DispatchHandle {
    /// New deliveries may be due: wake every dispatcher.
    pub fn new_work(&self) {
        self.new_work.send_modify(|generation| *generation += 1);
    }

    /// A carrier was registered or changed: (re)start its dispatcher.
    pub async fn carrier_changed(&self, carrier_id: &str) {
        let _ = self.commands.send(carrier_id.to_owned()).await;
    }

    /// Whether the relay currently holds an open stream to the carrier.
    pub fn is_connected(&self, carrier_id: &str) -> bool {
        self.connected
            .lock()
            .map(|set| set.contains(carrier_id))
            .unwrap_or(false)
    }

    /// How long `backlog` deliveries take at the recent hand-over rate of
    /// `carrier_id` (every carrier's together when `None`); `None` when
    /// nothing was handed over recently.
    pub fn drain_estimate(&self, carrier_id: Option<&str>, backlog: u64) -> Option<Duration> {
        let now = Instant::now();
        let throughput = self.throughput.lock().ok()?;
        let rate: f64 = match carrier_id {
            Some(carrier_id) => throughput.get(carrier_id)?.rate(now)?,
            None => throughput.values().filter_map(|t| t.rate(now)).sum(),
        };
        (rate > 0.0).then(|| Duration::from_secs_f64(backlog as f64 / rate))
    }

    fn handed_over(&self, carrier_id: &str, attempts: u64) {
        if let Ok(mut throughput) = self.throughput.lock() {
            throughput
                .entry(carrier_id.to_owned())
                .or_default()
                .record(Instant::now(), attempts);
        }
    }

    fn set_connected(&self, carrier_id: &str, connected: bool) {
        if let Ok(mut set) = self.connected.lock() {
            if connected {
                set.insert(carrier_id.to_owned());
            } else {
                set.remove(carrier_id);
            }
        }
    }
}

/// Starts the supervisor, which starts one dispatcher per known carrier and
/// owns them until `cancel`. Await the returned task to know they all stopped.
pub fn start(
    store: Store,
    clock: Clock,
    config: DispatchConfig,
    cancel: CancellationToken,
) -> (DispatchHandle, tokio::task::JoinHandle<()>) {
    let (commands_tx, commands_rx) = mpsc::channel(64);
    let handle = DispatchHandle {
        new_work: Arc::new(watch::channel(0).0),
        commands: commands_tx,
        connected: Arc::default(),
        throughput: Arc::default(),
    };
    let supervisor = Supervisor {
        store,
        clock,
        config: Arc::new(config),
        handle: handle.clone(),
    };
    let task = tokio::spawn(supervisor.run(commands_rx, cancel));
    (handle, task)
}

struct Supervisor {
    store: Store,
    clock: Clock,
    config: Arc<DispatchConfig>,
    handle: DispatchHandle,
}

impl Supervisor {
    /// Every lease period, and whenever a carrier changes: holds the lease of
    /// every registered carrier it can, runs a dispatcher for each carrier
    /// it holds, and stops the dispatcher of any carrier it lost.
    async fn run(self, mut commands: mpsc::Receiver<String>, cancel: CancellationToken) {
        let mut tasks = JoinSet::new();
        let mut running: HashMap<String, CancellationToken> = HashMap::new();
        let mut renew = tokio::time::interval(self.config.lease.renew_every());
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changed = tokio::select! {
                () = cancel.cancelled() => break,
                command = commands.recv() => match command {
                    Some(carrier_id) => Some(carrier_id),
                    None => break,
                },
                _ = renew.tick() => None,
            };
            let carriers = match self.store.carriers().await {
                Ok(carriers) => carriers.into_iter().map(|c| c.carrier_id),
                Err(error) => {
                    tracing::warn!(%error, "could not list carriers, will retry");
                    continue;
                }
            };
            for carrier_id in carriers {
                let held = self
                    .config
                    .lease
                    .hold(&self.store, &format!("carrier:{carrier_id}"))
                    .await;
                let restart = changed.as_deref() == Some(carrier_id.as_str());
                match (held, running.contains_key(&carrier_id)) {
                    (false, true) => {
                        tracing::info!(carrier_id = %carrier_id, "carrier lease lost, stopping its stream");
                        if let Some(token) = running.remove(&carrier_id) {
                            token.cancel();
                        }
                    }
                    (true, false) => self.spawn(&mut tasks, &mut running, carrier_id, &cancel),
                    (true, true) if restart => {
                        self.spawn(&mut tasks, &mut running, carrier_id, &cancel)
                    }
                    _ => {}
                }
            }
            // Reap finished dispatchers so the set does not grow.
            while tasks.try_join_next().is_some() {}
        }
        for token in running.values() {
            token.cancel();
        }
        while tasks.join_next().await.is_some() {}
    }

    /// (Re)starts the dispatcher of `carrier_id`.
    fn spawn(
        &self,
        tasks: &mut JoinSet<()>,
        running: &mut HashMap<String, CancellationToken>,
        carrier_id: String,
        cancel: &CancellationToken,
    ) {
        if let Some(previous) = running.remove(&carrier_id) {
            previous.cancel();
        }
        let token = cancel.child_token();
        running.insert(carrier_id.clone(), token.clone());
        tracing::info!(carrier_id = %carrier_id, replica = %self.config.lease.replica, "carrier lease held, opening its stream");
        let dispatcher = Dispatcher {
            carrier_id,
            store: self.store.clone(),
            clock: self.clock.clone(),
            config: self.config.clone(),
            handle: self.handle.clone(),
        };
        tasks.spawn(dispatcher.run(token));
    }
}

struct Dispatcher {
    carrier_id: String,
    store: Store,
    clock: Clock,
    config: Arc<DispatchConfig>,
    handle: DispatchHandle,
}

impl Dispatcher {
    async fn run(self, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            let result = self.session(&cancel, &mut backoff).await;
            self.handle.set_connected(&self.carrier_id, false);
            match result {
                Ok(()) => break,
                Err(error) => {
                    self.config
                        .metrics
                        .reconnects
                        .inc(&[("carrier", self.carrier_id.as_str())]);
                    tracing::warn!(carrier_id = %self.carrier_id, %error, retry_in_ms = backoff.as_millis() as u64, "carrier stream ended");
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
        let mut client = pb::carrier_client::CarrierClient::with_interceptor(
            channel,
            BearerInterceptor::new(&self.config.deliver_token)?,
        )
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
        let (down, down_rx) =
            mpsc::channel::<pb::RelayToCarrier>(self.config.batches_in_flight + 4);
        let mut request = tonic::Request::new(ReceiverStream::new(down_rx));
        deliver::put_version(request.metadata_mut());
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
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight: InFlight = HashMap::new();
        let mut cursors = [0_i64; 2];
        let mut next_batch_id = 1_u64;
        let mut windows = WindowCache::default();
        let mut notices_in_flight = false;
        // The outbox is looked at when woken for new work or by the poll,
        // and after an acknowledgement, not on every message up the stream.
        let mut look_at_outbox = true;
        let mut catch_up = [false; 2];
        // A lane whose last read came back short has nothing more due until
        // new work is signalled, receipts plan follow-ups, or the poll: an
        // acknowledgement alone does not send it back to the database.
        let mut drained = [false; 2];
        loop {
            // Erasure notices, one batch at a time: deleted when acknowledged.
            if look_at_outbox && !notices_in_flight {
                look_at_outbox = false;
                let notices = self
                    .store
                    .outbox(&self.carrier_id, NOTICES_PER_BATCH)
                    .await?;
                if !notices.is_empty() {
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
                    notices_in_flight = true;
                }
            }
            // The priority lane first, beside the bulk window; then the bulk lane.
            let mut batch = Batching {
                in_flight: &mut in_flight,
                next_batch_id: &mut next_batch_id,
                windows: &mut windows,
                down: &down,
            };
            self.fill(
                Lane::Priority,
                PRIORITY_IN_FLIGHT,
                &mut cursors[0],
                &mut catch_up[0],
                &mut drained[0],
                &mut batch,
            )
            .await?;
            self.fill(
                Lane::Bulk,
                self.config.batches_in_flight,
                &mut cursors[1],
                &mut catch_up[1],
                &mut drained[1],
                &mut batch,
            )
            .await?;
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                answered = &mut response, if up.is_none() => {
                    let answered = answered?;
                    deliver::check_version("carrier", deliver::version_in(answered.metadata()))
                        .map_err(anyhow::Error::msg)?;
                    up = Some(answered.into_inner());
                    self.handle.set_connected(&self.carrier_id, true);
                    *backoff = Duration::from_millis(100);
                    tracing::info!(carrier_id = %self.carrier_id, "carrier stream open");
                }
                message = next_message(&mut up) => {
                    let Some(message) = message? else {
                        anyhow::bail!("carrier closed the stream");
                    };
                    if let Some(pb::carrier_to_relay::Kind::ErasureAck(ack)) = &message.kind {
                        let ids: Vec<i64> = ack.notice_ids.iter().map(|id| *id as i64).collect();
                        self.store.outbox_done(&self.carrier_id, &ids).await?;
                        notices_in_flight = false;
                        look_at_outbox = true;
                    }
                    if matches!(message.kind, Some(pb::carrier_to_relay::Kind::Receipts(_))) {
                        drained = [false; 2];
                    }
                    self.handle_up(message, &mut in_flight, &down).await?;
                }
                changed = new_work.changed() => {
                    changed?;
                    look_at_outbox = true;
                    drained = [false; 2];
                }
                _ = poll.tick() => {
                    if up.is_none() && !in_flight.is_empty() && !warned && opened.elapsed() >= SILENT_CARRIER {
                        warned = true;
                        tracing::warn!(
                            carrier_id = %self.carrier_id,
                            silent_secs = opened.elapsed().as_secs(),
                            "carrier has not answered the Deliver stream (no response headers, no acknowledgements) though batches were sent to it"
                        );
                    }
                    look_at_outbox = true;
                    catch_up = [true; 2];
                    drained = [false; 2];
                }
            }
        }
    }

    /// Sends due deliveries of `lane` in batches while fewer than `window`
    /// of the lane's batches are in flight. `cursor` is the lane's last id
    /// sent; it starts over from the lowest when the lane has nothing due
    /// and nothing in flight. A row can appear below the cursor while the
    /// lane stays busy — committed out of id order by another writer, or
    /// released from waiting (a quiet period, a send time, a window) — so
    /// after each poll (`catch_up`, cleared once done) the rows below the
    /// lane's lowest batch in flight are read first, at the lane's next free
    /// place in the window. `drained`: the last read came back short.
    async fn fill(
        &self,
        lane: Lane,
        window: usize,
        cursor: &mut i64,
        catch_up: &mut bool,
        drained: &mut bool,
        batch: &mut Batching<'_>,
    ) -> anyhow::Result<()> {
        let in_lane = |in_flight: &InFlight| in_flight.values().filter(|(l, _)| *l == lane).count();
        if *catch_up && in_lane(batch.in_flight) < window {
            *catch_up = false;
            self.catch_up(lane, *cursor, batch).await?;
        }
        while !*drained && in_lane(batch.in_flight) < window {
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
                if in_lane(batch.in_flight) == 0 {
                    *cursor = 0;
                }
                break;
            };
            *cursor = last.id;
            self.send(lane, due, batch).await?;
        }
        Ok(())
    }

    /// Reads the rows of `lane` below its lowest batch in flight (below
    /// `cursor` when none is) and sends them as one batch.
    async fn catch_up(
        &self,
        lane: Lane,
        cursor: i64,
        batch: &mut Batching<'_>,
    ) -> anyhow::Result<()> {
        if cursor == 0 {
            return Ok(());
        }
        let lowest_in_flight = batch
            .in_flight
            .values()
            .filter(|(l, _)| *l == lane)
            .filter_map(|(_, ids)| ids.first().copied())
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
            self.send(lane, due, batch).await?;
        }
        Ok(())
    }

    /// Sends `due` as one batch of `lane` and keeps it in flight.
    async fn send(
        &self,
        lane: Lane,
        due: Vec<DueDelivery>,
        batch: &mut Batching<'_>,
    ) -> anyhow::Result<()> {
        let ids: Vec<i64> = due.iter().map(|d| d.id).collect();
        let traces = telemetry::step_per_message(
            "relay.hand_over",
            due.iter()
                .map(|d| (d.message_id.as_str(), d.trace_parent.as_str())),
        );
        let batch_id = *batch.next_batch_id;
        let deliveries = pb::DeliveryBatch {
            batch_id,
            // The carrier keeps the lane too: its push queue is by arrival otherwise.
            messages: pack(due, lane == Lane::Priority, batch.windows, &traces),
        };
        batch
            .down
            .send(pb::RelayToCarrier {
                kind: Some(pb::relay_to_carrier::Kind::Batch(deliveries)),
            })
            .await?;
        batch.in_flight.insert(batch_id, (lane, ids));
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
                if let Some((_, ids)) = in_flight.remove(&ack.batch_id) {
                    let started = std::time::Instant::now();
                    self.store
                        .mark_handed_over(&ids, self.clock.now_ms())
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
                self.store
                    .record_receipts(&self.carrier_id, &receipts, self.clock.now_ms())
                    .await?;
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
                let report = CountReport {
                    at: report
                        .at
                        .as_ref()
                        .map_or_else(|| self.clock.now_ms(), from_timestamp),
                    counts: report
                        .counts
                        .into_iter()
                        .map(|c| MessageCount {
                            message_id: c.message_id,
                            sent: c.sent,
                            opened: c.opened,
                            sms_segments: c.sms_segments,
                            unsupported: c.unsupported,
                            expired: c.expired,
                        })
                        .collect(),
                };
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

/// A batch's delivery ids grouped by message (batches are in id order, so a
/// message's deliveries mostly come in one run).
/// Batches of each carrier's priority lane in flight beside the bulk window.
const PRIORITY_IN_FLIGHT: usize = 2;

/// Batches sent and not yet acknowledged: their lane and delivery ids by message.
type InFlight = HashMap<u64, (Lane, Vec<i64>)>;

/// What sending a batch on one carrier stream updates.
struct Batching<'a> {
    in_flight: &'a mut InFlight,
    next_batch_id: &'a mut u64,
    windows: &'a mut WindowCache,
    down: &'a mpsc::Sender<pb::RelayToCarrier>,
}

/// Erasure notices sent to a carrier at once.
const NOTICES_PER_BATCH: u32 = 1_000;

/// Windows passed to carriers, decoded once per stored form (a zone lookup is
/// not free, and a campaign's deliveries all share one).
#[derive(Debug, Default)]
struct WindowCache(HashMap<String, Option<common::DeliveryWindow>>);

impl WindowCache {
    fn get(&mut self, stored: String) -> Option<common::DeliveryWindow> {
        self.0
            .entry(stored)
            .or_insert_with_key(|stored| match Window::decode(stored) {
                Ok(window) => Some(window.to_wire()),
                Err(error) => {
                    tracing::error!(%error, "stored window unreadable; delivering without it");
                    None
                }
            })
            .clone()
    }
}

/// A batch's deliveries packed per message (version 2 of the Deliver
/// protocol): each message's content and instructions once, its recipients as
/// columns, in the order the deliveries came (id order).
fn pack(
    due: Vec<DueDelivery>,
    priority: bool,
    windows: &mut WindowCache,
    traces: &HashMap<String, String>,
) -> Vec<pb::MessageDeliveries> {
    let mut records: Vec<pb::MessageDeliveries> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    for delivery in due {
        let index = match index_of.get(&delivery.message_id) {
            Some(&index) => index,
            None => {
                index_of.insert(delivery.message_id.clone(), records.len());
                records.push(pb::MessageDeliveries {
                    trace_parent: telemetry::passed_on(
                        traces,
                        &delivery.message_id,
                        delivery.trace_parent.clone(),
                    ),
                    message_id: delivery.message_id.clone(),
                    content: Some(common::Content {
                        text: delivery.content.text.clone(),
                        media_url: delivery.content.media_url.clone(),
                        subject: delivery.content.subject.clone(),
                        suggested_replies: delivery.content.suggested_replies.clone(),
                    }),
                    expires_at: Some(to_timestamp(delivery.expires_at)),
                    window: delivery.carrier_window.clone().and_then(|w| windows.get(w)),
                    single_attempt: delivery.single_attempt,
                    priority,
                    channel: Channel::number(delivery.channel) as i32,
                    not_before_ms: delivery.not_before,
                    ..Default::default()
                });
                records.len() - 1
            }
        };
        let record = &mut records[index];
        let channel = Channel::number(delivery.channel) as u8;
        // A column is written out only once a delivery differs from the
        // record's shared value; the entries before it take that value.
        if !record.channels.is_empty() || channel as i32 != record.channel {
            record
                .channels
                .resize(record.delivery_ids.len(), record.channel as u8);
            record.channels.push(channel);
        }
        if !record.not_before_each_ms.is_empty() || delivery.not_before != record.not_before_ms {
            let shared = record.not_before_ms;
            record
                .not_before_each_ms
                .resize(record.delivery_ids.len(), shared);
            record.not_before_each_ms.push(delivery.not_before);
        }
        record.delivery_ids.push(delivery.id as u64);
        record.user_ids.push(delivery.user_id);
    }
    records
}

/// How long a carrier may stay silent with batches in flight before it is named.
const SILENT_CARRIER: Duration = Duration::from_secs(10);

/// The next message of an answered stream; never, while unanswered.
async fn next_message(
    up: &mut Option<tonic::Streaming<pb::CarrierToRelay>>,
) -> Result<Option<pb::CarrierToRelay>, tonic::Status> {
    match up {
        Some(up) => up.message().await,
        None => std::future::pending().await,
    }
}

/// The receipts of packed records the relay can use; a malformed record or
/// a receipt of an unknown kind is dropped (logged), the rest are kept.
fn receipts_from_wire(records: Vec<pb::MessageReceipts>) -> Vec<Receipt> {
    let mut receipts = Vec::new();
    for mut record in records {
        let len = match deliver::receipts_len(&record) {
            Ok(len) => len,
            Err(error) => {
                tracing::warn!(%error, "malformed receipt record dropped");
                continue;
            }
        };
        for i in 0..len {
            let kind = match common::ReceiptKind::try_from(i32::from(record.kinds[i])) {
                Ok(common::ReceiptKind::Delivered) => EventKind::Delivered,
                Ok(common::ReceiptKind::Opened) => EventKind::Opened,
                Ok(common::ReceiptKind::Failed) => EventKind::Failed,
                Ok(common::ReceiptKind::Unsupported) => EventKind::Unsupported,
                Ok(common::ReceiptKind::Expired) => EventKind::Expired,
                _ => {
                    tracing::warn!(kind = record.kinds[i], "receipt of unknown kind dropped");
                    continue;
                }
            };
            if record.user_ids[i].is_empty() {
                tracing::warn!("receipt without a user dropped");
                continue;
            }
            receipts.push(Receipt {
                delivery_id: match record.delivery_ids[i] {
                    0 => None,
                    id => i64::try_from(id).ok(),
                },
                message_id: record.message_id.clone(),
                user_id: std::mem::take(&mut record.user_ids[i]),
                kind,
                channel: Channel::from_number(i64::from(record.channels[i])),
                at: record.at_ms[i],
                region: deliver::region(&record, i).to_owned(),
            });
        }
    }
    receipts
}
