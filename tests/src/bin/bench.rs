//! Benchmarks that print figures (never assert them). One scenario so far:
//!
//! `bench broadcast --users 100000 --backend sqlite|postgres` — a broadcast to
//! every registered user: time from `SendMessage` until every delivery is
//! handed to a carrier (acked on the carrier streams), and until every
//! delivery is at a terminal (received by the fleet), with recipients per
//! second. The relay, three carriers and the fleet run in this process, each
//! on its own runtime, talking gRPC over loopback.
//!
//! `bench stats --events 10000000 --backend sqlite|postgres` — the history a
//! hub would have after that many events (sends, deliveries, opens of 10
//! enterprises' campaigns to people with the fleet's attribute mix), rolled
//! up into both statistics cubes the way the relay folds events, then the time
//! `GetStats` breakdowns take over it (median of 5), and the cell count.
//!
//! `bench slow-carrier --users 1000000 --pace 10000 --backend sqlite|postgres`
//! — backpressure: a campaign to that many people through one carrier that
//! takes `--pace` deliveries a second, with the relay and the carrier as real
//! processes; samples the relay's resident memory (VmRSS) and the message's
//! backlog and expected drain time every second while the backlog drains,
//! and prints them with the peak (VmHWM).
//!
//! `bench latency --messages 1000` — single targeted messages on an idle
//! hub, one at a time: submit → terminal, p50/p99 (HdrHistogram).
//!
//! `bench targeted --seconds 10` — sustained targeted messages (one ref
//! each): the most that reach terminals a second with many senders (closed
//! loop), then open-loop runs at 50 % and 80 % of that rate with their
//! latency percentiles (each send due at its own instant; no coordinated
//! omission).
//!
//! `bench priority --users 200000 --rate 100` — targeted messages at a fixed
//! rate while a broadcast to everyone is being handed over: their latency.
//!
//! `bench transport --deliveries 1000000` — the ceiling: the same delivery
//! batches over a bare tonic `Carrier.Deliver` stream to a server that only
//! acks, no storage at either end.
//!
//! `bench billing --people 100000 --backend sqlite|postgres` — what charging
//! costs the rollup fold: a campaign to that many people is handed over,
//! delivered and 30% opened at the storage seam, then the queued events are
//! folded (statistics, learning tables and — with a rate card — ledger
//! lines), once without and once with a rate card, each on a fresh database.

use std::time::{Duration, Instant};

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use clap::{Parser, Subcommand, ValueEnum};
use integration_tests::{Backend, Hub, Tuning, machine};
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;

#[derive(Parser, Debug)]
#[command(name = "bench", version)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// A broadcast to every registered user.
    Broadcast {
        /// Registered users (every simulated user registers).
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        /// PostgreSQL needs CHUKEI_TEST_DATABASE_URL (a database is created and dropped).
        #[arg(long, value_enum, default_value = "sqlite")]
        backend: BackendArg,
        #[arg(long, default_value_t = 1000)]
        batch_size: u32,
    },
    /// The rollup fold's cost with and without charging to the ledger.
    Billing {
        /// People the campaign reaches.
        #[arg(long, default_value_t = 100_000)]
        people: usize,
        #[arg(long, value_enum, default_value = "sqlite")]
        backend: BackendArg,
    },
    /// A campaign through a slow carrier: the relay's memory while the backlog drains.
    SlowCarrier {
        /// Registered users (all on the one carrier).
        #[arg(long, default_value_t = 1_000_000)]
        users: usize,
        /// Deliveries per second the carrier takes.
        #[arg(long, default_value_t = 10_000)]
        pace: u32,
        /// How long to watch (seconds); 0: until the backlog is gone.
        #[arg(long, default_value_t = 0)]
        seconds: u64,
        #[arg(long, value_enum, default_value = "sqlite")]
        backend: BackendArg,
    },
    /// Single targeted messages on an idle hub: submit → terminal.
    Latency {
        #[arg(long, default_value_t = 1000)]
        messages: usize,
        #[arg(long, value_enum, default_value = "sqlite")]
        backend: BackendArg,
    },
    /// Sustained targeted messages: the ceiling, then latency at 50 % and 80 % of it.
    Targeted {
        /// Messages in the closed-loop run that finds the ceiling.
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        /// Concurrent senders in the closed-loop run.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Length of each open-loop run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, value_enum, default_value = "sqlite")]
        backend: BackendArg,
    },
    /// Targeted messages at a fixed rate during a broadcast to everyone.
    Priority {
        #[arg(long, default_value_t = 200_000)]
        users: usize,
        /// Targeted messages a second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, value_enum, default_value = "sqlite")]
        backend: BackendArg,
    },
    /// Delivery batches over a bare Deliver stream, no storage: the ceiling.
    Transport {
        #[arg(long, default_value_t = 1_000_000)]
        deliveries: usize,
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
        /// Batches in flight.
        #[arg(long, default_value_t = 8)]
        window: usize,
    },
    /// GetStats over the rollups of a large synthetic history.
    Stats {
        /// Events (sends, deliveries and opens) in the history.
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        #[arg(long, value_enum, default_value = "sqlite")]
        backend: BackendArg,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
    Sqlite,
    Postgres,
}

