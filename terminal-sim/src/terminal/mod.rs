//! `chukei.terminal.v1.Terminal` for a whole fleet: receives pushed messages
//! into each user's inbox (dropping duplicate delivery ids), answers with
//! delivered events at once, and — per the behaviour model, or by hand in
//! interactive mode — opens messages later, sending read events with the open
//! time and place to the carrier that pushed them. Read events for a carrier
//! whose stream is down are sent again when it reconnects.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use chukei_proto::clock::{Clock, to_timestamp};
use chukei_proto::telemetry;
use chukei_proto::terminal::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fleet::{Fleet, LOCAL_OFFSET_HOURS, REGIONS, SimUser};
use crate::rng::Rng;

mod push;

const HOUR_MS: i64 = 3_600_000;

/// Misbehaviour for chaos runs: terminals that send receipts twice and out
/// of order, and a journal of what reached the terminals to check against.
#[derive(Debug, Default)]
pub struct TerminalFaults {
    /// The share (0–1) of event batches sent twice.
    pub duplicate_events: f64,
    /// Event batches go in reverse order, each after a random delay of up
    /// to 200 ms (so reads may overtake deliveries).
    pub reorder_events: bool,
    /// Gets "message_id user_id delivery_id" for each message first received.
    pub journal: Option<std::fs::File>,
}

/// How simulated people open messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OpenMode {
    /// Each user's propensity per channel and active hours decide whether and when.
    Model,
    /// Everyone opens every message at once.
    Always,
    /// Nobody opens anything (interactive mode opens by hand).
    Never,
}

/// One received message, as the user's inbox shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxItem {
    pub delivery_id: String,
    pub message_id: String,
    pub carrier_id: String,
    /// `chukei.common.v1.Channel` value.
    pub channel: i32,
    pub text: String,
    /// As the channel's adapter rendered it: RCS media and suggested
    /// replies, the e-mail subject, SMS segments, the e-mail address or SNS handle.
    pub media_url: String,
    pub subject: String,
    pub suggested_replies: Vec<String>,
    pub sms_segments: Vec<String>,
    pub address: String,
    pub received_at: i64,
    pub opened_at: Option<i64>,
    /// Where the user was when opening (region path).
    pub opened_place: String,
    /// The message's trace on this terminal (W3C traceparent; empty: not traced).
    pub trace_parent: String,
}

/// Fleet-wide counts, for the local run's report and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub received: u64,
    pub duplicates: u64,
    pub opened: u64,
    /// Pushes refused because the terminal cannot show their channel.
    pub unsupported: u64,
}

/// The fleet's terminals: a cheap-to-clone handle.
#[derive(Clone, Debug)]
pub struct Terminals {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    seed: u64,
    clock: Clock,
    mode: OpenMode,
    /// The fleet hosted, kept once (setup reads it too) and found by user id
    /// through `index`: a second copy of every user was ~0.9 KB per terminal.
    fleet: Arc<Fleet>,
    index: HashMap<String, usize>,
    state: Mutex<State>,
    schedule: mpsc::UnboundedSender<(i64, String)>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    faults: Mutex<TerminalFaults>,
}

#[derive(Debug, Default)]
struct State {
    /// Boxed, and every map sized for one message per user up front: a
    /// million-user fleet grew its maps by doubling under this lock, and
    /// moving ~300-byte items stalled every stream for 0.2–0.7 s at each
    /// doubling (what `bench priority` at 1M showed as its p99).
    items: HashMap<String, Box<InboxItem>>,
    inbox: HashMap<String, Vec<String>>,
    user_of: HashMap<String, String>,
    sinks: HashMap<String, mpsc::UnboundedSender<pb::TerminalEvents>>,
    snapshot: Snapshot,
    /// Benchmarks: told (message id, when) as each message first arrives.
    arrivals: Option<mpsc::UnboundedSender<(String, std::time::Instant)>>,
}

impl State {
    fn for_users(users: usize) -> Self {
        Self {
            items: HashMap::with_capacity(users),
            inbox: HashMap::with_capacity(users),
            user_of: HashMap::with_capacity(users),
            ..Self::default()
        }
    }

