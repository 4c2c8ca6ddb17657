//! The local run: starts the relay (SQLite), three carriers and a terminal
//! fleet as real processes, provisions enterprises, registrations and
//! consents, sends a targeted message with a follow-up, a multi-channel
//! broadcast, a segment message with fallback, a service message on the best
//! channel and an evening-window message held at the carriers, lets a
//! simulated day of opening behaviour pass in seconds, and prints what was
//! matched, delivered, opened, deferred and skipped per message and per carrier. With `--keep-running` it leaves the hub up and prints how to
//! point `enterprise-cli` at it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use clap::Parser;
use integration_tests::process::{Process, binary_in, free_port};
use integration_tests::{wait_healthy, wait_healthy_for};
use tonic::transport::Channel;

/// Run the whole hub locally on SQLite and relay a few campaigns through it.
#[derive(Parser, Debug)]
#[command(name = "chukei-local", version)]
struct Args {
    /// Simulated users in the terminal fleet.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Seed of the fleet.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Simulated seconds per real second (3600: an hour passes every second).
    #[arg(long, default_value_t = 3600.0)]
    time_scale: f64,
    /// Simulated hours of opening behaviour to wait for after delivery.
    #[arg(long, default_value_t = 24)]
    open_hours: u64,
    /// Where the services keep their databases (default: a fresh temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Leave the hub running after the report, until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Where relay-svc, carrier-svc and terminal-sim are (default: beside this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

const CARRIERS: [&str; 3] = ["aozora", "hikari", "tsubasa"];

/// The hub's processes, stopped in start order (the relay first, so no
/// carrier sees its caller vanish mid-stream); any left are killed on drop.
/// Each one's log goes to `<name>.log` in `logs`, so the report stays
/// readable whatever the services log.
struct Children {
    processes: Vec<Process>,
    logs: PathBuf,
}

impl Children {
    fn spawn(&mut self, name: &str, command: &mut Command) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.logs)?;
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))?;
        self.processes
            .push(Process::spawn(name, command.stderr(log))?);
        Ok(())
    }

    fn stop(&mut self) {
        for process in self.processes.drain(..) {
            if let Err(error) = process.terminate(Duration::from_secs(15)) {
                eprintln!("{error}");
            }
        }
    }
}