impl BackendArg {
    fn backend(self) -> Backend {
        match self {
            Self::Sqlite => Backend::Sqlite,
            Self::Postgres => Backend::Postgres,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let scenario = chukei_proto::server::parse_args::<Args>().scenario;
    println!("machine: {}", machine());
    match scenario {
        Scenario::Broadcast {
            users,
            backend,
            batch_size,
        } => broadcast(users, backend.backend(), batch_size).await,
        Scenario::Stats { events, backend } => stats(events, backend.backend()).await,
        Scenario::SlowCarrier {
            users,
            pace,
            seconds,
            backend,
        } => slow_carrier(users, pace, seconds, backend.backend()).await,
        Scenario::Latency { messages, backend } => latency(messages, backend.backend()).await,
        Scenario::Targeted {
            count,
            concurrency,
            seconds,
            backend,
        } => targeted(count, concurrency, seconds, backend.backend()).await,
        Scenario::Priority {
            users,
            rate,
            backend,
        } => priority(users, rate, backend.backend()).await,
        Scenario::Transport {
            deliveries,
            batch_size,
            window,
        } => transport(deliveries, batch_size, window).await.map(|_| ()),
        Scenario::Billing { people, backend } => {
            println!("rollup fold of a campaign to {people} people on {backend:?}:");
            for priced in [false, true] {
                billing(people, backend.backend(), priced).await?;
            }
            Ok(())
        }
    }
}

/// Contracts `people` users ("user-0000000", …) with `carrier_id` as their
/// primary and registers them all with `enterprise_id`, below the edge, in
/// chunks; returns their ids.
async fn seed_registered(
    store: &relay_svc::storage::Store,
    carrier_id: &str,
    enterprise_id: &str,
    people: usize,
    now: i64,
) -> anyhow::Result<Vec<String>> {
    use relay_svc::registry::{Contract, NewRegistration, Profile};
    let users: Vec<String> = (0..people).map(|i| format!("user-{i:07}")).collect();
    for chunk in users.chunks(10_000) {
        let contracts: Vec<Contract> = chunk
            .iter()
            .map(|u| Contract {
                user_id: u.clone(),
                primary: true,
                active: true,
            })
            .collect();
        store.upsert_contracts(carrier_id, &contracts, now).await?;
        let registrations: Vec<NewRegistration> = chunk
            .iter()
            .map(|u| NewRegistration {
                user_id: u.clone(),
                enterprise_id: enterprise_id.into(),
                service_id: None,
                profile: Profile::default(),
                text_version: "v1".into(),
            })
            .collect();
        store
            .register_users(carrier_id, &registrations, now)
            .await?;
    }
    Ok(users)
}

/// One fold of a delivered, 30%-opened campaign to `people`, priced or not.
async fn billing(people: usize, backend: Backend, priced: bool) -> anyhow::Result<()> {
    use relay_svc::policy::{AttentionConfig, Policy, Priority, Timing};
    use relay_svc::pricing::{PRICED_CHANNELS, Prices, RateCard, RateEntry};
    use relay_svc::receipts::{EventKind, Receipt};
    use relay_svc::targeting::{Channel, Content, NewMessage, Target};

    let Some(fixture) = integration_tests::store(backend).await else {
        anyhow::bail!("--backend postgres needs CHUKEI_TEST_DATABASE_URL");
    };
    let store = &fixture.store;
    let now = 1_795_651_200_000;
    store.create_enterprise("ent", "ent", "hash", now).await?;
    store
        .upsert_carrier("c1", "http://127.0.0.1:1", "token", now)
        .await?;
    let users = seed_registered(store, "c1", "ent", people, now).await?;
    if priced {
        let entries: Vec<RateEntry> = PRICED_CHANNELS
            .iter()
            .flat_map(|&channel| {
                [(0, 12, 3), (12, 0, 5)].map(|(from_hour, to_hour, delivered)| RateEntry {
                    channel,
                    from_hour,
                    to_hour,
                    prices: Prices {
                        delivered,
                        opened: 2,
                    },
                })
            })
            .collect();
        store
            .set_rate_card(&RateCard::new(&entries, None)?, "Asia/Tokyo", now)
            .await?;
    }
    let message = NewMessage {
        idempotency_key: "k".into(),
        target: Target::AllRegistered,
        content: Content {
            text: "hello".into(),
            ..Content::default()
        },
        policy: Policy::fixed(Some(Channel::Sms)),
        all_carriers: false,
        timing: Timing::default(),
        follow_up: None,
        priority: Priority::Normal,
        bid_id: None,
        trace_parent: String::new(),
    };
    let attention = AttentionConfig::default();
    store
        .accept_message("ent", "msg", &message, now, now + 86_400_000, &attention)
        .await?;
    let per_person = |d: Duration| d.as_secs_f64() * 1e6 / people as f64;
    let started = Instant::now();
    store.expand_message("msg", now, &attention).await?;
    let expanded = started.elapsed();
    let mut after = 0;
    let (mut reading, mut marking) = (Duration::ZERO, Duration::ZERO);
    loop {
        let started = Instant::now();
        let due = store.due_deliveries("c1", after, now, 1_000).await?;
        reading += started.elapsed();
        let Some(last) = due.last() else { break };
        after = last.id;
        let started = Instant::now();
        store
            .mark_handed_over(&due.iter().map(|d| d.id).collect::<Vec<_>>(), now)
            .await?;
        marking += started.elapsed();
    }
    let mut rng = chukei_proto::rng::Rng::new(11);
    let receipts: Vec<Receipt> = users
        .iter()
        .flat_map(|user| {
            // Delivered over the next 6 hours; 30% opened within 3 hours of that.
            let delivered_at = now + rng.below(6 * 3_600_000) as i64;
            let mut events = vec![(EventKind::Delivered, delivered_at)];
            if rng.chance(0.3) {
                events.push((
                    EventKind::Opened,
                    delivered_at + rng.below(3 * 3_600_000) as i64,
                ));
            }
            events.into_iter().map(|(kind, at)| Receipt {
                delivery_id: None,
                message_id: "msg".into(),
                user_id: user.clone(),
                kind,
                channel: Some(Channel::Sms),
                at,
                region: "tokyo".into(),
            })
        })
        .collect();
    let started = Instant::now();
    for chunk in receipts.chunks(1_000) {
        store.record_receipts("c1", chunk, now).await?;
    }
    let recording = started.elapsed();
    println!(
        "  relay steps at the storage seam, µs per person: expand {:.2}, due reads {:.2}, hand-over marks {:.2}, receipts (delivered, 30% opened) {:.2}",
        per_person(expanded),
        per_person(reading),
        per_person(marking),
        per_person(recording),
    );
    let queued = store.roll_up_backlog().await?;
    let started = Instant::now();
    while store.roll_up_queued(10_000, now).await? > 0 {}
    let seconds = started.elapsed().as_secs_f64();
    let (start, end) = (now - 86_400_000, now + 86_400_000);
    let lines = store
        .ledger_sums(
            Some("ent"),
            start,
            end,
            &[
                relay_svc::storage::LedgerDimension::Message,
                relay_svc::storage::LedgerDimension::Kind,
            ],
        )
        .await?;
    let total = store.ledger_sums(Some("ent"), start, end, &[]).await?;
    println!(
        "  {:<14} {queued} events folded in {seconds:.2} s ({:.0} events/s); charged {} yen in {} message×kind sums",
        if priced {
            "rate card:"
        } else {
            "no rate card:"
        },
        queued as f64 / seconds,
        total.first().map_or(0, |t| t.amount),
        lines.len(),
    );
    fixture.close().await;
    Ok(())
}

async fn broadcast(users: usize, backend: Backend, batch_size: u32) -> anyhow::Result<()> {
    // The ceiling in the same run, on the same machine, for the ratio below.
    let ceiling = transport(1_000_000, batch_size as usize, 8).await?;
    let carriers = ["alpha", "beta", "gamma"];
    let tuning = Tuning {
        batch_size,
        ..Tuning::DEFAULTS
    };
    let Some(mut hub) = Hub::start_with(backend, &carriers, tuning).await? else {
        anyhow::bail!("--backend postgres needs CHUKEI_TEST_DATABASE_URL");
    };
    let (shop, key) = hub.create_enterprise("bench").await?;
    // Everyone registers (consent choices still drawn by the model).
    let fleet = Fleet::generate(1, users, &carriers.map(String::from))
        .with_every_channel()
        .everyone_registers();
    let setup = Instant::now();
    let terminals = hub
        .start_fleet(
            fleet.clone(),
            vec![EnterpriseChoice::enterprise(&shop)],
            OpenMode::Never,
        )
        .await?;
    let registered = integration_tests::registered_users(&fleet, &shop).len();
    println!(
        "setup: {users} users provisioned, attached, {registered} registered in {:.1}s",
        setup.elapsed().as_secs_f64()
    );

    let mut client = hub.enterprise(&key).await?;
    // The peak resident set from here on, not setup's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let cpu_before = CpuSample::now();
    let started = Instant::now();
    let sent = client
        .send_message(broadcast_request("bench"))
        .await?
        .into_inner();
    let accepted = started.elapsed();
    let mut expanded = None;
    let mut handed_over = None;
    let mut at_terminals = None;
    let mut delivered = None;
    let deadline = started + Duration::from_secs(1800);
    while delivered.is_none() {
        let status = client
            .get_message(pb::GetMessageRequest {
                message_id: sent.message_id.clone(),
            })
            .await?
            .into_inner();
        let now = started.elapsed();
        if expanded.is_none() && status.matched > 0 {
            expanded = Some(now);
        }
        if handed_over.is_none() && status.matched > 0 && status.handed_over == status.matched {
            handed_over = Some(now);
        }
        if at_terminals.is_none()
            && status.matched > 0
            && terminals.snapshot().received >= status.matched
        {
            at_terminals = Some(now);
        }
        if status.matched > 0 && status.delivered == status.matched {
            delivered = Some(now);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "broadcast did not complete: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
    let rate = |d: Option<Duration>| registered as f64 / secs(d);
    println!("broadcast to {registered} recipients on {backend:?} (batch {batch_size}):");
    println!(
        "  accepted (SendMessage answered)        {:>8.3} s",
        accepted.as_secs_f64()
    );
    println!(
        "  expanded (recipients extracted)        {:>8.3} s",
        secs(expanded)
    );
    println!(
        "  handed over (all acked by carriers)    {:>8.3} s   {:>9.0} recipients/s",
        secs(handed_over),
        rate(handed_over)
    );
    println!(
        "  at terminals (all received by fleet)   {:>8.3} s   {:>9.0} recipients/s",
        secs(at_terminals),
        rate(at_terminals)
    );
    println!(
        "  delivered receipts counted at relay    {:>8.3} s   {:>9.0} recipients/s",
        secs(delivered),
        rate(delivered)
    );
    println!(
        "  hand-over rate / transport ceiling in this run: {:.1} % ({:.0} of {ceiling:.0} deliveries/s)",
        100.0 * rate(handed_over) / ceiling,
        rate(handed_over),
    );
    let cpu = CpuSample::now().since(&cpu_before);
    let per_million = 1e6 / registered as f64;
    println!(
        "CPU-seconds, accept → receipts counted (per 1M recipients): {}",
        cpu.iter()
            .map(|(group, secs)| format!("{group} {secs:.1} ({:.1})", secs * per_million))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The hub: relay, carriers and SQLite's workers; the simulated terminals
    // and the bench's own client apart (the goal is ≤ 2 µs).
    let hub_cpu: f64 = cpu
        .iter()
        .filter(|(group, _)| {
            ["relay", "carriers", "SQLite workers", "PostgreSQL server"].contains(&group.as_ref())
        })
        .map(|(_, secs)| secs)
        .sum();
    println!(
        "hub CPU per recipient (relay, carriers, their databases; terminals apart): {:.1} µs",
        hub_cpu * 1e6 / registered as f64
    );
    if let Some((_, peak)) = memory_mib(std::process::id()) {
        println!(
            "peak RSS of the hub's one process (relay, carriers, fleet) during the broadcast: {peak:.0} MiB"
        );
    }
    hub.shutdown().await?;
    Ok(())
}

/// CPU time so far: this process's threads by name (each service runs on
/// its own runtime, named after it; SQLite connections have worker threads
/// of their own, shared by the relay and the carriers), the whole process,
/// and the PostgreSQL server's processes.
struct CpuSample {
    threads: std::collections::BTreeMap<String, f64>,
    process: f64,
    postgres: f64,
}

impl CpuSample {
    /// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ).
    const TICK: f64 = 0.01;

    fn now() -> Self {
        let mut threads = std::collections::BTreeMap::new();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let path = task.path();
                let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                let group = match name.trim() {
                    "relay" => "relay",
                    "carrier" => "carriers",
                    "fleet" => "terminals",
                    n if n.starts_with("sqlx-sqlite") => "SQLite workers",
                    _ => "bench client",
                };
                let secs = Self::ticks(&path.join("stat"), false);
                *threads.entry(group.to_owned()).or_insert(0.0) += secs;
            }
        }
        let process = Self::ticks(std::path::Path::new("/proc/self/stat"), false);
        let mut postgres = 0.0;
        if let Ok(processes) = std::fs::read_dir("/proc") {
            for entry in processes.flatten() {
                let path = entry.path();
                let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                if comm.trim() == "postgres" {
                    // With its exited children (backends of closed connections).
                    postgres += Self::ticks(&path.join("stat"), true);
                }
            }
        }
        Self {
            threads,
            process,
            postgres,
        }
    }

    /// utime + stime (and the waited-for children's) of a `stat` file, in seconds.
    fn ticks(stat: &std::path::Path, children: bool) -> f64 {
        let text = std::fs::read_to_string(stat).unwrap_or_default();
        // Fields after the parenthesised name; utime is the 14th field overall.
        let rest = text.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<f64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0.0);
        let mut ticks = field(14) + field(15);
        if children {
            ticks += field(16) + field(17);
        }
        ticks * Self::TICK
    }

    /// What each group used since `before`, the process total, and PostgreSQL's.
    fn since(&self, before: &Self) -> Vec<(String, f64)> {
        let mut used: Vec<(String, f64)> = self
            .threads
            .iter()
            .map(|(group, secs)| {
                let start = before.threads.get(group).copied().unwrap_or(0.0);
                (group.clone(), secs - start)
            })
            .collect();
        let attributed: f64 = used.iter().map(|(_, secs)| secs).sum();
        let process = self.process - before.process;
        used.push(("exited threads".into(), (process - attributed).max(0.0)));
        used.push(("hub process total".into(), process));
        let postgres = self.postgres - before.postgres;
        if postgres > 0.05 {
            used.push(("PostgreSQL server".into(), postgres));
        }
        used
    }
}

/// A time-cube key (`stats_cells`): enterprise, send hour, channel,
/// carrier, place, open hour.
type TimeKey = (u8, i64, u8, u8, u8, i64);
/// An audience-cube key (`stats_audience`): enterprise, send day, channel,
/// gender, age band, region, occupation.
type AudienceKey = (u8, i64, u8, u8, i64, u8, u8);

async fn stats(events: u64, backend: Backend) -> anyhow::Result<()> {
    use relay_svc::stats::{self, Dimension, Query, Thresholds, Viewer};
    use std::collections::HashMap;

    let Some(fixture) = integration_tests::store(backend).await else {
        anyhow::bail!("--backend postgres needs CHUKEI_TEST_DATABASE_URL");
    };
    // The synthetic history: people with attributes, 10 campaigns a month
    // each, delivered 97%, opened 30% within a day, mostly at home; folded
    // into both cubes the way the relay's rollup worker folds events.
    let generated = Instant::now();
    let regions = 12_u8;
    let mut time: HashMap<TimeKey, [i64; 3]> = HashMap::new();
    let mut audience: HashMap<AudienceKey, [i64; 3]> = HashMap::new();
    let mut rng = chukei_proto::rng::Rng::new(7);
    let start_hour: i64 = 1_795_651_200_000 / 3_600_000 - 30 * 24;
    let people = (events as f64 / 2.3 / 10.0).ceil() as u64;
    let mut made = 0_u64;
    'people: for person in 0..people {
        let enterprise = (person % 10) as u8;
        let gender = rng.below(3) as u8;
        let age = if rng.chance(0.75) {
            10 * (1 + rng.below(7) as i64)
        } else {
            -1
        };
        let region = rng.below(u64::from(regions)) as u8;
        let occupation = rng.below(8) as u8;
        let carrier = rng.below(3) as u8;
        let channel = 1 + rng.below(4) as u8;
        for campaign in 0..10 {
            let send_hour = start_hour + campaign * 72 + rng.below(3) as i64;
            let mut count = |place: u8, open_hour: i64, kind: usize| {
                time.entry((enterprise, send_hour, channel, carrier, place, open_hour))
                    .or_default()[kind] += 1;
                audience
                    .entry((
                        enterprise,
                        send_hour.div_euclid(24),
                        channel,
                        gender,
                        age,
                        region,
                        occupation,
                    ))
                    .or_default()[kind] += 1;
            };
            count(0, -1, 0);
            made += 1;
            if rng.chance(0.97) {
                let place = 1 + region;
                count(place, -1, 1);
                made += 1;
                if rng.chance(0.3) {
                    let delay = (-(1.0 - rng.unit()).ln() * 3.0).min(23.0) as i64;
                    let place = if rng.chance(0.9) {
                        place
                    } else {
                        1 + rng.below(u64::from(regions)) as u8
                    };
                    count(place, send_hour + delay, 2);
                    made += 1;
                }
            }
            if made >= events {
                break 'people;
            }
        }
    }
    println!(
        "history: {made} events folded into {} time cells and {} audience cells in {:.1}s",
        time.len(),
        audience.len(),
        generated.elapsed().as_secs_f64(),
    );

    let loaded = Instant::now();
    let text = |n: u8, prefix: &str| {
        if n == 0 {
            String::new()
        } else {
            format!("{prefix}{n}")
        }
    };
    let time: Vec<(TimeKey, [i64; 3])> = time.into_iter().collect();
    let audience: Vec<(AudienceKey, [i64; 3])> = audience.into_iter().collect();
    macro_rules! load {
        ($pool:expr) => {{
            let mut tx = $pool.begin().await?;
            for chunk in time.chunks(2_000) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO stats_cells (enterprise_id, send_hour, channel, carrier_id, place, open_hour, \
                     sent, delivered, opened) ",
                );
                query.push_values(chunk, |mut row, (key, counts)| {
                    let (enterprise, send_hour, channel, carrier, place, open_hour) = *key;
                    row.push_bind(format!("ent_{enterprise}"))
                        .push_bind(send_hour)
                        .push_bind(i64::from(channel))
                        .push_bind(format!("carrier-{carrier}"))
                        .push_bind(text(place, "region-"))
                        .push_bind(open_hour)
                        .push_bind(counts[0])
                        .push_bind(counts[1])
                        .push_bind(counts[2]);
                });
                query.build().execute(&mut *tx).await?;
            }
            for chunk in audience.chunks(2_000) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO stats_audience (enterprise_id, send_day, channel, gender, age_band, region, \
                     occupation, sent, delivered, opened) ",
                );
                query.push_values(chunk, |mut row, (key, counts)| {
                    let (enterprise, send_day, channel, gender, age, region, occupation) = *key;
                    row.push_bind(format!("ent_{enterprise}"))
                        .push_bind(send_day)
                        .push_bind(i64::from(channel))
                        .push_bind(["female", "male", ""][usize::from(gender)])
                        .push_bind(age)
                        .push_bind(format!("region-{}", region + 1))
                        .push_bind(text(occupation, "occupation-"))
                        .push_bind(counts[0])
                        .push_bind(counts[1])
                        .push_bind(counts[2]);
                });
                query.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }};
    }
    match &fixture.store {
        relay_svc::storage::Store::Sqlite(pool, _) => load!(pool),
        relay_svc::storage::Store::Postgres(pool, _) => load!(pool),
    }
    if let relay_svc::storage::Store::Postgres(pool, _) = &fixture.store {
        sqlx::query("ANALYZE").execute(pool).await?;
    }
    println!(
        "loaded into {backend:?} in {:.1}s",
        loaded.elapsed().as_secs_f64()
    );

    let month = (start_hour * 3_600_000, (start_hour + 31 * 24) * 3_600_000);
    let enterprise = Viewer::Enterprise("ent_3".into());
    let operator = Viewer::Operator(None);
    let cases: [(&str, &Viewer, Vec<Dimension>); 7] = [
        ("enterprise: total", &enterprise, vec![]),
        (
            "enterprise: channel x hour",
            &enterprise,
            vec![Dimension::Channel, Dimension::SendHour],
        ),
        (
            "enterprise: age x gender",
            &enterprise,
            vec![Dimension::Age, Dimension::Gender],
        ),
        (
            "enterprise: region x channel x day",
            &enterprise,
            vec![Dimension::Region, Dimension::Channel, Dimension::Day],
        ),
        (
            "enterprise: place x open hour",
            &enterprise,
            vec![Dimension::Place, Dimension::OpenHour],
        ),
        (
            "operator: carrier x channel",
            &operator,
            vec![Dimension::Carrier, Dimension::Channel],
        ),
        (
            "operator: occupation",
            &operator,
            vec![Dimension::Occupation],
        ),
    ];
    println!("GetStats over a month of sends (median of 5 runs):");
    for (name, viewer, by) in cases {
        let query = Query::new(by, month.0, month.1, "Asia/Tokyo", viewer)?;
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..5 {
            let started = Instant::now();
            rows = stats::breakdown(&fixture.store, viewer, &query, Thresholds::default())
                .await?
                .len();
            times.push(started.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        println!("  {name:<36} {:>8.1} ms   {rows} rows", 1000.0 * times[2]);
    }
    fixture.close().await;
    Ok(())
}

/// Resident and peak resident memory of process `pid` (MiB).
fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn slow_carrier(
    users: usize,
    pace: u32,
    seconds: u64,
    backend: Backend,
) -> anyhow::Result<()> {
    use integration_tests::process::{Process, binary_in, free_port};
    use relay_svc::credentials::hash_secret;

    let bin_dir = std::env::current_exe()?
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no directory beside this program"))?
        .to_path_buf();
    let dir = tempfile::tempdir()?;
    let database =
        match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(integration_tests::postgres_database().await?.ok_or_else(
                || anyhow::anyhow!("--backend postgres needs CHUKEI_TEST_DATABASE_URL"),
            )?),
        };
    let relay_url_db = match &database {
        Some((url, _)) => url.clone(),
        None => {
            std::fs::create_dir_all(dir.path().join("relay"))?;
            format!("sqlite://{}", dir.path().join("relay/relay.db").display())
        }
    };
    let (api_key, carrier_token) = (
        "bench-api-key-0123456789abcdef",
        "bench-carrier-token-0123456789",
    );
    let carrier_port = free_port()?;
    let relay_port = free_port()?;

    // The registries, seeded below the edge.
    let seeding = Instant::now();
    let store = relay_svc::storage::Store::connect(&relay_url_db).await?;
    let now = chukei_proto::clock::Clock::system().now_ms();
    store
        .create_enterprise("bench", "bench", &hash_secret(api_key), now)
        .await?;
    store
        .upsert_carrier(
            "slow",
            &format!("http://127.0.0.1:{carrier_port}"),
            &hash_secret(carrier_token),
            now,
        )
        .await?;
    seed_registered(&store, "slow", "bench", users, now).await?;
    store.close().await;
    println!(
        "seeded {users} registered users on {backend:?} in {:.1}s",
        seeding.elapsed().as_secs_f64()
    );

    let deliver_token = "bench-deliver-token-0123456789";
    let mut relay_cmd = std::process::Command::new(binary_in(&bin_dir, "relay-svc")?);
    relay_cmd
        .args(["--listen", &format!("127.0.0.1:{relay_port}")])
        .arg("--data-dir")
        .arg(dir.path().join("relay"))
        .env("CHUKEI_RELAY_ADMIN_TOKEN", "bench-admin-token-0123456789")
        .env("CHUKEI_RELAY_DELIVER_TOKEN", deliver_token)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    if let Some((url, _)) = &database {
        relay_cmd.args(["--database-url", url]);
    }
    let relay = Process::spawn("relay-svc", &mut relay_cmd)?;
    let relay_url = format!("http://127.0.0.1:{relay_port}");
    integration_tests::wait_healthy(&relay_url).await?;
    let relay_pid = relay
        .pid()
        .ok_or_else(|| anyhow::anyhow!("relay not running"))?;
    let carrier = Process::spawn(
        "carrier-svc",
        std::process::Command::new(binary_in(&bin_dir, "carrier-svc")?)
            .args(["--listen", &format!("127.0.0.1:{carrier_port}")])
            .args(["--carrier-id", "slow", "--relay-url", &relay_url])
            .args(["--pace-per-sec", &pace.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("carrier"))
            .env("CHUKEI_CARRIER_TOKEN", carrier_token)
            .env("CHUKEI_CARRIER_RELAY_TOKEN", deliver_token)
            .env(
                "CHUKEI_CARRIER_ADMIN_TOKEN",
                "bench-carrier-admin-0123456789",
            )
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null()),
    )?;
    integration_tests::wait_healthy(&format!("http://127.0.0.1:{carrier_port}")).await?;
    let idle = memory_mib(relay_pid).unwrap_or_default();
    println!("relay idle with {users} registered: RSS {:.1} MiB", idle.0);

    let channel = tonic::transport::Channel::from_shared(relay_url)?
        .connect()
        .await?;
    let mut client = pb::enterprise_api_client::EnterpriseApiClient::with_interceptor(
        channel,
        chukei_proto::auth::BearerInterceptor::new(api_key)?,
    );
    let sent = Instant::now();
    let message_id = client
        .send_message(integration_tests::send_request(
            "slow",
            pb::target::Kind::AllRegistered(true),
            "backpressure",
            common::Channel::Sms,
        ))
        .await?
        .into_inner()
        .message_id;
    println!("t(s)  relay RSS MiB  matched  handed over  backlog  expected drain");
    let mut peak_rss: f64 = idle.0;
    let mut samples = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = client
            .get_message(pb::GetMessageRequest {
                message_id: message_id.clone(),
            })
            .await?
            .into_inner();
        let (rss, _) = memory_mib(relay_pid).unwrap_or_default();
        peak_rss = peak_rss.max(rss);
        let t = sent.elapsed().as_secs();
        samples.push(rss);
        println!(
            "{t:>4}  {rss:>13.1}  {:>7}  {:>11}  {:>7}  {}",
            status.matched,
            status.handed_over,
            status.backlog,
            status
                .expected_drain
                .map_or("-".into(), |d| format!("{}s", d.seconds))
        );
        let done = status.matched > 0 && status.backlog == 0;
        if done || (seconds > 0 && t >= seconds) {
            break;
        }
    }
    let (rss, hwm) = memory_mib(relay_pid).unwrap_or_default();
    let later = &samples[samples.len().min(10)..];
    let settled = if later.is_empty() {
        String::new()
    } else {
        format!(
            "; after the first 10 s: min {:.1} / max {:.1} MiB",
            later.iter().copied().fold(f64::INFINITY, f64::min),
            later.iter().copied().fold(0.0, f64::max),
        )
    };
    println!(
        "relay memory: idle {:.1} MiB, peak sampled {peak_rss:.1} MiB, peak (VmHWM) {hwm:.1} MiB, at the end {rss:.1} MiB{settled}",
        idle.0,
    );
    carrier.terminate(Duration::from_secs(20))?;
    relay.terminate(Duration::from_secs(20))?;
    if let Some((_, name)) = &database {
        integration_tests::drop_postgres_database(name).await?;
    }
    Ok(())
}

