//! Real channels: instead of pushing to a terminal, the carrier hands a
//! channel's deliveries to a network it already runs — SMS to its SMSC over
//! SMPP ([`smpp`]), e-mail to its mail server over SMTP ([`smtp`], with the
//! open pixel and click redirect of [`tracking`]).
//!
//! One interface, [`Adapter`]: a delivery is *handed* (the network took it,
//! under ids of its own; refused it for good; or cannot take it now) and
//! the network *reports* later what became of each id (delivered, failed,
//! read). Everything else is the carrier's usual bookkeeping: a handed
//! delivery is `pushed`, a report moves it to delivered, opened or failed
//! and queues its receipt for the relay, windows, expiry and the priority
//! order are those of the terminal push. The ids a network gave are kept in
//! the carrier's database in the transaction that marks a delivery pushed,
//! so a receipt that arrives after a restart still finds its delivery, and
//! a report is acknowledged to the network only once it is stored.
//!
//! Phone numbers and addresses go to the network and nowhere else: never
//! into logs, metrics or the relay.

mod args;
pub mod bounces;
pub mod smpp;
pub mod smtp;
pub mod tracking;

pub use crate::model::{Handed, NetworkReport, Outcome, id_forms};
pub use args::GatewayArgs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::Shared;
use crate::channels::{self, Rendered};
use crate::model::{CHANNEL_EMAIL, CHANNEL_SMS, Outgoing, Slot};

/// Deliveries read for a gateway at a time.
const HAND_BATCH: u32 = 500;

/// A report from a network, with who to tell once it is stored.
#[derive(Debug)]
pub struct Report {
    /// What the store keeps.
    pub said: NetworkReport,
    /// Answered once the report is durable (an SMSC's receipt is acked then).
    pub stored: Option<oneshot::Sender<()>>,
}

impl Report {
    /// A report about `external_id`, as of its arrival.
    pub fn new(
        external_id: String,
        outcome: Outcome,
        error: String,
        stored: Option<oneshot::Sender<()>>,
    ) -> Self {
        Self {
            said: NetworkReport {
                external_id,
                outcome,
                error,
                at: 0,
            },
            stored,
        }
    }
}

/// One configured gateway.
#[derive(Clone, Debug)]
pub enum Adapter {
    Smpp(smpp::Smpp),
    Smtp(Box<smtp::Smtp>),
}

impl Adapter {
    /// Its name in the database and in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Smpp(_) => "smpp",
            Self::Smtp(_) => "smtp",
        }
    }

    fn channel(&self) -> i64 {
        match self {
            Self::Smpp(_) => CHANNEL_SMS,
            Self::Smtp(_) => CHANNEL_EMAIL,
        }
    }

    /// Deliveries handed at once.
    fn concurrency(&self) -> usize {
        match self {
            Self::Smpp(smpp) => smpp.window(),
            Self::Smtp(_) => 4,
        }
    }

    async fn hand(&self, outgoing: &Outgoing, rendered: &Rendered) -> Handed {
        match self {
            Self::Smpp(smpp) => smpp.hand(outgoing, rendered).await,
            Self::Smtp(smtp) => smtp.hand(outgoing, rendered).await,
        }
    }

    /// How long to wait before trying deliveries the network put off.
    fn pause(&self) -> Duration {
        match self {
            Self::Smpp(smpp) => smpp.pause(),
            Self::Smtp(_) => Duration::from_secs(5),
        }
    }
}

