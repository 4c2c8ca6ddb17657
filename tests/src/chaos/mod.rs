//! The chaos harness: runs the real binaries (a relay, carriers behind fault
//! proxies, a terminal fleet that sends receipts twice and out of order),
//! drives a campaign mix through `SendMessage` while it SIGKILLs and restarts
//! carriers and the relay and partitions the relay from carriers, optionally
//! fills the relay's disk, then checks invariants against a history of every
//! client call, the terminals' journal and the relay's database:
//!
//! - I1 every accepted message reaches its terminals or ends expired/failed;
//! - I2 nothing is delivered for a submit that got a definite error;
//! - I3 one message per idempotency key; a same-key retry after an ambiguous
//!   error resolves it;
//! - I4 sent and opened at most once per message and person;
//! - I5 no message status moves backwards (sampled while the faults run);
//! - I6 every aggregate equals a recount from the events;
//! - I7 every event reaches the enterprise's webhook endpoint at least
//!   once, unchanged and signed, though the endpoint fails on purpose
//!   (`webhook.rs`).
//!
//! `chaos` (a binary of this package) runs it from the command line; a small
//! run is a test (`tests/chaos.rs`). [`Report`] prints one line per run.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use chukei_proto::rng::Rng;
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use tonic::transport::Channel;

use crate::process::{Process, binary_in, free_port};

mod check;
mod faults;
mod webhook;

use crate::{Backend, Enterprise, wait_healthy};
use check::*;
use faults::*;

const ADMIN_TOKEN: &str = "chaos-admin-token-0123456789";
const DELIVER_TOKEN: &str = "chaos-deliver-token-0123456789";
const CARRIER_ADMIN_TOKEN: &str = "chaos-carrier-admin-0123456789";

/// What a run does.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub backend: Backend,
    /// PostgreSQL database for the relay (required for `Backend::Postgres`).
    pub database_url: Option<String>,
    /// `SendMessage` calls in the campaign mix.
    pub messages: usize,
    pub users: usize,
    pub carriers: usize,
    /// Carrier SIGKILL + restart cycles (K).
    pub carrier_kills: usize,
    /// Relay SIGKILL + restart cycles (M).
    pub relay_kills: usize,
    /// Relay replicas on the one database (carrier streams are leased); with
    /// more than one, a killed replica stays down 3 s — longer than the
    /// leases — so another takes its carriers over.
    pub replicas: usize,
    /// Relay↔carrier partitions (2 s each).
    pub partitions: usize,
    /// Crash-point cycles: a relay or carrier restarted armed at one of
    /// `chukei_proto::crash::POINTS` (in turn) dies there on its own.
    pub crash_points: usize,
    /// Share of terminal event batches sent twice.
    pub duplicate_events: f64,
    /// Fill the relay's disk mid-run (SQLite on a tmpfs the harness mounts; root only).
    pub disk_full: bool,
    /// Calls in flight.
    pub concurrency: usize,
    /// Calls started per second (open loop; 0: as fast as they go), so the
    /// faults land while the load runs.
    pub rate: u32,
    /// The checks' own test: before checking, lose a stored message and a
    /// delivered event and forge the journal (a delivery of a message nobody
    /// sent, a second copy for someone), so I1, I2, I4 and I6 must fire.
    pub tamper: bool,
    /// Where the binaries are.
    pub bin_dir: PathBuf,
}

/// How a `SendMessage` call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Accepted(String),
    /// The relay said no, for sure: nothing was stored.
    Definite(Code),
    /// Nobody can tell (transport failure, UNAVAILABLE, deadline): retry with the key.
    Ambiguous(String),
}

fn outcome(result: Result<tonic::Response<pb::SendMessageResponse>, tonic::Status>) -> Outcome {
    match result {
        Ok(response) => Outcome::Accepted(response.into_inner().message_id),
        Err(status) => match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::OutOfRange => Outcome::Definite(status.code()),
            code => Outcome::Ambiguous(format!("{code:?}")),
        },
    }
}

