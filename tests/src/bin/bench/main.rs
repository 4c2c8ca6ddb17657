//! Benchmarks that print figures (never assert them). One scenario so far:
//!
//! `bench broadcast --users 100000 --backend sqlite|postgres` — a broadcast to
//! every registered user: time from `SendMessage` until every delivery is
//! handed to a carrier (acked on the carrier streams), and until every
//! delivery is at a terminal (received by the fleet), with recipients per
//! second. The relay, three carriers and the fleet run in this process, each
//! on its own runtime, talking gRPC over loopback. The relay folds the
//! events into its statistics after the hand-over (it stands aside while
//! they arrive): the bench then waits for the fold to catch up and prints
//! the CPU to receipts counted and with the fold.
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
//! `bench broadcast --users N --processes` runs the same broadcast with the
//! relay, each carrier and the fleet as processes of their own (the release
//! binaries beside `bench`) and prints each one's CPU-seconds and peak
//! resident memory: the relay's own, apart from the fleet's, and the
//! relay's CPU for the fold after the broadcast.
//!
//! `bench broadcast --users N --webhook` also delivers every event to a
//! local webhook receiver (signed batches from the relay's events log)
//! and reports events per second there.
//!
//! `bench gateways --users 10000 [--jasmin PATH]` — one broadcast through
//! each way a carrier reaches people: simulated terminals, SMS over SMPP to
//! a scripted SMSC, e-mail over SMTP to aiosmtpd and (with `--jasmin`, the
//! `jasmind.py` of a venv with jasmin==0.11.0) SMS through Jasmin; each
//! one's rate delivered-and-counted and CPU-seconds per component.
//!
//! `bench billing --people 100000 --backend sqlite|postgres` — what charging
//! costs the rollup fold: a campaign to that many people is handed over,
//! delivered and 30% opened at the storage seam, then the events are
//! folded (statistics, learning tables and — with a rate card — ledger
//! lines), once without and once with a rate card, each on a fresh database.

use std::time::{Duration, Instant};

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use clap::{Parser, Subcommand, ValueEnum};
use integration_tests::{Backend, Hub, Tuning, machine};

mod campaigns;
mod carriers;
mod gateways;
mod measure;
mod processes;
mod targeted;
mod transport;

use campaigns::*;
use carriers::*;
use measure::*;
use targeted::*;
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;
use transport::*;

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
        /// Also deliver every event to a local webhook receiver and report
        /// its rate (run once with and once without to compare).
        #[arg(long)]
        webhook: bool,
        /// Run the relay, each carrier and the fleet as their own processes
        /// (the release binaries beside this one: `cargo build --release
        /// --bins` first) and print each one's CPU and peak memory.
        #[arg(long, conflicts_with = "webhook")]
        processes: bool,
    },
    /// The rollup fold's cost with and without charging to the ledger.
    Billing {
        /// People the campaign reaches.
        #[arg(long, default_value_t = 100_000)]
        people: usize,
        #[arg(long, value_enum, default_value = "sqlite")]
        backend: BackendArg,
        /// Events folded per transaction (the rollup worker's batch by default).
        #[arg(long, default_value_t = relay_svc::rollup::BATCH)]
        fold_batch: u32,
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
    /// The same broadcast through terminals, an SMSC, a mail server (and Jasmin).
    Gateways {
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        /// Also through Jasmin: the `jasmind.py` of a venv with jasmin==0.11.0.
        #[arg(long)]
        jasmin: Option<std::path::PathBuf>,
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
    // `RUST_LOG` applies to every scenario, including those that run the
    // storage seam without a hub (`billing`, `stats`).
    integration_tests::init_logs();
    println!("machine: {}", machine());
    match scenario {
        Scenario::Broadcast {
            users,
            backend,
            batch_size,
            webhook: _,
            processes: true,
        } => processes::broadcast_across_processes(users, backend.backend(), batch_size).await,
        Scenario::Broadcast {
            users,
            backend,
            batch_size,
            webhook,
            processes: false,
        } => broadcast(users, backend.backend(), batch_size, webhook).await,
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
        Scenario::Gateways { users, jasmin } => gateways::gateways(users, jasmin).await,
        Scenario::Billing {
            people,
            backend,
            fold_batch,
        } => {
            println!("rollup fold of a campaign to {people} people on {backend:?}:");
            for priced in [false, true] {
                billing(people, backend.backend(), priced, fold_batch).await?;
            }
            Ok(())
        }
    }
}
