//! Latency as operators would measure it: from the instant a targeted
//! message is due to be submitted to the instant it reaches a terminal.
//! Open loop: each send has its own due instant on a fixed schedule, and its
//! latency counts from that instant — a slow system cannot slow the load
//! down and hide its own queueing (no coordinated omission). Figures go into
//! an HdrHistogram (microseconds, 3 significant digits).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use hdrhistogram::Histogram;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::{Enterprise, send_request};

/// What a latency run saw.
#[derive(Debug)]
pub struct Latencies {
    /// Due → at a terminal, microseconds.
    pub histogram: Histogram<u64>,
    pub sent: u64,
    pub arrived: u64,
    pub errors: u64,
    /// First due instant → last arrival.
    pub elapsed: Duration,
    /// Due → the relay's answer (the message accepted and committed),
    /// microseconds; measured by the one-at-a-time runs.
    pub accepted: Option<Histogram<u64>>,
}

impl Latencies {
    fn new() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("valid histogram bounds"),
            sent: 0,
            arrived: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            accepted: None,
        }
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.histogram.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// One line: counts, achieved rate and the percentiles in milliseconds.
    pub fn summary(&self) -> String {
        format!(
            "{} sent, {} at terminals, {} refused; {:.0} msgs/s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
            self.sent,
            self.arrived,
            self.errors,
            self.arrived as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.histogram.max() as f64 / 1000.0,
        )
    }
}

impl Latencies {
    /// Due → answered, when measured: the relay's share of the latency.
    pub fn answered(&self) -> Option<String> {
        let accepted = self.accepted.as_ref()?;
        let ms = |quantile| accepted.value_at_quantile(quantile) as f64 / 1000.0;
        Some(format!(
            "of which SendMessage answered (accepted and committed at the relay): ms p50 {:.2} p99 {:.2}",
            ms(0.5),
            ms(0.99)
        ))
    }
}

/// Arrivals at the terminals, collected as they come.
#[derive(Clone, Debug, Default)]
struct Seen(Arc<Mutex<HashMap<String, Instant>>>);

impl Seen {
    fn collect(arrivals: UnboundedReceiver<(String, Instant)>) -> Self {
        let seen = Self::default();
        let store = seen.clone();
        tokio::spawn(async move {
            let mut arrivals = arrivals;
            while let Some((message_id, at)) = arrivals.recv().await {
                store.lock().entry(message_id).or_insert(at);
            }
        });
        seen
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Sends one message to `user_ref` with key `key`; its id, or `None` when refused.
async fn send_one(client: &mut Enterprise, key: String, user_ref: &str) -> Option<String> {
    let request = send_request(
        &key,
        pb::target::Kind::Refs(pb::RefList {
            refs: vec![user_ref.to_owned()],
        }),
        "latency probe",
        common::Channel::Sms,
    );
    client
        .send_message(request)
        .await
        .ok()
        .map(|response| response.into_inner().message_id)
}

/// Waits (up to `drain`) for the sent messages to arrive, then records each
/// latency from its due instant.
async fn settle(
    due: Vec<(String, Instant)>,
    seen: &Seen,
    errors: u64,
    start: Instant,
    drain: Duration,
) -> Latencies {
    let deadline = Instant::now() + drain;
    loop {
        let arrived = {
            let seen = seen.lock();
            due.iter().filter(|(id, _)| seen.contains_key(id)).count()
        };
        if arrived == due.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut latencies = Latencies::new();
    latencies.sent = due.len() as u64;
    latencies.errors = errors;
    let seen = seen.lock();
    let mut last = start;
    for (message_id, due_at) in &due {
        if let Some(at) = seen.get(message_id) {
            latencies.arrived += 1;
            last = last.max(*at);
            let micros = at.saturating_duration_since(*due_at).as_micros() as u64;
            latencies.histogram.saturating_record(micros.max(1));
        }
    }
    latencies.elapsed = last.saturating_duration_since(start);
    latencies
}

/// `count` messages one after the other on an idle system, each sent when
/// the previous one reached its terminal.
pub async fn one_at_a_time(
    client: &Enterprise,
    refs: &[String],
    count: usize,
    arrivals: UnboundedReceiver<(String, Instant)>,
    run: &str,
) -> Latencies {
    let seen = Seen::collect(arrivals);
    let mut client = client.clone();
    let start = Instant::now();
    let mut due = Vec::with_capacity(count);
    let mut errors = 0;
    let mut accepted = Latencies::new();
    for index in 0..count {
        let at = Instant::now();
        let user_ref = &refs[index % refs.len()];
        let answer = send_one(&mut client, format!("{run}-{index}"), user_ref).await;
        let _ = accepted
            .histogram
            .record((at.elapsed().as_micros() as u64).max(1));
        match answer {
            Some(message_id) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !seen.lock().contains_key(&message_id) && Instant::now() < deadline {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_micros(100)).await;
                }
                due.push((message_id, at));
            }
            None => errors += 1,
        }
    }
    let mut run = settle(due, &seen, errors, start, Duration::from_secs(10)).await;
    run.accepted = Some(accepted.histogram);
    run
}

/// What writing 4 KiB and `fdatasync` cost in `dir`, `rounds` times: the
/// floor under every durable wait on the path (SQLite's commit in WAL mode
/// with `synchronous=FULL` is one such sync of the log).
pub fn fsync_probe(dir: &std::path::Path, rounds: usize) -> std::io::Result<Histogram<u64>> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let mut histogram =
        Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let block = [0x5a_u8; 4096];
    for _ in 0..rounds {
        let at = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        let _ = histogram.record((at.elapsed().as_micros() as u64).max(1));
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(histogram)
}

/// `count` messages as fast as `concurrency` senders can submit them; the
/// rate is what reached the terminals over the whole run (closed loop: it
/// finds the ceiling, not the latency).
pub async fn flat_out(
    client: &Enterprise,
    refs: &[String],
    count: usize,
    concurrency: usize,
    arrivals: UnboundedReceiver<(String, Instant)>,
    run: &str,
) -> Latencies {
    let seen = Seen::collect(arrivals);
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (mut client, refs, next, run) =
            (client.clone(), refs.to_vec(), next.clone(), run.to_owned());
        senders.spawn(async move {
            let mut due = Vec::new();
            let mut errors = 0;
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= count {
                    break;
                }
                let at = Instant::now();
                match send_one(
                    &mut client,
                    format!("{run}-{index}"),
                    &refs[index % refs.len()],
                )
                .await
                {
                    Some(message_id) => due.push((message_id, at)),
                    None => errors += 1,
                }
            }
            (due, errors)
        });
    }
    let mut due = Vec::with_capacity(count);
    let mut errors = 0;
    while let Some(joined) = senders.join_next().await {
        let (mine, failed) = joined.expect("a sender panicked");
        due.extend(mine);
        errors += failed;
    }
    settle(due, &seen, errors, start, Duration::from_secs(60)).await
}

