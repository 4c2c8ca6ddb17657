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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::storage::Store;

/// This replica's identity and how long its leases last.
#[derive(Clone, Debug)]
pub struct Lease {
    pub replica: Arc<str>,
    pub ttl: Duration,
}

impl Lease {
    /// Holds (takes or renews) lease `name`; false when another live replica
    /// holds it or the database cannot say.
    pub async fn hold(&self, store: &Store, name: &str) -> bool {
        match store
            .hold_lease(name, &self.replica, wall_ms(), self.ttl.as_millis() as i64)
            .await
        {
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
