//! Targeted messages: `latency`, `targeted` and `priority`.

use super::*;

/// A broadcast to everyone registered, on SMS.
pub(super) fn broadcast_request(idempotency_key: &str) -> pb::SendMessageRequest {
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
pub(super) async fn hub_with_registered(
    backend: Backend,
    users: usize,
    carriers: &[&str],
) -> anyhow::Result<(
    Hub,
    integration_tests::Enterprise,
    Vec<String>,
    terminal_sim::terminal::Terminals,
)> {
    // Metrics on: the lease renewals' timing is read from them.
    let settings = integration_tests::Settings {
        tuning: Tuning::DEFAULTS,
        metrics: true,
        ..Default::default()
    };
    let Some(mut hub) = Hub::start_settings(backend, carriers, settings).await? else {
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
    if let Some(took) = hub.analyze().await? {
        println!(
            "statistics gathered (ANALYZE, as autovacuum would after an import) in {:.1}s",
            took.as_secs_f64()
        );
    }
    let mut client = hub.enterprise(&key).await?;
    let refs = integration_tests::listed_refs(&mut client, 1000).await?;
    Ok((hub, client, refs, terminals))
}

pub(super) async fn latency(messages: usize, backend: Backend) -> anyhow::Result<()> {
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
    let before = Holds::scrape(&hub).await?;
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
    if let Some(answered) = run.answered() {
        println!("  {answered}");
    }
    // What else held the relay's write turn meanwhile: an accept waits for it.
    Holds::scrape(&hub).await?.since(&before).print();
    // The floor under each durable wait on the path (the relay's commit,
    // then the carrier's), on the disk the hub's databases are on.
    let dir = std::env::temp_dir();
    let fsync =
        tokio::task::spawn_blocking(move || integration_tests::latency::fsync_probe(&dir, 500))
            .await??;
    println!(
        "  fsync on this disk (4 KiB write + fdatasync, 500 times, in {}): ms p50 {:.2} p99 {:.2} max {:.2}; the path waits for one (the relay's commit: the carrier pushes while it commits)",
        std::env::temp_dir().display(),
        fsync.value_at_quantile(0.5) as f64 / 1000.0,
        fsync.value_at_quantile(0.99) as f64 / 1000.0,
        fsync.max() as f64 / 1000.0,
    );
    hub.shutdown().await
}

pub(super) async fn targeted(
    count: usize,
    concurrency: usize,
    seconds: u64,
    backend: Backend,
) -> anyhow::Result<()> {
    let (hub, client, refs, terminals) = hub_with_registered(backend, 10_000, &["alpha"]).await?;
    let leases_before = Holds::scrape(&hub).await?;
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
        if let Some(answered) = run.answered() {
            println!("  {answered}");
        }
    }
    Holds::scrape(&hub).await?.since(&leases_before).print();
    hub.shutdown().await
}

pub(super) async fn priority(users: usize, rate: f64, backend: Backend) -> anyhow::Result<()> {
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
    if let Some(answered) = idle.answered() {
        println!("  {answered}");
    }
    let leases_before = Holds::scrape(&hub).await?;
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
    // The matched count is known once the campaign's last step is planned.
    let of = if status.matched > 0 {
        format!("of {}", status.matched)
    } else {
        "while still expanding".to_owned()
    };
    println!(
        "targeted at {rate}/s during a broadcast to {users}, {backend:?}: {} (broadcast after {:.1}s: {} handed over {of})",
        during.summary(),
        started.elapsed().as_secs_f64(),
        status.handed_over,
    );
    if let Some(answered) = during.answered() {
        println!("  {answered}");
    }
    Holds::scrape(&hub).await?.since(&leases_before).print();
    hub.shutdown().await
}

/// The relay's lease holds and renewals so far, from its metrics
/// (`chukei_relay_lease_hold_seconds`): how many took at most each bound.
/// A histogram the relay reports, scraped from its metrics: the cumulative
/// bucket counts per value of one label (all series together under "").
struct Scraped(std::collections::BTreeMap<String, Vec<(f64, u64)>>);

impl Scraped {
    async fn scrape(hub: &Hub, metric: &str, by: Option<&str>) -> anyhow::Result<Self> {
        let addr = hub
            .relay_metrics
            .ok_or_else(|| anyhow::anyhow!("the bench hub serves no metrics"))?;
        let reply =
            integration_tests::http::call(&format!("http://{addr}"), "GET", "/metrics", &[], None)
                .await;
        let prefix = format!("{metric}_bucket{{");
        let mut series: std::collections::BTreeMap<
            String,
            std::collections::BTreeMap<String, (f64, u64)>,
        > = Default::default();
        for line in reply.body.lines() {
            let Some(rest) = line.strip_prefix(prefix.as_str()) else {
                continue;
            };
            let (labels, count) = rest.split_once("} ").unwrap_or_default();
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix("=\""))
                    .map(|l| l.trim_end_matches('"'))
            };
            let le = label("le").unwrap_or("+Inf");
            let key = by.and_then(label).unwrap_or_default().to_owned();
            let bound = le.parse().unwrap_or(f64::INFINITY);
            let entry = series
                .entry(key)
                .or_default()
                .entry(le.to_owned())
                .or_insert((bound, 0));
            entry.1 += count.trim().parse::<f64>().unwrap_or(0.0) as u64;
        }
        Ok(Self(
            series
                .into_iter()
                .map(|(key, buckets)| {
                    let mut sorted: Vec<(f64, u64)> = buckets.into_values().collect();
                    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
                    (key, sorted)
                })
                .collect(),
        ))
    }

    /// What was added since `before`.
    fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(key, buckets)| {
                    let earlier = before.0.get(key);
                    let buckets = buckets
                        .iter()
                        .map(|(bound, count)| {
                            let was = earlier
                                .and_then(|e| e.iter().find(|(b, _)| b == bound))
                                .map_or(0, |(_, c)| *c);
                            (*bound, count - was)
                        })
                        .collect();
                    (key.clone(), buckets)
                })
                .collect(),
        )
    }
}

