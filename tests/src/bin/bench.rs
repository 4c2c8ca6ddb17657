//! Benchmarks that print figures (never assert them). One scenario so far:
//!
//! `bench broadcast --users 100000 --backend sqlite|postgres` — a broadcast to
//! every registered user: time from `SendMessage` until every delivery is
//! handed to a carrier (acked on the carrier streams), and until every
//! delivery is at a terminal (received by the fleet), with recipients per
//! second. The relay, three carriers and the fleet run in this process, each
//! on its own runtime, talking gRPC over loopback.

use std::time::{Duration, Instant};

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use clap::{Parser, Subcommand, ValueEnum};
use integration_tests::{Backend, Hub, Tuning, machine};
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;

#[derive(Parser, Debug)]
#[command(name = "bench")]
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
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
    Sqlite,
    Postgres,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Scenario::Broadcast {
        users,
        backend,
        batch_size,
    } = args.scenario;
    let backend = match backend {
        BackendArg::Sqlite => Backend::Sqlite,
        BackendArg::Postgres => Backend::Postgres,
    };
    println!("machine: {}", machine());
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
    let mut fleet = Fleet::generate(1, users, &carriers.map(String::from)).with_every_channel();
    for user in &mut fleet.users {
        user.behaviour.registration_share = 1.0;
    }
    let setup = Instant::now();
    let terminals = hub
        .start_fleet(
            fleet.clone(),
            vec![EnterpriseChoice {
                enterprise_id: shop.clone(),
                service_ids: vec![],
            }],
            OpenMode::Never,
        )
        .await?;
    let registered = integration_tests::registered_users(&fleet, &shop).len();
    println!(
        "setup: {users} users provisioned, attached, {registered} registered in {:.1}s",
        setup.elapsed().as_secs_f64()
    );

    let mut client = hub.enterprise(&key).await?;
    let started = Instant::now();
    let sent = client
        .send_message(pb::SendMessageRequest {
            idempotency_key: "bench".into(),
            target: Some(pb::Target {
                kind: Some(pb::target::Kind::AllRegistered(true)),
            }),
            content: Some(common::Content {
                text: "benchmark".into(),
                ..Default::default()
            }),
            channel: common::Channel::Sms as i32,
            ..Default::default()
        })
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
    hub.shutdown().await?;
    Ok(())
}
