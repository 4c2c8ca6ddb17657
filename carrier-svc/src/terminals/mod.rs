//! Pushing to terminals: one link per attached terminal endpoint keeps a
//! `Terminal.Push` stream open, pushes held deliveries whose time has come,
//! and turns the terminal's delivered/read events into outbox receipts.
//!
//! Deliveries for users who are not attached simply stay held; attaching
//! (or a link reconnecting) pushes them. Unconfirmed pushes are pushed again
//! after a reconnect — terminals drop duplicate delivery ids. What goes
//! down the streams (held deliveries, notices, a priority batch pushed at
//! once) is `pushing.rs`.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chukei_proto::clock::from_timestamp;
use chukei_proto::common::v1 as common;
use chukei_proto::telemetry;
use chukei_proto::terminal::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::model::{Lanes, TerminalEvent, TerminalEventKind};

mod pushing;

pub(crate) use pushing::push_at_once;
use pushing::{PriorityStreamUp, push_due, push_notices};

const PUSH_BATCH: u32 = 1_000;

/// How many times each lane of the held batches was signalled: a link
/// reads a lane again when its count moved since it last looked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    priority: u64,
    bulk: u64,
}

impl Work {
    /// The lanes signalled since `seen`.
    fn since(self, seen: Self) -> Lanes {
        Lanes {
            priority: self.priority != seen.priority,
            bulk: self.bulk != seen.bulk,
        }
    }
}

/// One push stream's view of the signals: the lanes signalled since it
/// last looked.
struct Signals {
    receiver: watch::Receiver<Work>,
    seen: Work,
}

impl Signals {
    fn new(mut receiver: watch::Receiver<Work>) -> Self {
        let seen = *receiver.borrow_and_update();
        Self { receiver, seen }
    }

    /// Waits for the next signal: the lanes it names (an error when the
    /// sender is gone).
    async fn changed(&mut self) -> Result<Lanes, watch::error::RecvError> {
        self.receiver.changed().await?;
        let work = *self.receiver.borrow_and_update();
        let lanes = work.since(self.seen);
        self.seen = work;
        Ok(lanes)
    }
}

/// A cheap-to-clone handle to the terminal links.
#[derive(Clone, Debug)]
pub struct TerminalsHandle {
    new_work: Arc<watch::Sender<Work>>,
    endpoints: mpsc::Sender<String>,
    /// The carrier's own notices (a sign-in code) waiting for their
    /// endpoint's link, by endpoint.
    notices: Arc<std::sync::Mutex<HashMap<String, Vec<pb::PushedMessage>>>>,
    /// The request side of each link's priority stream while it is up, by
    /// endpoint: what a priority batch pushes at once ([`push_at_once`]).
    priority_streams: Arc<std::sync::Mutex<HashMap<Arc<str>, mpsc::Sender<pb::PushRequest>>>>,
}

impl TerminalsHandle {
    pub fn new() -> (Self, mpsc::Receiver<String>) {
        let (endpoints, receiver) = mpsc::channel(256);
        (
            Self {
                new_work: Arc::new(watch::channel(Work::default()).0),
                endpoints,
                notices: Arc::default(),
                priority_streams: Arc::default(),
            },
            receiver,
        )
    }

    /// Woken whenever deliveries may be pushable (the gateways listen too).
    pub fn subscribe(&self) -> watch::Receiver<Work> {
        self.new_work.subscribe()
    }

    /// Deliveries may be pushable in either lane: wake every link.
    pub fn new_work(&self) {
        self.new_work_in(Lanes::BOTH);
    }

    /// Deliveries may be pushable in `lanes` (a batch of the relay's
    /// priority lane wakes the priority streams only).
    pub fn new_work_in(&self, lanes: Lanes) {
        self.new_work.send_modify(|work| {
            work.priority += u64::from(lanes.priority);
            work.bulk += u64::from(lanes.bulk);
        });
    }

    /// Pushes the carrier's own `text` (no relay message: a sign-in code) to
    /// `user_id`'s terminal at `endpoint` as an SMS, with the next push of its
    /// link. A notice is not a delivery: it has no receipt, and it is lost if
    /// the link does not come up before this process stops.
    pub async fn notify(&self, endpoint: &str, user_id: &str, notice_id: &str, text: String) {
        let notice = pb::PushedMessage {
            delivery_id: format!("notice-{notice_id}"),
            message_id: String::new(),
            user_id: user_id.to_owned(),
            sms_segments: vec![text.clone()],
            content: Some(common::Content {
                text,
                ..Default::default()
            }),
            channel: common::Channel::Sms as i32,
            address: String::new(),
            trace_parent: String::new(),
        };
        self.notices
            .lock()
            .expect("notices lock")
            .entry(endpoint.to_owned())
            .or_default()
            .push(notice);
        self.ensure(endpoint).await;
    }

    fn take_notices(&self, endpoint: &str) -> Vec<pb::PushedMessage> {
        self.notices
            .lock()
            .expect("notices lock")
            .remove(endpoint)
            .unwrap_or_default()
    }