/// Count, how many took at most 10 ms, 100 ms and 1 s, the bucket bounds
/// (ms) under which half, 90 % and 99 % of them took, and the bound under
/// which all of them took.
fn summary(buckets: &[(f64, u64)]) -> String {
    let total = buckets.last().map_or(0, |(_, c)| *c);
    let at_most = |bound: f64| {
        buckets
            .iter()
            .rev()
            .find(|(b, _)| *b <= bound)
            .map_or(0, |(_, c)| *c)
    };
    // The smallest bucket bound holding at least `share` of them (cumulative counts).
    let within = |share: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c as f64 >= share * total as f64)
            .map_or(f64::NAN, |(b, _)| *b * 1000.0)
    };
    format!(
        "{total}; ≤ 10 ms {}, ≤ 100 ms {}, ≤ 1 s {}; p50 ≤ {} ms, p90 ≤ {} ms, p99 ≤ {} ms; all within {} ms",
        at_most(0.01),
        at_most(0.1),
        at_most(1.0),
        within(0.5),
        within(0.9),
        within(0.99),
        within(1.0),
    )
}

/// The lease holds and the write turn (SQLite), as the relay reports them.
struct Holds {
    leases: Scraped,
    turns: Scraped,
}

impl Holds {
    async fn scrape(hub: &Hub) -> anyhow::Result<Self> {
        Ok(Self {
            leases: Scraped::scrape(hub, "chukei_relay_lease_hold_seconds", None).await?,
            turns: Scraped::scrape(hub, "chukei_relay_write_turn_seconds", Some("writer")).await?,
        })
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            leases: self.leases.since(&before.leases),
            turns: self.turns.since(&before.turns),
        }
    }

    fn print(&self) {
        let leases = self.leases.0.get("").map_or(&[][..], Vec::as_slice);
        println!(
            "lease holds and renewals meanwhile: {} (time to live 10 s; goal: every one under 1 s)",
            summary(leases)
        );
        if !self.turns.0.is_empty() {
            println!("write turn held meanwhile, by writer:");
            for (writer, buckets) in &self.turns.0 {
                println!("  {writer:<12} {}", summary(buckets));
            }
        }
    }
}