/// A broadcast to everyone registered, on SMS.
fn broadcast_request(idempotency_key: &str) -> pb::SendMessageRequest {
    pb::SendMessageRequest {
        idempotency_key: idempotency_key.into(),
        target: Some(pb::Target {
            kind: Some(pb::target::Kind::AllRegistered(true)),
        }),
        content: Some(common::Content {
            text: "benchmark".into(),
            ..Default::default()
        }),
        channel: common::Channel::Sms as i32,
        ..Default::default()
    }
}

/// A hub with one carrier and `users` people all registered with one
/// enterprise (nobody opens); its client, the first refs, the terminals.
async fn hub_with_registered(
    backend: Backend,
    users: usize,
    carriers: &[&str],
) -> anyhow::Result<(
    Hub,
    integration_tests::Enterprise,
    Vec<String>,
    terminal_sim::terminal::Terminals,
)> {
    let tuning = Tuning::DEFAULTS;
    let Some(mut hub) = Hub::start_with(backend, carriers, tuning).await? else {
        anyhow::bail!("--backend postgres needs CHUKEI_TEST_DATABASE_URL");
    };
    let (shop, key) = hub.create_enterprise("bench").await?;
    let carrier_ids: Vec<String> = carriers.iter().map(|c| (*c).to_owned()).collect();
    let fleet = Fleet::generate(1, users, &carrier_ids)
        .with_every_channel()
        .everyone_registers();
    let setup = Instant::now();
    let terminals = hub
        .start_fleet(
            fleet,
            vec![EnterpriseChoice {
                enterprise_id: shop,
                service_ids: vec![],
            }],
            OpenMode::Never,
        )
        .await?;
    println!(
        "setup: {users} users registered in {:.1}s",
        setup.elapsed().as_secs_f64()
    );
    let mut client = hub.enterprise(&key).await?;
    let refs = client
        .list_registrations(pb::ListRegistrationsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .registrations
        .into_iter()
        .map(|r| r.user_ref)
        .collect();
    Ok((hub, client, refs, terminals))
}

async fn latency(messages: usize, backend: Backend) -> anyhow::Result<()> {
    let (hub, client, refs, terminals) = hub_with_registered(backend, 1000, &["alpha"]).await?;
    // Warm up the connections and the relay's first reads.
    let warm = integration_tests::latency::one_at_a_time(
        &client,
        &refs,
        50,
        terminals.watch_arrivals(),
        "warm",
    )
    .await;
    anyhow::ensure!(
        warm.arrived == 50,
        "warm-up lost messages: {}",
        warm.summary()
    );
    let run = integration_tests::latency::one_at_a_time(
        &client,
        &refs,
        messages,
        terminals.watch_arrivals(),
        "idle",
    )
    .await;
    println!(
        "single targeted messages, idle hub, {backend:?}: {}",
        run.summary()
    );
    hub.shutdown().await
}

async fn targeted(
    count: usize,
    concurrency: usize,
    seconds: u64,
    backend: Backend,
) -> anyhow::Result<()> {
    let (hub, client, refs, terminals) = hub_with_registered(backend, 10_000, &["alpha"]).await?;
    let ceiling = integration_tests::latency::flat_out(
        &client,
        &refs,
        count,
        concurrency,
        terminals.watch_arrivals(),
        "flat-out",
    )
    .await;
    println!(
        "closed loop, {concurrency} senders, {backend:?}: {}",
        ceiling.summary()
    );
    let max_rate = ceiling.arrived as f64 / ceiling.elapsed.as_secs_f64().max(1e-9);
    // The bulk API apart: the same number of messages on a few streams.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let streams = 4;
    let streamed = integration_tests::latency::streamed(
        &client,
        &refs,
        count,
        streams,
        terminals.watch_arrivals(),
        "streamed",
    )
    .await;
    println!(
        "closed loop, SendMessages on {streams} streams, {backend:?}: {}",
        streamed.summary()
    );
    for share in [0.5, 0.8] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rate = (max_rate * share).max(1.0);
        let run = integration_tests::latency::open_loop(
            &client,
            &refs,
            rate,
            Duration::from_secs(seconds),
            terminals.watch_arrivals(),
            &format!("open-{share}"),
        )
        .await;
        println!(
            "open loop at {:.0}% of the ceiling ({rate:.0}/s offered), {backend:?}: {}",
            share * 100.0,
            run.summary()
        );
    }
    hub.shutdown().await
}

