//! `bench broadcast --processes`: the broadcast with the relay, each carrier
//! and the fleet as processes of their own — the release binaries beside
//! this one, started with their defaults as an operator would — so each
//! service's CPU and peak memory are its own, read from `/proc`.

use std::path::{Path, PathBuf};

use chukei_proto::auth::BearerInterceptor;
use integration_tests::process::{Process, binary_in, free_port};

use super::*;

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
const DELIVER_TOKEN: &str = "bench-deliver-token-0123456789";
const CARRIER_ADMIN_TOKEN: &str = "bench-carrier-admin-0123456789";

/// One running service and its CPU-seconds when the broadcast was sent.
struct Service {
    name: String,
    process: Process,
    pid: u32,
    cpu_before: f64,
}

impl Service {
    fn spawn(name: &str, command: &mut std::process::Command) -> anyhow::Result<Self> {
        let process = Process::spawn(name, command.stdout(std::process::Stdio::null()))?;
        let pid = process
            .pid()
            .ok_or_else(|| anyhow::anyhow!("{name} exited at start"))?;
        Ok(Self {
            name: name.to_owned(),
            process,
            pid,
            cpu_before: 0.0,
        })
    }

    fn cpu(&self) -> f64 {
        CpuSample::ticks(Path::new(&format!("/proc/{}/stat", self.pid)), false)
    }

    /// From now on: its CPU counted, and its peak resident set reset (so
    /// setup's is not reported as the broadcast's).
    fn start_counting(&mut self) {
        self.cpu_before = self.cpu();
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5");
    }
}

