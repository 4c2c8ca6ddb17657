//! Campaign benchmarks: `broadcast`, `billing` and `stats`, with the CPU
//! each service spends.

use super::*;

/// Contracts `people` users ("user-0000000", …) with `carrier_id` as their
/// primary and registers them all with `enterprise_id`, below the edge, in
/// chunks; returns their ids.
pub(super) async fn seed_registered(
    store: &relay_svc::storage::Store,
    carrier_id: &str,
    enterprise_id: &str,
    people: usize,
    now: i64,
) -> anyhow::Result<Vec<String>> {
    let users: Vec<String> = (0..people).map(|i| format!("user-{i:07}")).collect();
    for chunk in users.chunks(10_000) {
        integration_tests::contract_and_register(store, carrier_id, enterprise_id, chunk, now)
            .await?;
    }
    Ok(users)
}

/// One fold of a delivered, 30%-opened campaign to `people`, priced or not.
pub(super) async fn billing(
    people: usize,
    backend: Backend,
    priced: bool,
    fold_batch: u32,
) -> anyhow::Result<()> {
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
    store.roll_up_all(fold_batch, now).await?;
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
        "  {:<14} {queued} events folded in {seconds:.2} s ({:.0} events/s, {fold_batch} a transaction); charged {} yen in {} message×kind sums",
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

pub(super) async fn broadcast(
    users: usize,
    backend: Backend,
    batch_size: u32,
    webhook: bool,
) -> anyhow::Result<()> {
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
    if let Some(took) = hub.analyze().await? {
        println!(
            "statistics gathered (ANALYZE, as autovacuum would after an import) in {:.1}s",
            took.as_secs_f64()
        );
    }

    let receiver = if webhook {
        Some(WebhookReceiver::start(&hub, &key).await?)
    } else {
        None
    };
    let mut client = hub.enterprise(&key).await?;
    // The peak resident set from here on, not setup's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let cpu_before = CpuSample::now();
    let started = Instant::now();
    let received = || terminals.snapshot().received;
    let milestones = Milestones::follow(&mut client, started, Some(&received)).await?;
    println!("broadcast to {registered} recipients on {backend:?} (batch {batch_size}):");
    milestones.print(registered as f64, ceiling);
    if let Some(receiver) = &receiver {
        // Every person's handed-over and delivered events (nobody opens).
        let want = 2 * registered as u64;
        while receiver.events() < want {
            anyhow::ensure!(
                Instant::now() < milestones.deadline,
                "webhook events: {} of {want}",
                receiver.events()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let all = started.elapsed().as_secs_f64();
        println!(
            "  webhook events at the receiver (all)   {all:>8.3} s   {:>9.0} events/s in {} POSTs ({:.0} events each)",
            want as f64 / all,
            receiver.posts(),
            want as f64 / receiver.posts().max(1) as f64,
        );
    }
    let counted = CpuSample::now();
    let folded = wait_folded(hub.database_url(), started, milestones.deadline).await?;
    let through_fold = CpuSample::now();
    println!(
        "  statistics folded (the fold caught up)  {:>8.3} s",
        folded.as_secs_f64()
    );
    let per_million = 1e6 / registered as f64;
    let print_cpu = |window: &str, cpu: &[(String, f64)]| {
        println!(
            "CPU-seconds, {window} (per 1M recipients): {}",
            cpu.iter()
                .map(|(group, secs)| format!("{group} {secs:.1} ({:.1})", secs * per_million))
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let cpu = counted.since(&cpu_before);
    print_cpu("accept → receipts counted", &cpu);
    let fold_cpu = through_fold.since(&counted);
    print_cpu("then until the statistics are folded", &fold_cpu);
    // The hub: relay, carriers and SQLite's workers; the simulated terminals
    // and the bench's own client apart (the goal is ≤ 2 µs).
    let hub_cpu = |cpu: &[(String, f64)]| -> f64 {
        cpu.iter()
            .filter(|(group, _)| {
                ["relay", "carriers", "SQLite workers", "PostgreSQL server"]
                    .contains(&group.as_ref())
            })
            .map(|(_, secs)| secs)
            .sum()
    };
    let (to_counted, fold) = (hub_cpu(&cpu), hub_cpu(&fold_cpu));
    println!(
        "hub CPU per recipient (relay, carriers, their databases; terminals apart): {:.1} µs to receipts counted, {:.1} µs with the fold",
        to_counted * 1e6 / registered as f64,
        (to_counted + fold) * 1e6 / registered as f64
    );
    if let Some((_, peak)) = memory_mib(std::process::id()) {
        println!(
            "peak RSS of the hub's one process (relay, carriers, fleet) during the broadcast: {peak:.0} MiB"
        );
    }
    hub.shutdown().await?;
    Ok(())
}

/// A time-cube key (`stats_cells`): enterprise, send hour, channel,
/// carrier, place, open hour.
pub(super) type TimeKey = (u8, i64, u8, u8, u8, i64);
/// An audience-cube key (`stats_audience`): enterprise, send day, channel,
/// gender, age band, region, occupation.
pub(super) type AudienceKey = (u8, i64, u8, u8, i64, u8, u8);

pub(super) async fn stats(events: u64, backend: Backend) -> anyhow::Result<()> {
    use relay_svc::stats::{Dimension, Query, Thresholds, Viewer};
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
            rows = relay_svc::service::breakdown(
                &fixture.store,
                viewer,
                &query,
                Thresholds::default(),
            )
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

/// A local webhook endpoint for the bench: answers every POST 204 at once
/// and counts the events in it (the signatures are the tests' business).
struct WebhookReceiver {
    events: std::sync::Arc<std::sync::atomic::AtomicU64>,
    posts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl WebhookReceiver {
    /// Listens on a free port and adds it as an endpoint of `key`'s enterprise.
    async fn start(hub: &Hub, key: &str) -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hooks", listener.local_addr()?);
        let events = std::sync::Arc::new(AtomicU64::new(0));
        let posts = std::sync::Arc::new(AtomicU64::new(0));
        let (counted, posted) = (events.clone(), posts.clone());
        integration_tests::http::serve_posts(listener, move |post| {
            let body: serde_json::Value = serde_json::from_slice(&post.body).unwrap_or_default();
            let n = body["data"].as_array().map_or(0, Vec::len) as u64;
            counted.fetch_add(n, Ordering::Relaxed);
            posted.fetch_add(1, Ordering::Relaxed);
            Some(204)
        });
        let auth = format!("Bearer {key}");
        let reply = integration_tests::http::call(
            &hub.relay_url(),
            "POST",
            "/v1/webhooks",
            &[("Authorization", auth.as_str())],
            Some(&serde_json::json!({"url": url})),
        )
        .await;
        anyhow::ensure!(reply.status == 201, "adding the endpoint: {}", reply.body);
        Ok(Self { events, posts })
    }

    fn events(&self) -> u64 {
        self.events.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn posts(&self) -> u64 {
        self.posts.load(std::sync::atomic::Ordering::Relaxed)
    }
}