/// Starts the configured gateways (and the tracking endpoint) as tasks of
/// `shared`; returns the tracking endpoint's address when it listens.
pub async fn start(shared: &Shared, args: &GatewayArgs) -> anyhow::Result<Option<SocketAddr>> {
    let mut tracking_addr = None;
    if let Some(url) = &args.smpp_url {
        let (reports, received) = mpsc::channel(4096);
        let settings = smpp::SmppSettings::from_args(args, url)?;
        let smpp = smpp::Smpp::start(shared, settings, reports);
        spawn(shared, Adapter::Smpp(smpp), received);
    }
    if let Some(url) = &args.smtp_url {
        let (reports, received) = mpsc::channel(4096);
        let signer = if args.signs() {
            Some(tracking::Signer::from_args(args)?)
        } else {
            None
        };
        if let (Some(addr), Some(signer)) = (args.tracking_listen, &signer) {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracking_addr = Some(listener.local_addr()?);
            tracing::info!(addr = %listener.local_addr()?, "tracking endpoint listening");
            shared.tasks.spawn(tracking::serve(
                listener,
                signer.clone(),
                reports.clone(),
                shared.cancel.clone(),
            ));
        }
        if let (Some(addr), Some(signer)) = (args.bounce_listen, &signer) {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, "bounce receiver listening");
            shared.tasks.spawn(bounces::serve(
                listener,
                signer.clone(),
                shared.store.clone(),
                reports.clone(),
                shared.cancel.clone(),
            ));
        }
        let settings = smtp::SmtpSettings::from_args(args, url)?;
        let smtp = smtp::Smtp::new(settings, signer, shared.metrics.gateway.clone())?;
        spawn(shared, Adapter::Smtp(Box::new(smtp)), received);
    }
    Ok(tracking_addr)
}

fn spawn(shared: &Shared, adapter: Adapter, reports: mpsc::Receiver<Report>) {
    tracing::info!(gateway = adapter.name(), "gateway started");
    shared
        .tasks
        .spawn(apply_reports(shared.clone(), adapter.name(), reports));
    shared.tasks.spawn(hand_over(shared.clone(), adapter));
}

/// Hands the gateway's due deliveries to it, `concurrency` at a time, and
/// records what it answered; sleeps until new work, the poll, or (after the
/// network put some off) its pause.
async fn hand_over(shared: Shared, adapter: Adapter) {
    let mut new_work = shared.terminals.subscribe();
    let mut poll = tokio::time::interval(shared.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let pause = match hand_due(&shared, &adapter).await {
            Ok(true) => Some(adapter.pause()),
            Ok(false) => None,
            Err(error) => {
                tracing::warn!(gateway = adapter.name(), %error, "gateway hand-over failed");
                Some(Duration::from_secs(1))
            }
        };
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            () = sleep_or_never(pause) => {}
            changed = new_work.changed(), if pause.is_none() => if changed.is_err() { return },
            _ = poll.tick(), if pause.is_none() => {}
        }
    }
}

async fn sleep_or_never(pause: Option<Duration>) {
    match pause {
        Some(pause) => tokio::time::sleep(pause).await,
        None => std::future::pending().await,
    }
}

/// One pass over what is due; whether the network put something off.
async fn hand_due(shared: &Shared, adapter: &Adapter) -> anyhow::Result<bool> {
    let limit = Arc::new(Semaphore::new(adapter.concurrency()));
    let mut put_off = false;
    loop {
        let due = shared
            .store
            .due_on_channel(adapter.channel(), shared.clock.now_ms(), HAND_BATCH)
            .await?;
        if due.is_empty() {
            return Ok(put_off);
        }
        let mut unsupported: Vec<Slot> = Vec::new();
        let mut handing: JoinSet<anyhow::Result<(Outgoing, Handed)>> = JoinSet::new();
        for outgoing in due {
            let rendered = match channels::render(
                outgoing.channel,
                &outgoing.text,
                &outgoing.media_url,
                &outgoing.subject,
                &outgoing.suggested_replies,
                &outgoing.contact,
            ) {
                Ok(rendered)
                    if adapter.channel() != CHANNEL_SMS
                        || !outgoing.contact.phone_number.is_empty() =>
                {
                    rendered
                }
                _ => {
                    unsupported.push(outgoing.slot);
                    continue;
                }
            };
            let limit = limit.clone();
            let adapter = adapter.clone();
            handing.spawn(async move {
                let _permit = limit.acquire_owned().await?;
                let handed = adapter.hand(&outgoing, &rendered).await;
                Ok((outgoing, handed))
            });
        }
        if !unsupported.is_empty() {
            let queued = shared
                .store
                .mark_unsupported(&unsupported, shared.clock.now_ms())
                .await?;
            if queued > 0 {
                shared.outbox_changed.send_modify(|g| *g += 1);
            }
        }
        // Recorded as the answers come, a few at a time: the network's
        // receipts may follow its answers closely, and an answer not yet
        // recorded when the carrier stops is handed again (a duplicate at the
        // handset, counted once).
        let mut answers = Vec::new();
        while let Some(answer) = handing.join_next().await {
            answers.push(answer??);
            if answers.len() >= RECORD_EVERY || handing.is_empty() {
                put_off |= record(shared, adapter, std::mem::take(&mut answers)).await?;
            }
        }
        if put_off {
            return Ok(true);
        }
    }
}

