//! What the broadcast benches measure: when a broadcast reached each
//! milestone, and the CPU time spent meanwhile.

use super::*;

/// CPU time so far: this process's threads by name (each service runs on
/// its own runtime, named after it; SQLite connections have worker threads
/// of their own, shared by the relay and the carriers), the whole process,
/// and the PostgreSQL server's processes.
pub(super) struct CpuSample {
    threads: std::collections::BTreeMap<String, f64>,
    process: f64,
    /// CPU-seconds of the PostgreSQL server's processes.
    pub(super) postgres: f64,
}

impl CpuSample {
    /// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ).
    const TICK: f64 = 0.01;

    pub(super) fn now() -> Self {
        let mut threads = std::collections::BTreeMap::new();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let path = task.path();
                let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                let group = match name.trim() {
                    "relay" => "relay",
                    "carrier" => "carriers",
                    "fleet" => "terminals",
                    n if n.starts_with("sqlx-sqlite") => "SQLite workers",
                    _ => "bench client",
                };
                let secs = Self::ticks(&path.join("stat"), false);
                *threads.entry(group.to_owned()).or_insert(0.0) += secs;
            }
        }
        let process = Self::ticks(std::path::Path::new("/proc/self/stat"), false);
        let mut postgres = 0.0;
        if let Ok(processes) = std::fs::read_dir("/proc") {
            for entry in processes.flatten() {
                let path = entry.path();
                let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                if comm.trim() == "postgres" {
                    // With its exited children (backends of closed connections).
                    postgres += Self::ticks(&path.join("stat"), true);
                }
            }
        }
        Self {
            threads,
            process,
            postgres,
        }
    }

    /// utime + stime (and the waited-for children's) of a `stat` file, in seconds.
    pub(super) fn ticks(stat: &std::path::Path, children: bool) -> f64 {
        let text = std::fs::read_to_string(stat).unwrap_or_default();
        // Fields after the parenthesised name; utime is the 14th field overall.
        let rest = text.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<f64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0.0);
        let mut ticks = field(14) + field(15);
        if children {
            ticks += field(16) + field(17);
        }
        ticks * Self::TICK
    }

    /// What each group used since `before`, the process total, and PostgreSQL's.
    pub(super) fn since(&self, before: &Self) -> Vec<(String, f64)> {
        let mut used: Vec<(String, f64)> = self
            .threads
            .iter()
            .map(|(group, secs)| {
                let start = before.threads.get(group).copied().unwrap_or(0.0);
                (group.clone(), secs - start)
            })
            .collect();
        let attributed: f64 = used.iter().map(|(_, secs)| secs).sum();
        let process = self.process - before.process;
        used.push(("exited threads".into(), (process - attributed).max(0.0)));
        used.push(("hub process total".into(), process));
        let postgres = self.postgres - before.postgres;
        if postgres > 0.05 {
            used.push(("PostgreSQL server".into(), postgres));
        }
        used
    }
}

/// When a broadcast reached each milestone, from the moment it was sent.
pub(super) struct Milestones {
    accepted: Duration,
    expanded: Option<Duration>,
    handed_over: Option<Duration>,
    /// Known when the fleet runs in this process.
    at_terminals: Option<Duration>,
    delivered: Option<Duration>,
    /// The people it matched.
    pub(super) matched: u64,
    /// When to give up waiting.
    pub(super) deadline: Instant,
}

impl Milestones {
    /// Sends the broadcast at `started` and follows it until every delivery
    /// is counted delivered; `received` says how many deliveries the fleet
    /// has received, when it can be asked.
    pub(super) async fn follow(
        client: &mut integration_tests::Enterprise,
        started: Instant,
        received: Option<&dyn Fn() -> u64>,
    ) -> anyhow::Result<Self> {
        let sent = client
            .send_message(broadcast_request("bench"))
            .await?
            .into_inner();
        let mut milestones = Self {
            accepted: started.elapsed(),
            expanded: None,
            handed_over: None,
            at_terminals: None,
            delivered: None,
            matched: 0,
            deadline: started + Duration::from_secs(3600),
        };
        while milestones.delivered.is_none() {
            let status = client
                .get_message(pb::GetMessageRequest {
                    message_id: sent.message_id.clone(),
                })
                .await?
                .into_inner();
            let now = Some(started.elapsed());
            let matched = status.matched;
            milestones.matched = matched;
            if matched > 0 {
                milestones.expanded = milestones.expanded.or(now);
                if status.handed_over == matched {
                    milestones.handed_over = milestones.handed_over.or(now);
                }
                if received.is_some_and(|received| received() >= matched) {
                    milestones.at_terminals = milestones.at_terminals.or(now);
                }
                if status.delivered == matched {
                    milestones.delivered = now;
                }
            }
            anyhow::ensure!(
                Instant::now() < milestones.deadline,
                "broadcast did not complete: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(milestones)
    }

    /// The milestones with their rates over `recipients`, and the hand-over
    /// rate against the transport `ceiling` measured in the same run.
    pub(super) fn print(&self, recipients: f64, ceiling: f64) {
        let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
        let rate = |d: Option<Duration>| recipients / secs(d);
        println!(
            "  accepted (SendMessage answered)        {:>8.3} s",
            self.accepted.as_secs_f64()
        );
        println!(
            "  expanded (recipients extracted)        {:>8.3} s",
            secs(self.expanded)
        );
        let rows = [
            (
                "handed over (all acked by carriers) ",
                Some(self.handed_over),
            ),
            (
                "at terminals (all received by fleet)",
                self.at_terminals.map(Some),
            ),
            ("delivered receipts counted at relay ", Some(self.delivered)),
        ];
        for (label, at) in rows
            .into_iter()
            .filter_map(|(label, at)| Some((label, at?)))
        {
            println!(
                "  {label}   {:>8.3} s   {:>9.0} recipients/s",
                secs(at),
                rate(at)
            );
        }
        println!(
            "  hand-over rate / transport ceiling in this run: {:.1} % ({:.0} of {ceiling:.0} deliveries/s)",
            100.0 * rate(self.handed_over) / ceiling,
            rate(self.handed_over),
        );
    }
}

/// Waits until the relay's rollup worker has folded every event (nothing
/// past its cursor in the relay's database at `database_url`), which it
/// does after a broadcast, not during it; returns when, from `started`.
/// The statistics, the learning tables and the ledger are current then, so
/// the CPU up to here is what the broadcast cost in all. Each look is one
/// index probe from the log's newest end, every 100 ms: counting the
/// backlog instead cost PostgreSQL more CPU than the fold it waited for.
pub(super) async fn wait_folded(
    database_url: &str,
    started: Instant,
    deadline: Instant,
) -> anyhow::Result<Duration> {
    let store = relay_svc::storage::Store::connect(database_url).await?;
    loop {
        if store.roll_up_newest().await?.is_none() {
            store.close().await;
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the fold did not catch up: {} events left",
            store.roll_up_backlog().await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
