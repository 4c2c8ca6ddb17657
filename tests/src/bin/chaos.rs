//! The chaos harness from the command line: one run, one report line.
//!
//!   cargo run --release -p integration-tests --bin chaos -- --backend sqlite --disk-full
//!   CHUKEI_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo run --release -p integration-tests --bin chaos -- --backend postgres
//!
//! Exits 1 when any invariant was violated. `docs/reliability.md` has the figures.

use std::path::PathBuf;

use clap::Parser;
use integration_tests::chaos::{Options, run};
use integration_tests::{Backend, drop_postgres_database, machine, postgres_database};

#[derive(Parser, Debug)]
#[command(name = "chaos", version)]
struct Args {
    /// sqlite, or postgres (a fresh database from CHUKEI_TEST_DATABASE_URL).
    #[arg(long, default_value = "sqlite")]
    backend: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// SendMessage calls (targeted messages, small groups, some broadcasts).
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    #[arg(long, default_value_t = 2_000)]
    users: usize,
    #[arg(long, default_value_t = 3)]
    carriers: usize,
    /// Carrier SIGKILL + restart cycles.
    #[arg(long, default_value_t = 20)]
    carrier_kills: usize,
    /// Relay SIGKILL + restart cycles.
    #[arg(long, default_value_t = 5)]
    relay_kills: usize,
    /// Relay replicas on the one database; a killed one stays down past its leases.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Relay↔carrier partitions (2 s each, through a fault proxy).
    #[arg(long, default_value_t = 5)]
    partitions: usize,
    /// Crash-point cycles: a relay or carrier restarted armed at a crash
    /// point (`chukei_proto::crash`, each in turn) dies there on its own.
    #[arg(long, default_value_t = 5)]
    crash_points: usize,
    /// Share of terminal event batches sent twice (batches are also reordered).
    #[arg(long, default_value_t = 0.2)]
    duplicate_events: f64,
    /// Fill the relay's disk mid-run (SQLite on a tmpfs; needs root).
    #[arg(long)]
    disk_full: bool,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// SendMessage calls started per second (0: as fast as they go).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Where the binaries are (default: beside this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = chukei_proto::server::parse_args::<Args>();
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow::anyhow!("no directory beside this program"))?
            .to_path_buf(),
    };
    let backend = match args.backend.as_str() {
        "sqlite" => Backend::Sqlite,
        "postgres" => Backend::Postgres,
        other => anyhow::bail!("--backend: {other:?} is not sqlite or postgres"),
    };
    let database =
        match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(postgres_database().await?.ok_or_else(|| {
                anyhow::anyhow!("--backend postgres needs CHUKEI_TEST_DATABASE_URL")
            })?),
        };
    println!("# {}", machine());
    let report = run(Options {
        seed: args.seed,
        backend,
        database_url: database.as_ref().map(|(url, _)| url.clone()),
        messages: args.messages,
        users: args.users,
        carriers: args.carriers,
        carrier_kills: args.carrier_kills,
        relay_kills: args.relay_kills,
        replicas: args.replicas,
        partitions: args.partitions,
        crash_points: args.crash_points,
        duplicate_events: args.duplicate_events,
        disk_full: args.disk_full,
        concurrency: args.concurrency,
        rate: args.rate,
        tamper: false,
        bin_dir,
    })
    .await;
    if let Some((_, name)) = &database {
        drop_postgres_database(name).await?;
    }
    let report = report?;
    println!("{report}");
    if report.violations.total() > 0 {
        std::process::exit(1);
    }
    Ok(())
}
