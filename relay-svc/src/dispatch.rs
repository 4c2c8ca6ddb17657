//! Transfer: two dispatchers per registered carrier each keep a long-lived
//! `Carrier.Deliver` stream open — the main one for the bulk lane (and
//! erasure notices, receipts and count reports), the other for the
//! priority lane alone — stream due deliveries down in batches, and take
//! acks (and on the main stream receipts and count reports) back up.
//!
//! A batch counts as handed over only when the carrier acks it; un-acked
//! batches are simply read again after a reconnect (carriers drop duplicate
//! delivery ids), so while a carrier is down its deliveries wait durably in the
//! database. This module is the relay's client-side gRPC edge for carriers:
//! it converts between prost types and the core's domain types, and it must
//! never hold a database transaction across an RPC.

mod handed;
mod stream;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chukei_proto::clock::Clock;
use chukei_proto::deliver;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::storage::{DueDelivery, DueNowSink, Store};
use handed::HandedLanes;
use stream::Dispatcher;

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
    new_work: Arc<watch::Sender<Work>>,
    commands: mpsc::Sender<String>,
    connected: Arc<Mutex<HashSet<String>>>,
    /// Recent hand-overs per carrier, for the drain estimates.
    throughput: Arc<Mutex<HashMap<String, Throughput>>>,
    /// Deliveries handed over by their accepts, per priority stream.
    handed: Arc<HandedLanes>,
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

/// How many times each lane was signalled: a dispatcher reads a lane again
/// when its count moved since it last looked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Work {
    pub(crate) priority: u64,
    /// Also the erasure notices' outbox.
    pub(crate) bulk: u64,
}

impl Work {
    /// How many times `lane` was signalled.
    pub(crate) fn of(self, lane: crate::storage::Lane) -> u64 {
        match lane {
            crate::storage::Lane::Priority => self.priority,
            crate::storage::Lane::Bulk => self.bulk,
        }
    }
}

impl DispatchHandle {
    /// New deliveries may be due in either lane, or erasure notices wait:
    /// wake every dispatcher.
    pub fn new_work(&self) {
        self.new_work.send_modify(|work| {
            work.priority += 1;
            work.bulk += 1;
        });
    }

    /// New deliveries may be due in `lane` only (a targeted message's):
    /// the dispatchers read that lane, not the other.
    pub fn new_work_in(&self, lane: crate::storage::Lane) {
        self.new_work.send_modify(|work| match lane {
            crate::storage::Lane::Priority => work.priority += 1,
            crate::storage::Lane::Bulk => work.bulk += 1,
        });
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

/// The accepts hand their due attempts to the carrier's priority stream
/// when it runs here; otherwise its lane is signalled, as for any other
/// writer (another replica's stream reads it at its poll).
impl DueNowSink for DispatchHandle {
    fn due_now(&self, carrier_id: &str, deliveries: Vec<DueDelivery>) {
        if !self.handed.give(carrier_id, deliveries) {
            self.new_work_in(crate::storage::Lane::Priority);
        }
    }
}

/// Starts the supervisor, which starts one dispatcher per known carrier and
/// owns them until `cancel`; the store hands it deliveries due at once. Await the returned task to know they all stopped.
pub fn start(
    store: Store,
    clock: Clock,
    config: DispatchConfig,
    cancel: CancellationToken,
) -> (DispatchHandle, tokio::task::JoinHandle<()>) {
    let (commands_tx, commands_rx) = mpsc::channel(64);
    let handle = DispatchHandle {
        new_work: Arc::new(watch::channel(Work::default()).0),
        commands: commands_tx,
        connected: Arc::default(),
        throughput: Arc::default(),
        handed: Arc::default(),
    };
    store.hand_due_now_to(Arc::new(handle.clone()));
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
        tracing::info!(carrier_id = %carrier_id, replica = %self.config.lease.replica, "carrier lease held, opening its streams");
        for stream in [deliver::Stream::Main, deliver::Stream::Priority] {
            let dispatcher = Dispatcher {
                carrier_id: carrier_id.clone(),
                stream,
                store: self.store.clone(),
                clock: self.clock.clone(),
                config: self.config.clone(),
                handle: self.handle.clone(),
            };
            tasks.spawn(dispatcher.run(token.clone()));
        }
    }
}