    /// Puts `message` in its user's inbox, as received from `carrier_id` at `now`.
    fn keep(
        &mut self,
        carrier_id: &str,
        message: pb::PushedMessage,
        trace_parent: String,
        now: i64,
    ) {
        self.inbox
            .entry(message.user_id.clone())
            .or_default()
            .push(message.delivery_id.clone());
        let content = message.content.unwrap_or_default();
        self.items.insert(
            message.delivery_id.clone(),
            Box::new(InboxItem {
                delivery_id: message.delivery_id,
                message_id: message.message_id,
                carrier_id: carrier_id.to_owned(),
                channel: message.channel,
                text: content.text,
                media_url: content.media_url,
                subject: content.subject,
                suggested_replies: content.suggested_replies,
                sms_segments: message.sms_segments,
                address: message.address,
                received_at: now,
                opened_at: None,
                opened_place: String::new(),
                trace_parent,
            }),
        );
    }
}

impl Terminals {
    /// Starts the open scheduler; it and every stream task stop on `cancel`.
    pub fn new(fleet: Arc<Fleet>, clock: Clock, mode: OpenMode, cancel: CancellationToken) -> Self {
        Self::with_faults(fleet, clock, mode, cancel, TerminalFaults::default())
    }

    /// [`Terminals::new`] that misbehaves as `faults` say.
    pub fn with_faults(
        fleet: Arc<Fleet>,
        clock: Clock,
        mode: OpenMode,
        cancel: CancellationToken,
        faults: TerminalFaults,
    ) -> Self {
        let (schedule, scheduled) = mpsc::unbounded_channel();
        let terminals = Self {
            inner: Arc::new(Inner {
                seed: fleet.seed,
                clock,
                mode,
                index: fleet
                    .users
                    .iter()
                    .enumerate()
                    .map(|(i, u)| (u.user_id.clone(), i))
                    .collect(),
                state: Mutex::new(State::for_users(fleet.users.len())),
                fleet,
                schedule,
                tasks: TaskTracker::new(),
                cancel,
                faults: Mutex::new(faults),
            }),
        };
        terminals
            .inner
            .tasks
            .spawn(terminals.clone().run_scheduler(scheduled));
        terminals
    }

    /// Waits for every task this handle started (after `cancel`).
    pub async fn stopped(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// The user this fleet hosts as `user_id`.
    fn user(&self, user_id: &str) -> Option<&SimUser> {
        self.inner.fleet.users.get(*self.inner.index.get(user_id)?)
    }

    /// The fleet these terminals host.
    pub fn fleet(&self) -> &Fleet {
        &self.inner.fleet
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state().snapshot
    }

    /// For latency benchmarks: from now on, each message's first arrival at
    /// a terminal is sent here with the instant it arrived (real time).
    pub fn watch_arrivals(&self) -> mpsc::UnboundedReceiver<(String, std::time::Instant)> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.state().arrivals = Some(sender);
        receiver
    }