/// `count` messages over `streams` `SendMessages` streams at once, each
/// stream fed as fast as it takes them: the closed-loop ceiling of the bulk
/// API. A message is due when it is handed to its stream.
pub async fn streamed(
    client: &Enterprise,
    refs: &[String],
    count: usize,
    streams: usize,
    arrivals: UnboundedReceiver<(String, Instant)>,
    run: &str,
) -> Latencies {
    let seen = Seen::collect(arrivals);
    let start = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for stream in 0..streams {
        let (mut client, refs, run) = (client.clone(), refs.to_vec(), run.to_owned());
        let mine: Vec<usize> = (stream..count).step_by(streams).collect();
        senders.spawn(async move {
            let handed: Arc<Mutex<Vec<Instant>>> = Arc::default();
            let (requests, requests_rx) = tokio::sync::mpsc::channel(256);
            let feeder = {
                let handed = handed.clone();
                tokio::spawn(async move {
                    for index in mine {
                        let request = send_request(
                            &format!("{run}-{index}"),
                            pb::target::Kind::Refs(pb::RefList {
                                refs: vec![refs[index % refs.len()].clone()],
                            }),
                            "latency probe",
                            common::Channel::Sms,
                        );
                        handed.lock().expect("handed").push(Instant::now());
                        if requests.send(request).await.is_err() {
                            break;
                        }
                    }
                })
            };
            let mut due = Vec::new();
            if let Ok(response) = client
                .send_messages(tokio_stream::wrappers::ReceiverStream::new(requests_rx))
                .await
            {
                let mut results = response.into_inner();
                while let Ok(Some(result)) = results.message().await {
                    let at = handed.lock().expect("handed")[result.index as usize];
                    if let Some(pb::send_messages_result::Outcome::Accepted(accepted)) =
                        result.outcome
                    {
                        due.push((accepted.message_id, at));
                    }
                }
            }
            let _ = feeder.await;
            due
        });
    }
    let mut due = Vec::with_capacity(count);
    while let Some(joined) = senders.join_next().await {
        due.extend(joined.expect("a stream panicked"));
    }
    // Refused, or never answered (a stream that broke): not accepted.
    let errors = count.saturating_sub(due.len()) as u64;
    settle(due, &seen, errors, start, Duration::from_secs(60)).await
}

/// Messages at a fixed offered `rate` (per second) for `duration`: send i
/// is due at `start + i / rate` and is sent then, whatever happened to the
/// sends before it.
pub async fn open_loop(
    client: &Enterprise,
    refs: &[String],
    rate: f64,
    duration: Duration,
    arrivals: UnboundedReceiver<(String, Instant)>,
    run: &str,
) -> Latencies {
    let seen = Seen::collect(arrivals);
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as usize;
    let start = Instant::now() + Duration::from_millis(20);
    let mut sends = tokio::task::JoinSet::new();
    for index in 0..total {
        let at = start + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        let (mut client, user_ref, key) = (
            client.clone(),
            refs[index % refs.len()].clone(),
            format!("{run}-{index}"),
        );
        sends.spawn(async move {
            let sent = send_one(&mut client, key, &user_ref).await;
            (sent, at, Instant::now())
        });
    }
    let mut due = Vec::with_capacity(total);
    let mut accepted = Latencies::new().histogram;
    let mut errors = 0;
    while let Some(joined) = sends.join_next().await {
        match joined.expect("a send panicked") {
            (Some(message_id), at, answered) => {
                let micros = answered.saturating_duration_since(at).as_micros() as u64;
                accepted.saturating_record(micros.max(1));
                due.push((message_id, at));
            }
            (None, ..) => errors += 1,
        }
    }
    let mut run = settle(due, &seen, errors, start, Duration::from_secs(30)).await;
    run.accepted = Some(accepted);
    run
}