fn token(label: &str) -> anyhow::Result<String> {
    Ok(format!(
        "{label}-{}",
        relay_svc::credentials::random_hex(16)?
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = chukei_proto::server::parse_args::<Args>();
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow::anyhow!("no directory beside this program"))?
            .to_path_buf(),
    };
    let temp = tempfile::tempdir()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let origin_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)?
        .as_millis()
        .to_string();
    let time_scale = args.time_scale.to_string();
    let admin_token = token("admin")?;
    let deliver_token = token("deliver")?;
    let carrier_admin_token = token("carrier-admin")?;
    let mut children = Children {
        processes: Vec::new(),
        logs: data_dir.join("logs"),
    };
    let started = Instant::now();

    println!(
        "chukei local run: relay on SQLite, {} carriers, {} simulated users, clock x{}",
        CARRIERS.len(),
        args.users,
        args.time_scale
    );
    println!("service logs: {}", children.logs.display());
    let relay_port = free_port()?;
    let relay_url = format!("http://127.0.0.1:{relay_port}");
    children.spawn(
        "relay-svc",
        Command::new(binary_in(&bin_dir, "relay-svc")?)
            .args(["--listen", &format!("127.0.0.1:{relay_port}")])
            .arg("--data-dir")
            .arg(data_dir.join("relay"))
            .args(["--time-scale", &time_scale, "--time-origin-ms", &origin_ms])
            // Attention: 30 minutes of quiet around targeted messages, at most
            // 3 campaign messages a day for people who stop opening, 6 for anyone.
            .args([
                "--quiet-period-secs",
                "1800",
                "--daily-cap",
                "3",
                "--daily-budget",
                "6",
            ])
            .env("CHUKEI_RELAY_ADMIN_TOKEN", &admin_token)
            .env("CHUKEI_RELAY_DELIVER_TOKEN", &deliver_token)
            .env("RUST_LOG", "warn"),
    )?;
    wait_healthy(&relay_url).await?;
    let channel = Channel::from_shared(relay_url.clone())?.connect().await?;
    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        channel.clone(),
        BearerInterceptor::new(&admin_token)?,
    );

    // The operator's rate card (yen per delivered / per opened message, Tokyo hours).
    let entry =
        |channel: common::Channel, from_hour, to_hour, delivered, opened| pb::RateCardEntry {
            channel: channel as i32,
            from_hour,
            to_hour,
            delivered_price: delivered,
            opened_price: opened,
        };
    admin
        .set_rate_card(pb::SetRateCardRequest {
            entries: vec![
                entry(common::Channel::Sms, 8, 18, 3, 2),
                entry(common::Channel::Sms, 18, 8, 4, 2),
                entry(common::Channel::Rcs, 0, 0, 2, 3),
                entry(common::Channel::Sns, 0, 0, 1, 1),
                entry(common::Channel::Email, 0, 0, 1, 1),
            ],
            zone: "Asia/Tokyo".into(),
            dynamic: Some(pb::DynamicPricing {
                floor_percent: 50,
                ceiling_percent: 200,
                min_deliveries: 100,
            }),
        })
        .await?;

    // Enterprises and their services.
    let mut enterprises = Vec::new();
    for (name, services) in [
        ("Sakura Mart", vec!["loyalty", "pharmacy"]),
        ("Fuji Rail", vec![]),
        ("Kaze Bank", vec!["cards"]),
    ] {
        let created = admin
            .create_enterprise(pb::CreateEnterpriseRequest {
                name: name.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut service_ids = Vec::new();
        for service in services {
            service_ids.push(
                admin
                    .create_service(pb::CreateServiceRequest {
                        enterprise_id: created.enterprise_id.clone(),
                        name: service.into(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .service_id,
            );
        }
        enterprises.push((name, created, service_ids));
    }

    // Carriers.
    let mut carrier_flags = Vec::new();
    let mut consent_pages = Vec::new();
    for carrier_id in CARRIERS {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let consent_port = free_port()?;
        consent_pages.push(format!("{carrier_id}: http://127.0.0.1:{consent_port}/"));
        let carrier_token = token(carrier_id)?;
        children.spawn(
            carrier_id,
            Command::new(binary_in(&bin_dir, "carrier-svc")?)
                .args([
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--carrier-id",
                    carrier_id,
                    "--relay-url",
                    &relay_url,
                    "--consent-listen",
                    &format!("127.0.0.1:{consent_port}"),
                ])
                .arg("--data-dir")
                .arg(data_dir.join(carrier_id))
                .args(["--time-scale", &time_scale, "--time-origin-ms", &origin_ms])
                .env("CHUKEI_CARRIER_TOKEN", &carrier_token)
                .env("CHUKEI_CARRIER_RELAY_TOKEN", &deliver_token)
                .env("CHUKEI_CARRIER_ADMIN_TOKEN", &carrier_admin_token)
                .env("RUST_LOG", "warn"),
        )?;
        wait_healthy(&url).await?;
        admin
            .register_carrier(pb::RegisterCarrierRequest {
                carrier_id: carrier_id.into(),
                endpoint: url.clone(),
                token: carrier_token,
            })
            .await?;
        carrier_flags.push(format!("--carrier={carrier_id}={url}"));
    }

    // The fleet provisions its subscribers, attaches, and registers with consent.
    let fleet_port = free_port()?;
    let mut fleet = Command::new(binary_in(&bin_dir, "terminal-sim")?);
    fleet
        .args(["--listen", &format!("127.0.0.1:{fleet_port}"), "fleet"])
        .args([
            "--users",
            &args.users.to_string(),
            "--seed",
            &args.seed.to_string(),
        ])
        .args(&carrier_flags)
        .args(["--time-scale", &time_scale, "--time-origin-ms", &origin_ms])
        .env("CHUKEI_TERMINAL_CARRIER_ADMIN_TOKEN", &carrier_admin_token)
        .env("RUST_LOG", "warn");
    for (_, created, services) in &enterprises {
        fleet.arg(format!(
            "--enterprise={}:{}",
            created.enterprise_id,
            services.join(",")
        ));
    }
    children.spawn("terminal-sim", &mut fleet)?;
    let setup = Instant::now();
    wait_healthy_for(
        &format!("http://127.0.0.1:{fleet_port}"),
        Duration::from_secs(600),
    )
    .await?;
    println!(
        "fleet provisioned, attached and registered in {:.1}s",
        setup.elapsed().as_secs_f64()
    );

    // The campaigns.
    let enterprise = |index: usize| -> anyhow::Result<_> {
        let (name, created, services) = &enterprises[index];
        let client = pb::enterprise_api_client::EnterpriseApiClient::with_interceptor(
            channel.clone(),
            BearerInterceptor::new(&created.api_key)?,
        );
        Ok((*name, client, services.clone()))
    };
    let (sakura, mut sakura_client, sakura_services) = enterprise(0)?;
    let (fuji, mut fuji_client, _) = enterprise(1)?;
    // Three distinct users (a user registered with two services is listed twice).
    let mut refs: Vec<String> = Vec::new();
    for registration in sakura_client
        .list_registrations(pb::ListRegistrationsRequest {
            page_size: 50,
            ..Default::default()
        })
        .await?
        .into_inner()
        .registrations
    {
        if refs.len() < 3 && !refs.contains(&registration.user_ref) {
            refs.push(registration.user_ref);
        }
    }
    let request = |key: &str, kind: pb::target::Kind, text: &str, policy: pb::DeliveryPolicy| {
        pb::SendMessageRequest {
            idempotency_key: key.into(),
            target: Some(pb::Target { kind: Some(kind) }),
            content: Some(common::Content {
                text: text.into(),
                ..Default::default()
            }),
            policy: Some(policy),
            ..Default::default()
        }
    };
    let policy = |kind: pb::PolicyKind, channels: &[common::Channel], timeout_hours: i64| {
        pb::DeliveryPolicy {
            kind: kind as i32,
            channels: channels.iter().map(|c| *c as i32).collect(),
            timeout: (timeout_hours > 0).then_some(prost_types::Duration {
                seconds: timeout_hours * 3600,
                nanos: 0,
            }),
            ..Default::default()
        }
    };
    use common::Channel::{Email, Rcs, Sms, Sns};
    let mut campaigns = Vec::new();
    let sends = [
        (
            sakura,
            "targeted + follow-up",
            pb::SendMessageRequest {
                follow_up: Some(pb::FollowUp {
                    content: Some(common::Content {
                        text: "Thanks for picking up! Rate your visit?".into(),
                        ..Default::default()
                    }),
                    delay: Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    }),
                    channel: Sms as i32,
                }),
                ..request(
                    "local-targeted",
                    pb::target::Kind::Refs(pb::RefList { refs }),
                    "Your order is ready for pickup",
                    policy(pb::PolicyKind::Fixed, &[Rcs, Sms], 0),
                )
            },
        ),
        (
            fuji,
            "broadcast (all registered)",
            request(
                "local-broadcast",
                pb::target::Kind::AllRegistered(true),
                "Timetable change this weekend",
                policy(pb::PolicyKind::Multi, &[Sms, Email], 0),
            ),
        ),
        (
            sakura,
            "segment, fallback RCS→SMS",
            request(
                "local-segment",
                pb::target::Kind::Segment(pb::Segment {
                    gender: common::Gender::Female as i32,
                    age_min: Some(20),
                    age_max: Some(39),
                    regions: vec!["tokyo".into()],
                    ..Default::default()
                }),
                "Spring collection preview",
                policy(pb::PolicyKind::Fallback, &[Rcs, Sms], 2),
            ),
        ),
        (
            sakura,
            "service, best channel",
            request(
                "local-service",
                pb::target::Kind::ServiceId(sakura_services[0].clone()),
                "Double points today",
                policy(pb::PolicyKind::Best, &[Sns, Rcs, Sms], 0),
            ),
        ),
        (
            fuji,
            "18-21h Tokyo, at carrier",
            pb::SendMessageRequest {
                window: Some(common::DeliveryWindow {
                    kind: Some(common::delivery_window::Kind::Daily(common::DailyWindow {
                        start_minute: 18 * 60,
                        end_minute: 21 * 60,
                        time_zone: "Asia/Tokyo".into(),
                    })),
                }),
                window_mode: pb::WindowMode::AtCarrier as i32,
                ..request(
                    "local-evening",
                    pb::target::Kind::AllRegistered(true),
                    "Tonight only: late trains",
                    policy(pb::PolicyKind::MostUsed, &[Sms], 0),
                )
            },
        ),
    ];
    for (name, label, send) in sends {
        let client = if name == fuji {
            &mut fuji_client
        } else {
            &mut sakura_client
        };
        let sent = client.send_message(send).await?.into_inner();
        campaigns.push((name, label, sent.message_id, client.clone()));
    }

    // Wait for delivery, then for a simulated day of opening behaviour.
    let deadline = Instant::now() + Duration::from_secs(600);
    for (_, label, message_id, client) in &mut campaigns {
        loop {
            let status = client
                .get_message(pb::GetMessageRequest {
                    message_id: message_id.clone(),
                })
                .await?
                .into_inner();
            let settled = status.delivered + status.failed + status.expired + status.skipped;
            if status.state == pb::MessageState::HandedOver as i32 && settled >= status.matched {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("{label} was not delivered in time: {status:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let open_wait = Duration::from_secs_f64(args.open_hours as f64 * 3600.0 / args.time_scale);
    println!(
        "all delivered; waiting {:.0}s for {} simulated hours of opens…",
        open_wait.as_secs_f64(),
        args.open_hours
    );
    tokio::time::sleep(open_wait + Duration::from_secs(2)).await;

    println!();
    println!(
        "{:<12} {:<30} {:>8} {:>12} {:>10} {:>8} {:>9} {:>9} {:>8} {:>12}",
        "enterprise",
        "message",
        "matched",
        "handed_over",
        "delivered",
        "opened",
        "open_rate",
        "deferred",
        "skipped",
        "unsupported"
    );
    let mut plans = Vec::new();
    let mut per_carrier: HashMap<String, Vec<pb::CarrierStats>> = HashMap::new();
    for (name, label, message_id, client) in &mut campaigns {
        let status = client
            .get_message(pb::GetMessageRequest {
                message_id: message_id.clone(),
            })
            .await?
            .into_inner();
        println!(
            "{:<12} {:<30} {:>8} {:>12} {:>10} {:>8} {:>9} {:>9} {:>8} {:>12}",
            name,
            label,
            status.matched,
            status.handed_over,
            status.delivered,
            status.opened,
            rate(status.opened, status.delivered),
            status.deferred,
            status.skipped,
            status.unsupported
        );
        plans.push(format!("{label}: {}", status.plan));
        if !status.follow_up_message_id.is_empty() {
            let follow_up = client
                .get_message(pb::GetMessageRequest {
                    message_id: status.follow_up_message_id.clone(),
                })
                .await?
                .into_inner();
            println!(
                "{:<12} {:<30} {:>8} {:>12} {:>10} {:>8} {:>9}",
                name,
                "  its follow-up (openers only)",
                follow_up.matched,
                follow_up.handed_over,
                follow_up.delivered,
                follow_up.opened,
                rate(follow_up.opened, follow_up.delivered)
            );
        }
        let stats = admin
            .get_carrier_stats(pb::GetCarrierStatsRequest {
                message_id: message_id.clone(),
            })
            .await?
            .into_inner();
        per_carrier.insert(label.to_string(), stats.carriers);
    }
    println!();
    for plan in &plans {
        println!("{plan}");
    }
    println!();
    println!(
        "{:<30} {:<9} {:>12} {:>10} {:>8} {:>14} {:>16}",
        "message",
        "carrier",
        "handed_over",
        "delivered",
        "opened",
        "reported_sent",
        "reported_opened"
    );
    for (_, label, _, _) in &campaigns {
        for carrier in per_carrier.get(*label).into_iter().flatten() {
            println!(
                "{:<30} {:<9} {:>12} {:>10} {:>8} {:>14} {:>16}",
                label,
                carrier.carrier_id,
                carrier.handed_over,
                carrier.delivered,
                carrier.opened,
                carrier.reported_sent,
                carrier.reported_opened
            );
        }
    }
    if let Some((name, created, _)) = enterprises.first() {
        println!(
            "\n{name}: opens by channel and hour of sending (enterprise-cli stats --by channel,hour --zone Asia/Tokyo)"
        );
        let cli = enterprise_cli::Cli {
            relay_url: relay_url.clone(),
            tls_ca: None,
            api_key: Some(created.api_key.clone()),
            json: false,
            command: enterprise_cli::Command::Stats(enterprise_cli::cmd::stats::Stats {
                by: vec!["channel".into(), "hour".into()],
                since: "7d".into(),
                until: None,
                zone: "Asia/Tokyo".into(),
                csv: false,
            }),
        };
        let mut table = Vec::new();
        enterprise_cli::run(cli, &mut table).await?;
        print!("{}", String::from_utf8_lossy(&table));

        // Charges trail the receipts by one rollup pass.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let month = jiff::Timestamp::from_millisecond(origin_ms.parse()?)?
            .to_zoned(jiff::tz::TimeZone::get("Asia/Tokyo")?)
            .strftime("%Y-%m")
            .to_string();
        println!("\n{name}: charges this month (enterprise-cli billing --month {month})");
        let cli = enterprise_cli::Cli {
            relay_url: relay_url.clone(),
            tls_ca: None,
            api_key: Some(created.api_key.clone()),
            json: false,
            command: enterprise_cli::Command::Billing(enterprise_cli::cmd::billing::Billing {
                month,
            }),
        };
        let mut statement = Vec::new();
        enterprise_cli::run(cli, &mut statement).await?;
        print!("{}", String::from_utf8_lossy(&statement));
    }
    println!(
        "\nlocal run finished in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    if args.keep_running {
        println!("\nthe hub keeps running (Ctrl-C stops it). Point enterprise-cli at it:");
        println!("  export CHUKEI_RELAY_URL={relay_url}");
        for (name, created, services) in &enterprises {
            println!(
                "  # {name} (services: {})",
                if services.is_empty() {
                    "-".to_owned()
                } else {
                    services.join(", ")
                }
            );
            println!("  export CHUKEI_API_KEY={}", created.api_key);
        }
        println!("  cargo run --release -p enterprise-cli -- send --all --text 'hello'");
        println!("the enterprise console (sign in with a key above): {relay_url}/console");
        println!(
            "the consent pages (a sign-in code goes to the person's simulated terminal): {}",
            consent_pages.join(", ")
        );
        chukei_proto::server::shutdown_signal().await;
    }
    children.stop();
    Ok(())
}

fn rate(opened: u64, delivered: u64) -> String {
    if delivered == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * opened as f64 / delivered as f64)
    }
}