    /// A user's inbox, oldest first.
    pub fn inbox(&self, user_id: &str) -> Vec<InboxItem> {
        let state = self.state();
        state
            .inbox
            .get(user_id)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| state.items.get(id).map(|item| (**item).clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every user who received `message_id`, with the item.
    pub fn recipients(&self, message_id: &str) -> HashMap<String, InboxItem> {
        let state = self.state();
        state
            .items
            .values()
            .filter(|item| item.message_id == message_id)
            .filter_map(|item| {
                Some((
                    state.user_of.get(&item.delivery_id)?.clone(),
                    (**item).clone(),
                ))
            })
            .collect()
    }

    /// Opens a message by hand (interactive mode). False when unknown or already open.
    pub fn open(&self, delivery_id: &str) -> bool {
        self.fire_open(delivery_id, self.inner.clock.now_ms())
    }

    fn receive(
        &self,
        carrier_id: &str,
        messages: Vec<pb::PushedMessage>,
    ) -> Vec<pb::TerminalEvent> {
        let now = self.inner.clock.now_ms();
        let mut events = Vec::with_capacity(messages.len());
        let mut opens = Vec::new();
        let traces = telemetry::step_per_message(
            "terminal.receive",
            messages
                .iter()
                .map(|m| (m.message_id.as_str(), m.trace_parent.as_str())),
        );
        {
            let mut state = self.state();
            for message in messages {
                let Some(user) = self.user(&message.user_id) else {
                    tracing::warn!("push for a user this fleet does not host dropped");
                    continue;
                };
                if message.message_id.is_empty() {
                    // The carrier's own notice (a sign-in code): shown, not
                    // counted, confirmed or opened.
                    if !state.items.contains_key(&message.delivery_id) {
                        state.keep(carrier_id, message, String::new(), now);
                    }
                    continue;
                }
                let trace_parent = telemetry::passed_on(
                    &traces,
                    &message.message_id,
                    message.trace_parent.clone(),
                );
                let channel = usize::try_from(message.channel).unwrap_or(0);
                if !user
                    .behaviour
                    .supports
                    .get(channel)
                    .copied()
                    .unwrap_or(false)
                {
                    events.push(pb::TerminalEvent {
                        delivery_id: message.delivery_id,
                        message_id: message.message_id,
                        user_id: message.user_id,
                        kind: pb::EventKind::Unsupported as i32,
                        at: Some(to_timestamp(now)),
                        region: String::new(),
                        trace_parent,
                    });
                    state.snapshot.unsupported += 1;
                    continue;
                }
                events.push(pb::TerminalEvent {
                    delivery_id: message.delivery_id.clone(),
                    message_id: message.message_id.clone(),
                    user_id: message.user_id.clone(),
                    kind: pb::EventKind::Delivered as i32,
                    at: Some(to_timestamp(now)),
                    region: user.home_region.clone(),
                    trace_parent: trace_parent.clone(),
                });
                if let Some(item) = state.items.get(&message.delivery_id) {
                    // A re-push after a lost confirmation: confirm again, and repeat the read if any.
                    if let Some(opened_at) = item.opened_at {
                        events.push(read_event(item, &message.user_id, opened_at));
                    }
                    state.snapshot.duplicates += 1;
                    continue;
                }
                state.snapshot.received += 1;
                if let Some(arrivals) = &state.arrivals {
                    let _ = arrivals.send((message.message_id.clone(), std::time::Instant::now()));
                }
                self.journal(&message);
                if let Some(at) = self.open_time(user, &message, now) {
                    opens.push((at, message.delivery_id.clone()));
                }
                state
                    .user_of
                    .insert(message.delivery_id.clone(), message.user_id.clone());
                state.keep(carrier_id, message, trace_parent, now);
            }
        }
        for open in opens {
            let _ = self.inner.schedule.send(open);
        }
        events
    }

    /// When (if at all) `user` opens `message`, decided from the seed alone.
    fn open_time(&self, user: &SimUser, message: &pb::PushedMessage, now: i64) -> Option<i64> {
        match self.inner.mode {
            OpenMode::Never => None,
            OpenMode::Always => Some(now),
            OpenMode::Model => {
                let mut rng = Rng::for_labels(
                    self.inner.seed,
                    &["open", &user.user_id, &message.message_id],
                );
                let channel = usize::try_from(message.channel).unwrap_or(0).min(4);
                if !rng.chance(user.behaviour.open_propensity[channel]) {
                    return None;
                }
                let local_hour = ((now / HOUR_MS + LOCAL_OFFSET_HOURS).rem_euclid(24)) as u32;
                let start = user.behaviour.active_start_hour;
                let hours_into = (local_hour + 24 - start) % 24;
                if hours_into < user.behaviour.active_hours {
                    // Active now: open within the hour, most within minutes.
                    let minutes = (-(1.0 - rng.unit()).ln() * 15.0).min(60.0);
                    Some(now + (minutes * 60_000.0) as i64)
                } else {
                    let wait_hours = i64::from(24 - hours_into);
                    let next_start = (now / HOUR_MS + wait_hours) * HOUR_MS;
                    Some(next_start + rng.below(HOUR_MS as u64) as i64)
                }
            }
        }
    }

    async fn run_scheduler(self, mut scheduled: mpsc::UnboundedReceiver<(i64, String)>) {
        let mut queue: BinaryHeap<Reverse<(i64, String)>> = BinaryHeap::new();
        loop {
            let next_at = queue.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                () = self.inner.cancel.cancelled() => {
                    // Ends every event stream, so the server can shut down.
                    self.state().sinks.clear();
                    return;
                }
                item = scheduled.recv() => match item {
                    Some(item) => queue.push(Reverse(item)),
                    None => return,
                },
                () = self.inner.clock.sleep_until(next_at.unwrap_or(i64::MAX)), if next_at.is_some() => {
                    let now = self.inner.clock.now_ms();
                    while queue.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                        if let Some(Reverse((at, delivery_id))) = queue.pop() {
                            // Dated when the person opened it, even when the
                            // clock jumped past that moment.
                            self.fire_open(&delivery_id, at);
                        }
                    }
                }
            }
        }
    }

