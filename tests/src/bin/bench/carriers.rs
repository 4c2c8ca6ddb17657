//! `slow-carrier`: the relay's memory while a paced carrier drains a backlog.

use super::*;

/// Resident and peak resident memory of process `pid` (MiB).
pub(super) fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A fresh PostgreSQL database for a relay process (its URL and name, to
/// drop after), or `None` for SQLite in the relay's data directory.
pub(super) async fn relay_database(backend: Backend) -> anyhow::Result<Option<(String, String)>> {
    Ok(match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(
            integration_tests::postgres_database()
                .await?
                .ok_or_else(|| {
                    anyhow::anyhow!("--backend postgres needs CHUKEI_TEST_DATABASE_URL")
                })?,
        ),
    })
}

pub(super) async fn slow_carrier(
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
    let database = relay_database(backend).await?;
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
