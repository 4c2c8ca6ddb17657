//! Per-enterprise call rate limits: a token bucket for each enterprise, so
//! one enterprise's burst is refused (`RESOURCE_EXHAUSTED` with a retry hint)
//! while the others go on. Real time, not the injectable clock: a limit is
//! about load on this process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets holding up to one second's worth of calls, refilled
/// continuously at `per_sec`.
#[derive(Debug)]
pub struct RateLimits {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimits {
    /// `None` for 0 (no limit).
    pub fn new(per_sec: u32) -> Option<Self> {
        (per_sec > 0).then(|| Self {
            per_sec: f64::from(per_sec),
            burst: f64::from(per_sec),
            buckets: Mutex::default(),
        })
    }

    /// Calls a second each enterprise may make.
    pub fn per_sec(&self) -> u32 {
        self.per_sec as u32
    }

    /// Takes one call from `key`'s bucket, or says how long until one is there.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_sec;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_sec,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_refused_with_a_hint_and_others_are_untouched() {
        let limits = RateLimits::new(4).unwrap();
        let start = Instant::now();
        for _ in 0..4 {
            assert_eq!(limits.take_at("a", start), Ok(()));
        }
        let wait = limits.take_at("a", start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(250));
        // Another key has its own bucket.
        assert_eq!(limits.take_at("b", start), Ok(()));
        // After the hint, one more call goes.
        assert_eq!(limits.take_at("a", start + wait), Ok(()));
        assert!(limits.take_at("a", start + wait).is_err());
        // Refill never exceeds one second's worth.
        let later = start + Duration::from_secs(60);
        for _ in 0..4 {
            assert_eq!(limits.take_at("a", later), Ok(()));
        }
        assert!(limits.take_at("a", later).is_err());
        assert!(RateLimits::new(0).is_none());
    }
}