/// The invariant violation counts, I1..I7.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Violations(pub [u64; 7]);

impl Violations {
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// What the disk-full phase saw.
#[derive(Clone, Debug, Default)]
pub struct DiskFull {
    /// Calls made while the disk was full, and how many were refused (by code).
    pub attempted: usize,
    pub refused: HashMap<String, usize>,
    pub accepted_while_full: usize,
    /// From freeing the space to the next accepted call.
    pub recovered_in: Option<Duration>,
    /// Refused calls that a same-key retry got accepted once there was room.
    pub accepted_on_retry: usize,
    /// Every message of the phase in the end (each retried until accepted).
    accepted_ids: Vec<String>,
}

/// One run's result.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub backend: Backend,
    pub messages: usize,
    pub accepted: usize,
    pub definite_errors: usize,
    /// Same-key retries the clients made at once after an ambiguous answer.
    pub retried: usize,
    /// Still ambiguous after those, resolved by a same-key retry after the run.
    pub ambiguous_resolved: usize,
    pub persons: usize,
    pub carrier_kills: usize,
    pub relay_kills: usize,
    pub replicas: usize,
    pub partitions: usize,
    pub duplicate_events: f64,
    /// Per relay kill: until it served health again, and until it accepted a message.
    pub relay_recovery: Vec<(Duration, Option<Duration>)>,
    /// Per crash-point cycle: the point, and whether the process died there.
    pub crash_points: Vec<(&'static str, bool)>,
    pub disk_full: Option<DiskFull>,
    pub violations: Violations,
    pub elapsed: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        };
        write!(
            f,
            "chaos seed={} backend={backend} replicas={} messages={} accepted={} definite_errors={} retried={} ambiguous_resolved={} persons={} \
             faults=carrier_kills:{},relay_kills:{},partitions:{},duplicate_events:{},reordered_events:on",
            self.seed,
            self.replicas,
            self.messages,
            self.accepted,
            self.definite_errors,
            self.retried,
            self.ambiguous_resolved,
            self.persons,
            self.carrier_kills,
            self.relay_kills,
            self.partitions,
            self.duplicate_events,
        )?;
        match &self.disk_full {
            Some(disk) => {
                let mut refused: Vec<String> = disk
                    .refused
                    .iter()
                    .map(|(code, n)| format!("{code}:{n}"))
                    .collect();
                refused.sort();
                write!(
                    f,
                    ",disk_full:attempted={}/refused=[{}]/accepted_while_full={}/recovered_ms={}/accepted_on_retry={}",
                    disk.attempted,
                    refused.join(" "),
                    disk.accepted_while_full,
                    disk.recovered_in
                        .map_or("never".into(), |d| d.as_millis().to_string()),
                    disk.accepted_on_retry
                )?;
            }
            None => write!(f, ",disk_full:off")?,
        }
        let [i1, i2, i3, i4, i5, i6, i7] = self.violations.0;
        let recovery: Vec<String> = self
            .relay_recovery
            .iter()
            .map(|(health, accepting)| {
                format!(
                    "{}/{}",
                    health.as_millis(),
                    accepting.map_or("-".into(), |d| d.as_millis().to_string())
                )
            })
            .collect();
        let crashes: Vec<String> = self
            .crash_points
            .iter()
            .map(|(point, died)| format!("{point}:{}", if *died { "died" } else { "not-reached" }))
            .collect();
        write!(
            f,
            " | I1={i1} I2={i2} I3={i3} I4={i4} I5={i5} I6={i6} I7={i7} | relay_recovery_ms(health/accepting)=[{}] crash_points=[{}] elapsed={:.1}s",
            recovery.join(" "),
            crashes.join(" "),
            self.elapsed.as_secs_f64()
        )
    }
}

struct Hub {
    options: Options,
    dir: PathBuf,
    relay_data: PathBuf,
    /// Each replica's port and process.
    relays: Vec<(u16, Option<Process>)>,
    carriers: Vec<CarrierProcess>,
    fleet: Option<Process>,
    journal: PathBuf,
}