    /// The request side of `endpoint`'s priority stream, while its link is
    /// up, until the returned guard is dropped.
    fn priority_stream_up(
        &self,
        endpoint: &str,
        down: &mpsc::Sender<pb::PushRequest>,
    ) -> PriorityStreamUp {
        let endpoint: Arc<str> = Arc::from(endpoint);
        self.priority_streams
            .lock()
            .expect("priority streams lock")
            .insert(endpoint.clone(), down.clone());
        PriorityStreamUp {
            streams: self.priority_streams.clone(),
            endpoint,
            down: down.clone(),
        }
    }

    /// Makes sure a link to `endpoint` runs (and wakes it).
    pub async fn ensure(&self, endpoint: &str) {
        let _ = self.endpoints.send(endpoint.to_owned()).await;
        self.new_work();
    }
}

/// Owns the links until `cancel`: starts one per known endpoint, and one for
/// each endpoint a terminal attaches from. A link whose endpoint no longer has
/// any attached user ends; should users have attached there meanwhile, it is
/// started again.
pub async fn run(shared: Shared, mut endpoints: mpsc::Receiver<String>, cancel: CancellationToken) {
    let mut links: HashSet<String> = HashSet::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    let mut pending = shared.store.endpoints().await.unwrap_or_else(|error| {
        tracing::error!(%error, "could not list attached endpoints");
        Vec::new()
    });
    loop {
        let next = if let Some(endpoint) = pending.pop() {
            Some(endpoint)
        } else {
            tokio::select! {
                () = cancel.cancelled() => None,
                endpoint = endpoints.recv() => endpoint,
                Some(Ok(ended)) = tasks.join_next() => {
                    links.remove(&ended);
                    match shared.store.endpoint_in_use(&ended).await {
                        Ok(true) if !cancel.is_cancelled() => pending.push(ended),
                        Ok(_) => {}
                        Err(error) => tracing::warn!(%error, "could not check a terminal endpoint"),
                    }
                    continue;
                }
            }
        };
        let Some(endpoint) = next else { break };
        if links.insert(endpoint.clone()) {
            tasks.spawn(link(shared.clone(), endpoint, cancel.clone()));
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Keeps one endpoint's link up until `cancel`, or until no user is attached there.
async fn link(shared: Shared, endpoint: String, cancel: CancellationToken) -> String {
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        match session(&shared, &endpoint, &cancel, &mut backoff).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "terminal link down")
            }
        }
        if let Ok(false) = shared.store.endpoint_in_use(&endpoint).await {
            tracing::info!("terminal link closed: no user is attached there any more");
            break;
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    endpoint
}

async fn session(
    shared: &Shared,
    endpoint: &str,
    cancel: &CancellationToken,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    // Two streams, each on its own connection so that neither's HTTP/2
    // windows can hold the other: the bulk lane's (and the notices'), and
    // the priority lane's. On one stream a targeted push queued behind the
    // campaign's pushes already in the windows and in the terminal's hands
    // (that hop's p99 was 258 ms during a 1M broadcast, `docs/benchmarks.md`).
    let bulk = PushStream::open(shared, endpoint, Lanes::BULK).await?;
    let priority = PushStream::open(shared, endpoint, Lanes::PRIORITY).await?;
    shared
        .store
        .requeue_unconfirmed(endpoint, shared.gateways)
        .await?;
    // After the requeue, which would put a delivery pushed at once back
    // to held and push it again.
    let _up = shared
        .terminals
        .priority_stream_up(endpoint, &priority.down);
    tracing::info!("terminal link open");
    tokio::try_join!(
        carry(shared, endpoint, bulk, cancel, Some(backoff)),
        carry(shared, endpoint, priority, cancel, None),
    )?;
    Ok(())
}

type PushResponse = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    tonic::Response<tonic::Streaming<pb::TerminalEvents>>,
                    tonic::Status,
                >,
            > + Send,
    >,
>;

/// One of an endpoint's push streams: the lanes it carries, its request
/// side, and its response (the terminal's events) once the terminal answered.
struct PushStream {
    lanes: Lanes,
    down: mpsc::Sender<pb::PushRequest>,
    response: PushResponse,
    up: Option<tonic::Streaming<pb::TerminalEvents>>,
}

impl PushStream {
    /// Dials the terminal at `endpoint` on a connection of the stream's own
    /// and opens its push stream with a first request naming the carrier,
    /// so the terminal can route its events back.
    async fn open(shared: &Shared, endpoint: &str, lanes: Lanes) -> anyhow::Result<Self> {
        let channel = shared
            .tls
            .endpoint(endpoint)?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect()
            .await?;
        let mut client = pb::terminal_client::TerminalClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        let (down, down_rx) = mpsc::channel::<pb::PushRequest>(8);
        down.send(pb::PushRequest {
            messages: Vec::new(),
            carrier_id: shared.carrier_id.to_string(),
        })
        .await?;
        let mut request = tonic::Request::new(ReceiverStream::new(down_rx));
        if !lanes.bulk {
            chukei_proto::push::put_priority(request.metadata_mut());
        }
        Ok(Self {
            lanes,
            down,
            response: Box::pin(async move { client.push(request).await }),
            up: None,
        })
    }

    fn name(&self) -> &'static str {
        if self.lanes.bulk { "main" } else { "priority" }
    }
}