    /// Marks the delivery opened and sends its read event (re-sent when the
    /// carrier's stream comes back, if it is down).
    fn fire_open(&self, delivery_id: &str, at: i64) -> bool {
        let mut state = self.state();
        let Some(user_id) = state.user_of.get(delivery_id).cloned() else {
            return false;
        };
        let place = self.user(&user_id).map_or_else(String::new, |user| {
            let mut rng = Rng::for_labels(self.inner.seed, &["place", &user_id, delivery_id]);
            if rng.chance(user.behaviour.away_share) {
                rng.pick(REGIONS).to_string()
            } else {
                user.home_region.clone()
            }
        });
        let Some(item) = state.items.get_mut(delivery_id) else {
            return false;
        };
        if item.opened_at.is_some() {
            return false;
        }
        item.opened_at = Some(at);
        item.opened_place = place;
        let event = read_event(item, &user_id, at);
        let carrier_id = item.carrier_id.clone();
        state.snapshot.opened += 1;
        if let Some(sink) = state.sinks.get(&carrier_id).cloned() {
            drop(state);
            self.send_events(&sink, vec![event]);
        }
        true
    }

    fn journal(&self, message: &pb::PushedMessage) {
        use std::io::Write;
        let mut faults = self.faults();
        if let Some(journal) = faults.journal.as_mut()
            && let Err(error) = writeln!(
                journal,
                "{} {} {}",
                message.message_id, message.user_id, message.delivery_id
            )
        {
            tracing::warn!(%error, "journal write failed");
        }
    }

    fn faults(&self) -> MutexGuard<'_, TerminalFaults> {
        self.inner
            .faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends events to a carrier: as they are, or twice and out of order
    /// when the faults say so. `false`: the stream is gone.
    fn send_events(
        &self,
        sink: &mpsc::UnboundedSender<pb::TerminalEvents>,
        mut events: Vec<pb::TerminalEvent>,
    ) -> bool {
        let (duplicate, reorder) = {
            let faults = self.faults();
            (faults.duplicate_events, faults.reorder_events)
        };
        if duplicate == 0.0 && !reorder {
            return sink.send(pb::TerminalEvents { events }).is_ok();
        }
        let label = events.first().map_or("", |e| e.delivery_id.as_str());
        let mut rng = Rng::for_labels(
            self.inner.seed,
            &["faults", label, &events.len().to_string()],
        );
        let copies = if rng.chance(duplicate) { 2 } else { 1 };
        if !reorder {
            for _ in 0..copies {
                if sink
                    .send(pb::TerminalEvents {
                        events: events.clone(),
                    })
                    .is_err()
                {
                    return false;
                }
            }
            return true;
        }
        events.reverse();
        let delay = std::time::Duration::from_millis(rng.below(200));
        let late = sink.clone();
        self.inner.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            for _ in 0..copies {
                let _ = late.send(pb::TerminalEvents {
                    events: events.clone(),
                });
            }
        });
        !sink.is_closed()
    }

    /// A carrier's stream is (re)open: route its events there, and send again
    /// every read of its messages — a read sent just before its previous stream
    /// broke may never have been recorded, and the carrier drops repeats.
    fn attach_sink(&self, carrier_id: &str, sink: mpsc::UnboundedSender<pb::TerminalEvents>) {
        let mut state = self.state();
        let events: Vec<pb::TerminalEvent> = state
            .items
            .values()
            .filter(|item| item.carrier_id == carrier_id)
            .filter_map(|item| {
                let opened_at = item.opened_at?;
                let user_id = state.user_of.get(&item.delivery_id)?;
                Some(read_event(item, user_id, opened_at))
            })
            .collect();
        if !events.is_empty() {
            let _ = sink.send(pb::TerminalEvents { events });
        }
        state.sinks.insert(carrier_id.to_owned(), sink);
    }
}

fn read_event(item: &InboxItem, user_id: &str, at: i64) -> pb::TerminalEvent {
    let traces = telemetry::step_per_message(
        "terminal.read",
        [(item.message_id.as_str(), item.trace_parent.as_str())],
    );
    pb::TerminalEvent {
        trace_parent: telemetry::passed_on(&traces, &item.message_id, item.trace_parent.clone()),
        delivery_id: item.delivery_id.clone(),
        message_id: item.message_id.clone(),
        user_id: user_id.to_owned(),
        kind: pb::EventKind::Read as i32,
        at: Some(to_timestamp(at)),
        region: item.opened_place.clone(),
    }
}