async fn priority(users: usize, rate: f64, backend: Backend) -> anyhow::Result<()> {
    let (hub, mut client, refs, terminals) =
        hub_with_registered(backend, users, &["alpha", "beta", "gamma"]).await?;
    let idle = integration_tests::latency::open_loop(
        &client,
        &refs,
        rate,
        Duration::from_secs(5),
        terminals.watch_arrivals(),
        "before",
    )
    .await;
    println!(
        "targeted at {rate}/s, idle, {backend:?}: {}",
        idle.summary()
    );
    let started = Instant::now();
    let broadcast = client
        .send_message(broadcast_request("broadcast"))
        .await?
        .into_inner();
    // Targeted messages while the broadcast is being expanded and handed over.
    let during = integration_tests::latency::open_loop(
        &client,
        &refs,
        rate,
        Duration::from_secs(10),
        terminals.watch_arrivals(),
        "during",
    )
    .await;
    let status = client
        .get_message(pb::GetMessageRequest {
            message_id: broadcast.message_id.clone(),
        })
        .await?
        .into_inner();
    println!(
        "targeted at {rate}/s during a broadcast to {users}, {backend:?}: {} (broadcast after {:.1}s: {} of {} handed over)",
        during.summary(),
        started.elapsed().as_secs_f64(),
        status.handed_over,
        status.matched
    );
    hub.shutdown().await
}