struct CarrierProcess {
    id: String,
    port: u16,
    token: String,
    proxy: FaultProxy,
    process: Option<Process>,
}

impl Hub {
    fn relay_url(&self, replica: usize) -> String {
        format!("http://127.0.0.1:{}", self.relays[replica].0)
    }

    fn relay_db_url(&self) -> String {
        match &self.options.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.relay_data.join("relay.db").display()),
        }
    }

    fn bin(&self, name: &str) -> anyhow::Result<PathBuf> {
        binary_in(&self.options.bin_dir, name)
    }

    fn spawn_relay(&mut self, replica: usize) -> anyhow::Result<()> {
        self.spawn_relay_armed(replica, None)
    }

    /// The relay, armed at a crash point (`point:n`) when `crash_at` says so.
    fn spawn_relay_armed(&mut self, replica: usize, crash_at: Option<&str>) -> anyhow::Result<()> {
        let mut command = Command::new(self.bin("relay-svc")?);
        if let Some(crash_at) = crash_at {
            command.env(chukei_proto::crash::ENV, crash_at);
        }
        command
            .args(["--listen", &format!("127.0.0.1:{}", self.relays[replica].0)])
            .arg("--data-dir")
            .arg(&self.relay_data)
            .args(["--poll-interval-ms", "100", "--lease-ttl-secs", "2"])
            .args(["--reoffer-after-secs", "20"])
            // Broadcasts to the few hundred registered span a dozen
            // expansion steps, so kills land between steps too.
            .args(["--expansion-step", "25"])
            // The webhook receiver is local and answers at once or never.
            .arg("--webhook-allow-private")
            .args(["--webhook-retry-schedule", "100ms,300ms,1s"])
            .args(["--webhook-timeout-secs", "2"])
            .env("CHUKEI_RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("CHUKEI_RELAY_DELIVER_TOKEN", DELIVER_TOKEN)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null());
        if let Some(url) = &self.options.database_url {
            command.args(["--database-url", url]);
        }
        self.relays[replica].1 = Some(Process::spawn("relay-svc", &mut command)?);
        Ok(())
    }

    fn spawn_carrier(&mut self, index: usize) -> anyhow::Result<()> {
        self.spawn_carrier_armed(index, None)
    }

    /// The carrier, armed at a crash point (`point:n`) when `crash_at` says so.
    fn spawn_carrier_armed(&mut self, index: usize, crash_at: Option<&str>) -> anyhow::Result<()> {
        let carrier = &self.carriers[index];
        let mut command = Command::new(self.bin("carrier-svc")?);
        if let Some(crash_at) = crash_at {
            command.env(chukei_proto::crash::ENV, crash_at);
        }
        command
            .args(["--listen", &format!("127.0.0.1:{}", carrier.port)])
            .args([
                "--carrier-id",
                &carrier.id,
                "--relay-url",
                &self.relay_url(index % self.relays.len()),
            ])
            .arg("--data-dir")
            .arg(self.dir.join(&carrier.id))
            .args(["--report-interval-secs", "5", "--poll-interval-ms", "100"])
            .env("CHUKEI_CARRIER_TOKEN", &carrier.token)
            .env("CHUKEI_CARRIER_RELAY_TOKEN", DELIVER_TOKEN)
            .env("CHUKEI_CARRIER_ADMIN_TOKEN", CARRIER_ADMIN_TOKEN)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null());
        let process = Process::spawn(&carrier.id, &mut command)?;
        self.carriers[index].process = Some(process);
        Ok(())
    }

    async fn admin(&self) -> anyhow::Result<crate::Admin> {
        let channel = Channel::from_shared(self.relay_url(0))?.connect().await?;
        Ok(pb::admin_client::AdminClient::with_interceptor(
            channel,
            BearerInterceptor::new(ADMIN_TOKEN)?,
        ))
    }

    fn stop(&mut self) {
        if let Some(fleet) = self.fleet.take() {
            let _ = fleet.terminate(Duration::from_secs(20));
        }
        for (_, relay) in &mut self.relays {
            if let Some(relay) = relay.take() {
                let _ = relay.terminate(Duration::from_secs(20));
            }
        }
        for carrier in &mut self.carriers {
            if let Some(process) = carrier.process.take() {
                let _ = process.terminate(Duration::from_secs(20));
            }
        }
    }
}