/// Answers recorded together.
const RECORD_EVERY: usize = 32;

/// Records what the network answered; whether it put any delivery off.
async fn record(
    shared: &Shared,
    adapter: &Adapter,
    answers: Vec<(Outgoing, Handed)>,
) -> anyhow::Result<bool> {
    let queued = shared
        .store
        .record_handed(adapter.name(), &answers, shared.clock.now_ms())
        .await?;
    if queued > 0 {
        shared.outbox_changed.send_modify(|g| *g += 1);
    }
    let taken = answers
        .iter()
        .filter(|(_, h)| matches!(h, Handed::Accepted(_) | Handed::Delivered(_)))
        .count();
    shared.metrics.pushed.add(
        &[("channel", channel_name(adapter.channel()))],
        taken as u64,
    );
    Ok(answers.iter().any(|(_, h)| matches!(h, Handed::Later(_))))
}

fn channel_name(channel: i64) -> &'static str {
    chukei_proto::common::v1::Channel::short_name_of(channel as i32)
}

/// Stores the gateway's reports as they come, a batch per transaction, and
/// tells the network each is stored.
async fn apply_reports(shared: Shared, gateway: &'static str, mut reports: mpsc::Receiver<Report>) {
    loop {
        let first = tokio::select! {
            () = shared.cancel.cancelled() => return,
            report = reports.recv() => match report {
                Some(report) => report,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < 1_000 {
            match reports.try_recv() {
                Ok(report) => batch.push(report),
                Err(_) => break,
            }
        }
        let now = shared.clock.now_ms();
        let (said, acks): (Vec<NetworkReport>, Vec<_>) =
            batch.into_iter().map(|r| (r.said, r.stored)).unzip();
        loop {
            match shared
                .store
                .apply_gateway_reports(gateway, &said, now)
                .await
            {
                Ok(queued) => {
                    if queued > 0 {
                        shared.outbox_changed.send_modify(|g| *g += 1);
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(gateway, %error, "could not store gateway reports; retrying");
                    tokio::select! {
                        () = shared.cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        for (report, stored) in said.iter().zip(acks) {
            shared
                .metrics
                .gateway
                .reports
                .inc(&[("gateway", gateway), ("outcome", report.outcome.name())]);
            if let Some(stored) = stored {
                let _ = stored.send(());
            }
        }
    }
}

/// The gateways' Prometheus metrics (labels: gateway, status, outcome —
/// never an address or a number).
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    /// What the network answered to each hand-over, by status.
    pub submits: chukei_proto::metrics::Counter,
    /// Reports received, by outcome.
    pub reports: chukei_proto::metrics::Counter,
    /// Binds (and connections) by outcome.
    pub binds: chukei_proto::metrics::Counter,
    /// Hand-overs awaiting the network's answer.
    pub in_flight: chukei_proto::metrics::Gauge,
}

impl GatewayMetrics {
    pub fn new(registry: &chukei_proto::metrics::Registry) -> Self {
        Self {
            submits: registry.counter(
                "chukei_carrier_gateway_submits_total",
                "Deliveries handed to a gateway (SMPP submit_sm, SMTP transaction), by gateway and status",
            ),
            reports: registry.counter(
                "chukei_carrier_gateway_reports_total",
                "Reports from a gateway's network (delivery receipts, bounces, opens), by gateway and outcome",
            ),
            binds: registry.counter(
                "chukei_carrier_gateway_binds_total",
                "Connections and binds to a gateway's server, by gateway and outcome",
            ),
            in_flight: registry.gauge(
                "chukei_carrier_gateway_in_flight",
                "Hand-overs awaiting the gateway's answer (the SMPP window in use)",
            ),
        }
    }
}