pub(super) async fn broadcast_across_processes(
    users: usize,
    backend: Backend,
    batch_size: u32,
) -> anyhow::Result<()> {
    // The ceiling in the same run, on the same machine, for the ratio below.
    let ceiling = transport(1_000_000, batch_size as usize, 8).await?;
    let bin_dir: PathBuf = std::env::current_exe()?
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no directory beside this program"))?
        .to_path_buf();
    let dir = tempfile::tempdir()?;
    let database = relay_database(backend).await?;
    let setup = Instant::now();

    let relay_port = free_port()?;
    let relay_url = format!("http://127.0.0.1:{relay_port}");
    let mut relay_cmd = std::process::Command::new(binary_in(&bin_dir, "relay-svc")?);
    relay_cmd
        .args(["--listen", &format!("127.0.0.1:{relay_port}")])
        .args(["--batch-size", &batch_size.to_string()])
        .arg("--data-dir")
        .arg(dir.path().join("relay"))
        .env("CHUKEI_RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("CHUKEI_RELAY_DELIVER_TOKEN", DELIVER_TOKEN)
        .env("RUST_LOG", "warn");
    if let Some((url, _)) = &database {
        relay_cmd.args(["--database-url", url]);
    }
    let mut services = vec![Service::spawn("relay", &mut relay_cmd)?];
    integration_tests::wait_healthy(&relay_url).await?;
    let channel = tonic::transport::Channel::from_shared(relay_url.clone())?
        .connect()
        .await?;
    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        channel.clone(),
        BearerInterceptor::new(ADMIN_TOKEN)?,
    );
    let enterprise = admin
        .create_enterprise(pb::CreateEnterpriseRequest {
            name: "bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner();

    let mut carrier_flags = Vec::new();
    for id in ["alpha", "beta", "gamma"] {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let token = format!("bench-{id}-token-0123456789");
        services.push(Service::spawn(
            &format!("carrier {id}"),
            std::process::Command::new(binary_in(&bin_dir, "carrier-svc")?)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--carrier-id", id, "--relay-url", &relay_url])
                .arg("--data-dir")
                .arg(dir.path().join(id))
                .env("CHUKEI_CARRIER_TOKEN", &token)
                .env("CHUKEI_CARRIER_RELAY_TOKEN", DELIVER_TOKEN)
                .env("CHUKEI_CARRIER_ADMIN_TOKEN", CARRIER_ADMIN_TOKEN)
                .env("RUST_LOG", "warn"),
        )?);
        integration_tests::wait_healthy(&url).await?;
        admin
            .register_carrier(pb::RegisterCarrierRequest {
                carrier_id: id.into(),
                endpoint: url.clone(),
                token,
            })
            .await?;
        carrier_flags.push(format!("--carrier={id}={url}"));
    }

    // The fleet provisions its subscribers at the carriers, attaches, and
    // registers everyone with the enterprise; healthy once that is done.
    let fleet_port = free_port()?;
    services.push(Service::spawn(
        "terminals",
        std::process::Command::new(binary_in(&bin_dir, "terminal-sim")?)
            .args(["--listen", &format!("127.0.0.1:{fleet_port}"), "fleet"])
            .args(["--users", &users.to_string(), "--seed", "1"])
            .args([
                "--open-mode",
                "never",
                "--everyone-registers",
                "--every-channel",
            ])
            .args(&carrier_flags)
            .args(["--enterprise", &enterprise.enterprise_id])
            .env("CHUKEI_TERMINAL_CARRIER_ADMIN_TOKEN", CARRIER_ADMIN_TOKEN)
            .env("RUST_LOG", "warn"),
    )?);
    integration_tests::wait_healthy_for(
        &format!("http://127.0.0.1:{fleet_port}"),
        Duration::from_secs(120 + users as u64 / 100),
    )
    .await?;
    println!(
        "setup: relay, 3 carriers and a fleet of {users} as processes in {:.1}s",
        setup.elapsed().as_secs_f64()
    );
    let idle_relay = memory_mib(services[0].pid).unwrap_or_default().0;

    let mut client = pb::enterprise_api_client::EnterpriseApiClient::with_interceptor(
        channel,
        BearerInterceptor::new(&enterprise.api_key)?,
    );
    for service in &mut services {
        service.start_counting();
    }
    let postgres_before = CpuSample::now().postgres;
    let started = Instant::now();
    let milestones = Milestones::follow(&mut client, started, None).await?;
    let postgres = CpuSample::now().postgres - postgres_before;
    let cpu: Vec<(String, f64, f64)> = services
        .iter()
        .map(|s| {
            let peak = memory_mib(s.pid).map_or(f64::NAN, |(_, hwm)| hwm);
            (s.name.clone(), s.cpu() - s.cpu_before, peak)
        })
        .collect();

    let matched = milestones.matched;
    let recipients = matched as f64;
    println!(
        "broadcast to {matched} recipients on {backend:?} (batch {batch_size}), one process per service:"
    );
    milestones.print(recipients, ceiling);
    println!("per service, accept → receipts counted: CPU-seconds (µs per recipient), peak RSS");
    for (name, secs, peak) in &cpu {
        println!(
            "  {name:<14} {secs:>7.2} s ({:>6.1} µs)   {peak:>7.1} MiB",
            secs * 1e6 / recipients
        );
    }
    if backend == Backend::Postgres {
        println!(
            "  {:<14} {postgres:>7.2} s ({:>6.1} µs)",
            "PostgreSQL",
            postgres * 1e6 / recipients
        );
    }
    let hub: f64 = cpu
        .iter()
        .filter(|(name, ..)| name != "terminals")
        .map(|(_, secs, _)| secs)
        .sum::<f64>()
        + postgres;
    // The relay folds the events into its statistics after the broadcast
    // (it stands aside while they arrive): that CPU is the broadcast's too.
    let relay_url = match &database {
        Some((url, _)) => url.clone(),
        None => relay_svc::storage::Store::sqlite_url_in(&dir.path().join("relay")),
    };
    let relay_before_fold = services[0].cpu();
    let postgres_before_fold = CpuSample::now().postgres;
    let folded = wait_folded(&relay_url, started, milestones.deadline).await?;
    let fold =
        services[0].cpu() - relay_before_fold + CpuSample::now().postgres - postgres_before_fold;
    println!(
        "then the relay's fold of the events into its statistics: caught up at {:.3} s, {fold:.2} CPU-s ({:.1} µs per recipient)",
        folded.as_secs_f64(),
        fold * 1e6 / recipients
    );
    println!(
        "hub CPU per recipient (relay, carriers, their databases; terminals apart): {:.1} µs to receipts counted, {:.1} µs with the fold",
        hub * 1e6 / recipients,
        (hub + fold) * 1e6 / recipients
    );
    let relay_peak = memory_mib(services[0].pid).map_or(f64::NAN, |(_, hwm)| hwm);
    println!(
        "relay resident memory: {idle_relay:.1} MiB idle with {users} registered, peak {relay_peak:.1} MiB during the broadcast and its fold",
    );

    for service in services.into_iter().rev() {
        let name = service.name;
        let asked = std::time::Instant::now();
        match service.process.terminate(Duration::from_secs(20)) {
            Ok(status) => println!(
                "  {name} stopped {:.2} s after SIGTERM ({status})",
                asked.elapsed().as_secs_f64()
            ),
            Err(error) => println!("  {name} did not stop cleanly: {error}"),
        }
    }
    if let Some((_, name)) = &database {
        integration_tests::drop_postgres_database(name).await?;
    }
    Ok(())
}