/// The request of call `index` in the mix: mostly one person, some small
/// groups, and now and then a broadcast to everyone registered.
fn request(
    seed: u64,
    index: usize,
    refs: &[String],
    broadcast_every: usize,
) -> pb::SendMessageRequest {
    let mut rng = Rng::for_labels(seed, &["chaos", &index.to_string()]);
    let target = if index % broadcast_every == broadcast_every - 1 {
        pb::target::Kind::AllRegistered(true)
    } else {
        let n = if rng.chance(0.05) { 5 } else { 1 };
        let mut picked: Vec<String> = Vec::with_capacity(n);
        while picked.len() < n.min(refs.len()) {
            let candidate = &refs[rng.below(refs.len() as u64) as usize];
            if !picked.contains(candidate) {
                picked.push(candidate.clone());
            }
        }
        pb::target::Kind::Refs(pb::RefList { refs: picked })
    };
    crate::send_request(
        &format!("chaos-{seed}-{index}"),
        target,
        &format!("chaos message {index}"),
        common::Channel::Sms,
    )
}

/// Calls `SendMessage` with a deadline.
async fn send(client: &mut Enterprise, request: pb::SendMessageRequest) -> Outcome {
    let mut call = tonic::Request::new(request);
    call.set_timeout(Duration::from_secs(10));
    match tokio::time::timeout(Duration::from_secs(12), client.send_message(call)).await {
        Ok(result) => outcome(result),
        Err(_) => Outcome::Ambiguous("timeout".into()),
    }
}