/// Runs the transport ceiling and returns its rate (deliveries a second).
async fn transport(deliveries: usize, batch_size: usize, window: usize) -> anyhow::Result<f64> {
    use chukei_proto::carrier::v1 as cpb;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                cpb::carrier_server::CarrierServer::new(integration_tests::AckingCarrier::default())
                    .max_decoding_message_size(64 * 1024 * 1024),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = cpb::carrier_client::CarrierClient::new(channel)
        .max_encoding_message_size(64 * 1024 * 1024);
    let (down, down_rx) = tokio::sync::mpsc::channel::<cpb::RelayToCarrier>(window + 4);
    let mut up = client
        .deliver(tokio_stream::wrappers::ReceiverStream::new(down_rx))
        .await?
        .into_inner();
    // Deliveries as the relay's dispatcher builds them: one campaign's
    // recipients packed behind its content (Deliver protocol version 2).
    let batch = |batch_id: u64| cpb::DeliveryBatch {
        batch_id,
        messages: vec![cpb::MessageDeliveries {
            message_id: "msg_0192f0a0b1c2d3e4f5a6b7c8d9e0f1a2".into(),
            content: Some(common::Content {
                text: "benchmark".into(),
                ..Default::default()
            }),
            channel: common::Channel::Sms as i32,
            expires_at: Some(chukei_proto::clock::to_timestamp(1_900_000_000_000)),
            single_attempt: true,
            delivery_ids: (0..batch_size)
                .map(|i| (batch_id as usize * batch_size + i) as u64)
                .collect(),
            user_ids: (0..batch_size).map(|i| format!("user-{i:07}")).collect(),
            ..Default::default()
        }],
    };
    let batches = deliveries.div_ceil(batch_size) as u64;
    let started = Instant::now();
    let mut sent = 0;
    let mut acked = 0;
    while acked < batches {
        while sent < batches && sent - acked < window as u64 {
            sent += 1;
            down.send(cpb::RelayToCarrier {
                kind: Some(cpb::relay_to_carrier::Kind::Batch(batch(sent))),
            })
            .await?;
        }
        match up.message().await? {
            Some(_) => acked += 1,
            None => anyhow::bail!("the stream ended"),
        }
    }
    let elapsed = started.elapsed();
    let rate = (batches as usize * batch_size) as f64 / elapsed.as_secs_f64();
    println!(
        "transport ceiling: {} deliveries in batches of {batch_size}, {window} in flight, over a bare Deliver stream: {:.2}s, {rate:.0} deliveries/s",
        batches as usize * batch_size,
        elapsed.as_secs_f64(),
    );
    Ok(rate)
}