/// Pushes what is due in `stream`'s lanes and applies the terminal's events
/// from it, until `cancel` (Ok) or the stream fails. The main stream also
/// carries the notices, and its answer resets the link's `backoff`.
async fn carry(
    shared: &Shared,
    endpoint: &str,
    mut stream: PushStream,
    cancel: &CancellationToken,
    mut backoff: Option<&mut Duration>,
) -> anyhow::Result<()> {
    // gRPC does not oblige a server to send its response headers before it
    // has something to say, and some terminals (grpcio's servers) send them
    // only with their first events — which come only after a push. So the
    // push goes on while the headers are awaited, and the events are read
    // once they came; a terminal that stays silent though pushed to is named
    // at WARN.
    let opened = tokio::time::Instant::now();
    let mut pushed_unanswered = false;
    let mut warned = false;
    let mut signals = Signals::new(shared.terminals.new_work.subscribe());
    let mut poll = tokio::time::interval(shared.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Deliveries become due by new work (a batch accepted — in its lane —,
    // a terminal attached) or by the clock (a window opening), never by the
    // terminal's events: only those two read the held batches again.
    let mut may_be_due = stream.lanes;
    loop {
        let lanes = std::mem::take(&mut may_be_due);
        if lanes.any() && push_due(shared, endpoint, lanes, &stream.down).await? {
            pushed_unanswered |= stream.up.is_none();
        }
        if stream.lanes.bulk {
            push_notices(shared, endpoint, &stream.down).await?;
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            answered = &mut stream.response, if stream.up.is_none() => {
                stream.up = Some(answered?.into_inner());
                if let Some(backoff) = backoff.as_deref_mut() {
                    *backoff = Duration::from_millis(100);
                }
                if warned {
                    tracing::info!(endpoint, stream = stream.name(), "terminal answered the push stream at last");
                }
            }
            events = next_events(&mut stream.up) => {
                let Some(events) = events? else { anyhow::bail!("terminal closed the stream") };
                apply_events(shared, events).await?;
            }
            signalled = signals.changed() => {
                may_be_due = may_be_due.or(signalled?.and(stream.lanes));
            }
            _ = poll.tick() => {
                may_be_due = stream.lanes;
                if pushed_unanswered && stream.up.is_none() && !warned && opened.elapsed() >= SILENT_TERMINAL {
                    warned = true;
                    tracing::warn!(
                        endpoint,
                        stream = stream.name(),
                        silent_secs = opened.elapsed().as_secs(),
                        "terminal has not answered the push stream (no response headers, no events) though messages were pushed to it"
                    );
                }
            }
        }
    }
}

/// Applies a terminal's events; receipts they queued wake the relay link.
async fn apply_events(shared: &Shared, events: pb::TerminalEvents) -> anyhow::Result<()> {
    let traces = telemetry::step_per_message(
        "carrier.receipt",
        events
            .events
            .iter()
            .map(|e| (e.message_id.as_str(), e.trace_parent.as_str())),
    );
    let events: Vec<TerminalEvent> = events
        .events
        .into_iter()
        .filter_map(|e| event_from_wire(e, &traces))
        .collect();
    if shared.store.apply_terminal_events(&events).await? > 0 {
        shared.outbox_changed.send_modify(|g| *g += 1);
    }
    Ok(())
}

/// How long a terminal may stay silent after a push before it is named.
const SILENT_TERMINAL: Duration = Duration::from_secs(10);

/// The next events of an answered stream; never, while unanswered.
async fn next_events(
    up: &mut Option<tonic::Streaming<pb::TerminalEvents>>,
) -> Result<Option<pb::TerminalEvents>, tonic::Status> {
    match up {
        Some(up) => up.message().await,
        None => std::future::pending().await,
    }
}

fn event_from_wire(
    event: pb::TerminalEvent,
    traces: &HashMap<String, String>,
) -> Option<TerminalEvent> {
    let kind = match pb::EventKind::try_from(event.kind) {
        Ok(pb::EventKind::Delivered | pb::EventKind::Displayed) => TerminalEventKind::Delivered,
        Ok(pb::EventKind::Read) => TerminalEventKind::Read,
        Ok(pb::EventKind::Unsupported) => TerminalEventKind::Unsupported,
        _ => return None,
    };
    // A delivery id this carrier never gave out cannot be about one of its deliveries.
    let delivery_id = event.delivery_id.parse().ok().filter(|&id| id > 0)?;
    Some(TerminalEvent {
        trace_parent: telemetry::passed_on(traces, &event.message_id, event.trace_parent),
        delivery_id,
        message_id: event.message_id,
        kind,
        at: event.at.as_ref().map_or(0, from_timestamp),
        region: event.region,
    })
}
