//! `bench gateways --users 10000 [--jasmin PATH]`: the same broadcast
//! through each way a carrier can reach people — the simulated terminals
//! (the denominator), SMS over SMPP to a scripted SMSC, e-mail over SMTP to
//! an aiosmtpd server and, with `--jasmin`, SMS through Jasmin 0.11.0 to
//! that SMSC — each on a hub of its own with one carrier, timed from
//! `SendMessage` until every delivery is counted delivered at the relay,
//! with CPU-seconds per component (the peers' own processes included) to
//! say where the time goes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use carrier_svc::gateways::GatewayArgs;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use integration_tests::peers::{helper, listening, start_jasmin};
use integration_tests::process::{Process, free_port};
use integration_tests::{Backend, Hub, Settings, Tuning};
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;

use super::measure::CpuSample;
use super::targeted::broadcast_request;

/// One way out of the carrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leg {
    Terminals,
    Smpp,
    Smtp,
    Jasmin,
}

impl Leg {
    fn name(self) -> &'static str {
        match self {
            Self::Terminals => "SMS to simulated terminals",
            Self::Smpp => "SMS over SMPP to a scripted SMSC",
            Self::Smtp => "e-mail over SMTP to aiosmtpd",
            Self::Jasmin => "SMS over SMPP through Jasmin 0.11.0",
        }
    }

    /// Command-line fragments of the peer processes whose CPU counts.
    fn peers(self) -> &'static [&'static str] {
        match self {
            Self::Terminals => &[],
            Self::Smpp => &["smsc.py"],
            Self::Smtp => &["smtp_sink.py"],
            Self::Jasmin => &["smsc.py", "jasmind.py"],
        }
    }
}

pub(super) async fn gateways(users: usize, jasmin: Option<PathBuf>) -> anyhow::Result<()> {
    let python = PathBuf::from(std::env::var_os("CHUKEI_TEST_PYTHON").unwrap_or("python3".into()));
    let mut legs = vec![Leg::Terminals, Leg::Smpp, Leg::Smtp];
    if jasmin.is_some() {
        legs.push(Leg::Jasmin);
    }
    let mut denominator = None;
    for leg in legs {
        let rate = run(leg, users, &python, jasmin.as_deref()).await?;
        let base = *denominator.get_or_insert(rate);
        println!("  = {:.3} × the simulated terminals' rate", rate / base);
    }
    Ok(())
}

/// Runs one leg; recipients delivered and counted per second.
async fn run(leg: Leg, users: usize, python: &Path, jasmin: Option<&Path>) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut peers: Vec<Process> = Vec::new();
    let mut gateways = GatewayArgs::default();
    let channel = if leg == Leg::Smtp {
        common::Channel::Email
    } else {
        common::Channel::Sms
    };
    match leg {
        Leg::Terminals => {}
        Leg::Smpp | Leg::Jasmin => {
            let smsc = free_port()?;
            let record = dir.path().join("smsc.jsonl");
            let delay = if leg == Leg::Jasmin { "1.0" } else { "0.05" };
            let args = [
                "--port",
                &smsc.to_string(),
                "--ids",
                "dec",
                "--receipt-delay",
                delay,
                "--record",
                &record.display().to_string(),
            ];
            peers.push(helper(python, "smsc.py", &args.map(String::from)));
            listening(smsc, Duration::from_secs(30)).await;
            let target = match jasmin {
                Some(jasmind) if leg == Leg::Jasmin => {
                    let port = free_port()?;
                    let root = dir.path().join("jasmin");
                    peers.push(start_jasmin(python, jasmind, &root, port, smsc, 8).await?);
                    port
                }
                _ => smsc,
            };
            gateways = GatewayArgs {
                smpp_url: Some(format!("smpp://127.0.0.1:{target}")),
                smpp_system_id: "carrier".into(),
                smpp_password: "secret".into(),
                smpp_window: 64,
                ..GatewayArgs::default()
            };
        }
        Leg::Smtp => {
            let port = free_port()?;
            let args = [
                "--port",
                &port.to_string(),
                "--record",
                &dir.path().join("mail.jsonl").display().to_string(),
            ];
            peers.push(helper(python, "smtp_sink.py", &args.map(String::from)));
            listening(port, Duration::from_secs(30)).await;
            gateways = GatewayArgs {
                smtp_url: Some(format!("smtp://127.0.0.1:{port}")),
                mail_from: "Bench <bench@mail.chukei.test>".into(),
                ..GatewayArgs::default()
            };
        }
    }
    let settings = Settings {
        tuning: Tuning::DEFAULTS,
        carrier_gateways: gateways,
        ..Settings::default()
    };
    let Some(mut hub) = Hub::start_settings(Backend::Sqlite, &["alpha"], settings).await? else {
        anyhow::bail!("no hub");
    };
    let (shop, key) = hub.create_enterprise("bench").await?;
    let fleet = Fleet::generate(1, users, &["alpha".into()])
        .with_every_channel()
        .everyone_registers();
    hub.start_fleet(
        fleet,
        vec![EnterpriseChoice::enterprise(&shop)],
        OpenMode::Never,
    )
    .await?;
    let mut client = hub.enterprise(&key).await?;
    let peer_cpu = |names: &[&str]| names.iter().map(|n| process_cpu(n)).sum::<f64>();
    let cpu_before = CpuSample::now();
    let peers_before = peer_cpu(leg.peers());
    let started = Instant::now();
    let mut request = broadcast_request("bench");
    request.channel = channel as i32;
    let sent = client.send_message(request).await?.into_inner();
    let deadline = started + Duration::from_secs(3600);
    let status = loop {
        let status = client
            .get_message(pb::GetMessageRequest {
                message_id: sent.message_id.clone(),
            })
            .await?
            .into_inner();
        if status.matched > 0 && status.delivered + status.failed >= status.matched {
            break status;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{}: did not finish: {status:?}",
            leg.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = CpuSample::now().since(&cpu_before);
    let peers_cpu = peer_cpu(leg.peers()) - peers_before;
    let rate = status.delivered as f64 / elapsed;
    println!(
        "{}: {} of {} delivered and counted in {elapsed:.2} s: {rate:.0}/s",
        leg.name(),
        status.delivered,
        status.matched
    );
    let per = 1e6 / status.matched.max(1) as f64;
    let mut parts: Vec<String> = cpu
        .iter()
        .filter(|(group, secs)| *secs > 0.0 && group != "hub process total")
        .map(|(group, secs)| format!("{group} {secs:.2} ({:.0} µs)", secs * per))
        .collect();
    if !leg.peers().is_empty() {
        parts.push(format!(
            "the peer's processes ({}) {peers_cpu:.2} ({:.0} µs)",
            leg.peers().join(", "),
            peers_cpu * per
        ));
    }
    println!("  CPU-seconds (per recipient): {}", parts.join(", "));
    hub.shutdown().await?;
    for peer in peers {
        let _ = peer.terminate(Duration::from_secs(20));
    }
    Ok(rate)
}

/// CPU-seconds of every process whose command line mentions `name`.
fn process_cpu(name: &str) -> f64 {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    processes
        .flatten()
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|line| String::from_utf8_lossy(&line).contains(name))
        })
        .map(|entry| CpuSample::ticks(&entry.path().join("stat"), true))
        .sum()
}