/// Runs the harness once.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        options.backend == Backend::Sqlite || options.database_url.is_some(),
        "a PostgreSQL run needs a database URL"
    );
    let started = Instant::now();
    let temp = tempfile::tempdir()?;
    let dir = temp.path().to_path_buf();
    let relay_data = dir.join("relay");
    let mount = if options.disk_full && options.backend == Backend::Sqlite {
        let size = format!("{}m", 512 + options.messages / 50);
        Some(Mounted::tmpfs(&relay_data, &size)?)
    } else {
        None
    };
    let mut hub = Hub {
        journal: dir.join("journal.txt"),
        relays: (0..options.replicas.max(1))
            .map(|_| free_port().map(|port| (port, None)))
            .collect::<Result<_, _>>()?,
        relay_data,
        carriers: Vec::new(),
        fleet: None,
        dir,
        options: options.clone(),
    };
    let result = drive(&mut hub, mount.is_some()).await;
    hub.stop();
    drop(mount);
    let mut report = result?;
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn drive(hub: &mut Hub, disk_full: bool) -> anyhow::Result<Report> {
    let options = hub.options.clone();
    for replica in 0..hub.relays.len() {
        hub.spawn_relay(replica)?;
        wait_healthy(&hub.relay_url(replica)).await?;
    }
    let mut admin = hub.admin().await?;
    let enterprise = admin
        .create_enterprise(pb::CreateEnterpriseRequest {
            name: "chaos".into(),
            ..Default::default()
        })
        .await?
        .into_inner();

    // Carriers, each behind a proxy the relay dials through.
    let mut carrier_flags = Vec::new();
    for index in 0..options.carriers {
        let id = format!("carrier-{index}");
        let port = free_port()?;
        let proxy = FaultProxy::start(format!("127.0.0.1:{port}").parse()?).await?;
        hub.carriers.push(CarrierProcess {
            token: format!("chaos-{id}-token-0123456789"),
            id: id.clone(),
            port,
            proxy,
            process: None,
        });
        hub.spawn_carrier(index)?;
        let url = format!("http://127.0.0.1:{port}");
        wait_healthy(&url).await?;
        let carrier = &hub.carriers[index];
        admin
            .register_carrier(pb::RegisterCarrierRequest {
                carrier_id: id.clone(),
                endpoint: format!("http://{}", carrier.proxy.addr),
                token: carrier.token.clone(),
            })
            .await?;
        carrier_flags.push(format!("--carrier={id}={url}"));
    }

    // The fleet: opens everything at once, duplicates and reorders its receipts.
    let fleet_port = free_port()?;
    let mut fleet = Command::new(hub.bin("terminal-sim")?);
    fleet
        .args(["--listen", &format!("127.0.0.1:{fleet_port}"), "fleet"])
        .args(["--users", &options.users.to_string()])
        .args(["--seed", &options.seed.to_string(), "--open-mode", "always"])
        .args(&carrier_flags)
        .args(["--enterprise", &enterprise.enterprise_id])
        .args(["--duplicate-events", &options.duplicate_events.to_string()])
        .arg("--reorder-events")
        .arg("--journal")
        .arg(&hub.journal)
        .env("CHUKEI_TERMINAL_CARRIER_ADMIN_TOKEN", CARRIER_ADMIN_TOKEN)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null());
    hub.fleet = Some(Process::spawn("terminal-sim", &mut fleet)?);
    crate::wait_healthy_for(
        &format!("http://127.0.0.1:{fleet_port}"),
        Duration::from_secs(120 + options.users as u64 / 100),
    )
    .await?;

    // A client per replica; calls go round them.
    let mut clients = Vec::new();
    for replica in 0..hub.relays.len() {
        let channel = Channel::from_shared(hub.relay_url(replica))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        clients.push(
            pb::enterprise_api_client::EnterpriseApiClient::with_interceptor(
                channel,
                BearerInterceptor::new(&enterprise.api_key)?,
            ),
        );
    }
    let client = clients[0].clone();
    let receiver = webhook::Receiver::start(&hub.relay_url(0), &enterprise.api_key).await?;
    let refs = all_refs(&mut client.clone()).await?;
    anyhow::ensure!(!refs.is_empty(), "nobody registered");
    let broadcast_every = (options.messages / 3).clamp(50, 10_000);

    // The load, the faults and the status sampler run together.
    let history: Arc<Mutex<Vec<Option<Outcome>>>> =
        Arc::new(Mutex::new(vec![None; options.messages]));
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    let load_started = tokio::time::Instant::now();
    let retried = Arc::new(AtomicUsize::new(0));
    for worker in 0..options.concurrency {
        let (history, next, retried) = (history.clone(), next.clone(), retried.clone());
        let (clients, refs) = (clients.clone(), refs.clone());
        let (seed, rate) = (options.seed, options.rate);
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= history.lock().unwrap().len() {
                    return;
                }
                if rate > 0 {
                    let at = load_started + Duration::from_secs_f64(index as f64 / f64::from(rate));
                    tokio::time::sleep_until(at).await;
                }
                // Like a client behind a load balancer: an ambiguous answer is
                // retried under the same key, on the next replica, twice.
                let mut result = Outcome::Ambiguous(String::new());
                for attempt in 0..3 {
                    if attempt > 0 {
                        retried.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                    }
                    let mut client = clients[(worker + attempt) % clients.len()].clone();
                    result = send(&mut client, request(seed, index, &refs, broadcast_every)).await;
                    if !matches!(result, Outcome::Ambiguous(_)) {
                        break;
                    }
                }
                history.lock().unwrap()[index] = Some(result);
            }
        });
    }
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn(sample_statuses(
        client.clone(),
        history.clone(),
        sampling.clone(),
    ));

    let faults =
        options.carrier_kills + options.relay_kills + options.partitions + options.crash_points;
    let mut plan: Vec<u8> = std::iter::repeat_n(0u8, options.carrier_kills)
        .chain(std::iter::repeat_n(1u8, options.relay_kills))
        .chain(std::iter::repeat_n(2u8, options.partitions))
        .chain(std::iter::repeat_n(3u8, options.crash_points))
        .collect();
    let mut rng = Rng::for_labels(options.seed, &["chaos faults"]);
    for i in (1..plan.len()).rev() {
        plan.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut relay_recovery = Vec::new();
    // Messages the harness itself sent (probes after a relay kill), accepted.
    let mut probes: Vec<String> = Vec::new();
    let mut crash_points = Vec::new();
    for (n, fault) in plan.into_iter().enumerate() {
        // Faults spread over the load: the n-th once that share is submitted.
        let due = options.messages * (n + 1) / (faults + 1);
        while next.load(Ordering::SeqCst) < due {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match fault {
            0 => {
                let index = rng.below(hub.carriers.len() as u64) as usize;
                drop(hub.carriers[index].process.take()); // SIGKILL
                tokio::time::sleep(Duration::from_millis(200 + rng.below(1500))).await;
                hub.spawn_carrier(index)?;
                wait_healthy(&format!("http://127.0.0.1:{}", hub.carriers[index].port)).await?;
            }
            1 => {
                let replica = n % hub.relays.len();
                drop(hub.relays[replica].1.take()); // SIGKILL
                let killed = Instant::now();
                if hub.relays.len() > 1 {
                    // The others take its carriers over meanwhile.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                hub.spawn_relay(replica)?;
                wait_healthy(&hub.relay_url(replica)).await?;
                let health = killed.elapsed();
                // Accepting again: a probe message goes through.
                let probe = crate::send_request(
                    &format!("chaos-{}-probe-{n}", options.seed),
                    pb::target::Kind::Refs(pb::RefList {
                        refs: vec![refs[n % refs.len()].clone()],
                    }),
                    "probe",
                    common::Channel::Sms,
                );
                let accepting = loop {
                    if let Outcome::Accepted(id) =
                        send(&mut clients[replica].clone(), probe.clone()).await
                    {
                        probes.push(id);
                        break Some(killed.elapsed());
                    }
                    if killed.elapsed() > Duration::from_secs(60) {
                        break None;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                relay_recovery.push((health, accepting));
            }
            2 => {
                let index = rng.below(hub.carriers.len() as u64) as usize;
                hub.carriers[index].proxy.cut();
                tokio::time::sleep(Duration::from_secs(2)).await;
                hub.carriers[index].proxy.heal();
            }
            _ => {
                let point = chukei_proto::crash::POINTS
                    [crash_points.len() % chukei_proto::crash::POINTS.len()];
                let died = crash_at_point(hub, point, n, &clients, &mut probes).await?;
                crash_points.push((point, died));
            }
        }
    }
    while workers.join_next().await.is_some() {}

    // The disk fills up under the relay, then frees again.
    let disk = if disk_full {
        Some(disk_full_phase(hub, &mut client.clone(), &refs).await?)
    } else {
        None
    };

    // Ambiguous calls are resolved by retrying with the same key.
    let mut resolved = 0;
    let mut unresolved = 0;
    let pending: Vec<usize> = history
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Some(Outcome::Ambiguous(_))))
        .map(|(i, _)| i)
        .collect();
    for index in pending {
        let deadline = Instant::now() + Duration::from_secs(60);
        let result = loop {
            let result = send(
                &mut client.clone(),
                request(options.seed, index, &refs, broadcast_every),
            )
            .await;
            if !matches!(result, Outcome::Ambiguous(_)) || Instant::now() > deadline {
                break result;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        match result {
            Outcome::Ambiguous(_) => unresolved += 1,
            _ => resolved += 1,
        }
        history.lock().unwrap()[index] = Some(result);
    }
    sampling.store(false, Ordering::SeqCst);
    let backwards = sampler.await?;

    // Everything settles: nothing unsent, unconfirmed or unfolded.
    let db = Db::connect(&hub.relay_db_url()).await?;
    settle(
        &db,
        Duration::from_secs(300 + options.messages as u64 / 200),
    )
    .await?;

    if options.tamper {
        tamper(&db, &hub.journal).await?;
    }
    let history: Vec<Outcome> = history
        .lock()
        .unwrap()
        .iter()
        .map(|o| o.clone().unwrap_or(Outcome::Ambiguous("never sent".into())))
        .collect();
    let mut accepted: HashSet<String> = history
        .iter()
        .filter_map(|o| match o {
            Outcome::Accepted(id) => Some(id.clone()),
            _ => None,
        })
        .collect();
    accepted.extend(disk.iter().flat_map(|d| d.accepted_ids.iter().cloned()));
    accepted.extend(probes);
    let refused_keys: HashSet<String> = history
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Outcome::Definite(_)))
        .map(|(index, _)| format!("chaos-{}-{index}", options.seed))
        .collect();
    let mut violations = check(&db, &hub.journal, &accepted, &refused_keys).await?;
    violations.0[6] = receiver
        .violations(
            &db,
            Duration::from_secs(120 + options.messages as u64 / 100),
        )
        .await?;
    violations.0[2] += unresolved;
    violations.0[4] += backwards;
    let persons = db
        .count("SELECT COUNT(*) FROM (SELECT DISTINCT message_id, user_id FROM deliveries) p")
        .await? as usize;
    db.close().await;
    Ok(Report {
        seed: options.seed,
        backend: options.backend,
        messages: options.messages,
        accepted: history
            .iter()
            .filter(|o| matches!(o, Outcome::Accepted(_)))
            .count(),
        definite_errors: history
            .iter()
            .filter(|o| matches!(o, Outcome::Definite(_)))
            .count(),
        retried: retried.load(Ordering::SeqCst),
        ambiguous_resolved: resolved,
        persons,
        carrier_kills: options.carrier_kills,
        relay_kills: options.relay_kills,
        replicas: hub.relays.len(),
        partitions: options.partitions,
        duplicate_events: options.duplicate_events,
        relay_recovery,
        crash_points,
        disk_full: disk,
        violations,
        elapsed: Duration::ZERO,
    })
}

/// One crash-point cycle: the processes that can reach `point` (every
/// relay replica — whichever holds the work dies there — or one carrier)
/// are SIGKILLed and restarted armed at its first arrival, left up to 30 s
/// to die there, then restarted as usual. A campaign to everyone is sent
/// meanwhile, so every point has work that reaches it (an expansion, a
/// batch for every carrier, receipts, a fold) even once the load is over.
/// Whether one of them died there.
async fn crash_at_point(
    hub: &mut Hub,
    point: &'static str,
    n: usize,
    clients: &[Enterprise],
    probes: &mut Vec<String>,
) -> anyhow::Result<bool> {
    let crash_at = format!("{point}:1");
    let relay = point.starts_with("relay.");
    let carrier = n % hub.carriers.len();
    if relay {
        for replica in 0..hub.relays.len() {
            drop(hub.relays[replica].1.take()); // SIGKILL
            hub.spawn_relay_armed(replica, Some(&crash_at))?;
        }
    } else {
        drop(hub.carriers[carrier].process.take()); // SIGKILL
        hub.spawn_carrier_armed(carrier, Some(&crash_at))?;
    }
    // Not waited healthy: an armed process may reach its point (with the
    // work it resumes) before it serves health. The campaign's calls are
    // retried until one is accepted.
    let campaign = crate::send_request(
        &format!("chaos-{}-crash-{n}", hub.options.seed),
        pb::target::Kind::AllRegistered(true),
        "crash point campaign",
        common::Channel::Sms,
    );
    let mut outcome = send_until(
        clients,
        &campaign,
        Duration::from_secs(30),
        Duration::from_millis(50),
        |outcome| matches!(outcome, Outcome::Accepted(_)),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let died = loop {
        let exited = if relay {
            hub.relays
                .iter_mut()
                .any(|(_, process)| process.as_mut().is_none_or(Process::has_exited))
        } else {
            hub.carriers[carrier]
                .process
                .as_mut()
                .is_none_or(Process::has_exited)
        };
        if exited || Instant::now() > deadline {
            break exited;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Gone, or SIGKILLed while still armed; then up as usual.
    if relay {
        for replica in 0..hub.relays.len() {
            drop(hub.relays[replica].1.take());
            hub.spawn_relay(replica)?;
        }
        for replica in 0..hub.relays.len() {
            wait_healthy(&hub.relay_url(replica)).await?;
        }
    } else {
        drop(hub.carriers[carrier].process.take());
        hub.spawn_carrier(carrier)?;
        wait_healthy(&format!("http://127.0.0.1:{}", hub.carriers[carrier].port)).await?;
    }
    // A campaign may be stored with no answer given: every armed replica
    // died at its point (an expansion step of that very campaign, say)
    // before one went out. Like any ambiguous call, it is resolved with
    // its key once the relays are back, or it would reach everyone as a
    // message no client was told was accepted (I2).
    if matches!(outcome, Outcome::Ambiguous(_)) {
        outcome = send_until(
            clients,
            &campaign,
            Duration::from_secs(60),
            Duration::from_millis(200),
            |outcome| !matches!(outcome, Outcome::Ambiguous(_)),
        )
        .await;
    }
    match outcome {
        Outcome::Accepted(id) => probes.push(id),
        Outcome::Definite(code) => anyhow::bail!("the crash point campaign was refused: {code:?}"),
        Outcome::Ambiguous(why) => {
            anyhow::bail!("the crash point campaign was still ambiguous after 60 s: {why}")
        }
    }
    Ok(died)
}

/// Sends `request` to each of `clients` in turn, round after round
/// (`pause` between rounds), until an answer is `done` or `within` has
/// passed; the last answer.
async fn send_until(
    clients: &[Enterprise],
    request: &pb::SendMessageRequest,
    within: Duration,
    pause: Duration,
    done: impl Fn(&Outcome) -> bool,
) -> Outcome {
    let deadline = Instant::now() + within;
    let mut outcome = Outcome::Ambiguous("never sent".into());
    while Instant::now() < deadline {
        for client in clients {
            outcome = send(&mut client.clone(), request.clone()).await;
            if done(&outcome) {
                return outcome;
            }
        }
        tokio::time::sleep(pause).await;
    }
    outcome
}

async fn all_refs(client: &mut Enterprise) -> anyhow::Result<Vec<String>> {
    let mut refs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_registrations(pb::ListRegistrationsRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        for registration in page.registrations {
            if !refs.contains(&registration.user_ref) {
                refs.push(registration.user_ref);
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(refs);
        }
        page_token = page.next_page_token;
    }
}

/// Polls a sample of accepted messages while the faults run and counts any
/// status that moved backwards (state, handed over, delivered, opened).
async fn sample_statuses(
    client: Enterprise,
    history: Arc<Mutex<Vec<Option<Outcome>>>>,
    running: Arc<AtomicBool>,
) -> u64 {
    let mut last: HashMap<String, [u64; 4]> = HashMap::new();
    let mut backwards = 0;
    while running.load(Ordering::SeqCst) {
        let sample: Vec<String> = history
            .lock()
            .unwrap()
            .iter()
            .filter_map(|o| match o {
                Some(Outcome::Accepted(id)) => Some(id.clone()),
                _ => None,
            })
            .step_by(7)
            .take(40)
            .collect();
        for message_id in sample {
            let Ok(status) = client
                .clone()
                .get_message(pb::GetMessageRequest {
                    message_id: message_id.clone(),
                })
                .await
            else {
                continue;
            };
            let status = status.into_inner();
            let now = [
                status.state as u64,
                status.handed_over,
                status.delivered,
                status.opened,
            ];
            if let Some(before) = last.get(&message_id)
                && before.iter().zip(&now).any(|(b, n)| n < b)
            {
                backwards += 1;
            }
            last.insert(message_id, now);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    backwards
}
