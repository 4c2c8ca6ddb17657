//! Leases between relay replicas on one database. One replica at a time
//! holds each carrier's `Deliver` stream and the follow-through loop; it
//! renews its leases every third of their time to live, and a replica that
//! stops renewing (it died, or lost the database) loses them when they
//! expire, so another takes over. Campaign expansion and the rollup fold need
//! no lease: they claim their rows (`storage`).
//!
//! Lease time is the wall clock of the process, not the relay's injectable
//! clock: a lease says whether a process is alive, which simulated time
//! must not decide.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chukei_proto::metrics::Histogram;

use crate::storage::Store;

/// This replica's identity and how long its leases last.
#[derive(Clone, Debug)]
pub struct Lease {
    pub replica: Arc<str>,
    pub ttl: Duration,
    /// How long each hold takes (`chukei_relay_lease_hold_seconds`): a
    /// control write that queues behind bulk work shows here first.
    pub timing: Option<Histogram>,
}

impl Lease {
    /// Holds (takes or renews) lease `name`; false when another live replica
    /// holds it or the database cannot say. A hold that takes more than a
    /// tenth of the time to live is named at WARN: the replica is that much
    /// closer to losing what it holds.
    pub async fn hold(&self, store: &Store, name: &str) -> bool {
        let started = Instant::now();
        let held = store
            .hold_lease(name, &self.replica, wall_ms(), self.ttl.as_millis() as i64)
            .await;
        let took = started.elapsed();
        let kind = name.split(':').next().unwrap_or(name);
        if let Some(timing) = &self.timing {
            timing.observe(&[("lease", kind)], took.as_secs_f64());
        }
        if took > self.ttl / 10 {
            tracing::warn!(
                lease = name,
                took_ms = took.as_millis() as u64,
                ttl_secs = self.ttl.as_secs(),
                "a lease renewal took over a tenth of its time to live: control writes are queueing behind other work"
            );
        }
        match held {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(%error, lease = name, "lease renewal failed");
                false
            }
        }
    }

    /// How often held leases are renewed.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Gives up every lease this replica holds (on shutdown), so another
    /// replica takes over at once instead of after the time to live.
    pub async fn release_all(&self, store: &Store) {
        if let Err(error) = store.release_leases(&self.replica).await {
            tracing::warn!(%error, "releasing leases failed; they expire on their own");
        }
    }
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The default replica id: the host name and the listening port, so a
/// process restarted in place holds its leases again at once, and two
/// replicas on one host differ.
pub fn default_replica_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_owned());
    format!("{host}:{port}")
}
