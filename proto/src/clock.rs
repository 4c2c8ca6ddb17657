//! The one clock every process takes time from (ARCHITECTURE §4 "One clock").
//!
//! Time is unix milliseconds (`i64`) everywhere in the core. A [`Clock`] is
//! either the system clock, a *scaled* clock that runs `scale` times faster than
//! real time from a shared origin (so the relay, carriers and terminals of a
//! local run agree on simulated time while hours of opening behaviour pass in
//! seconds), or a manual clock that tests advance by hand.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// A cheap-to-clone source of "now" and of timed waits.
#[derive(Clone, Debug)]
pub struct Clock {
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    System,
    Scaled { origin_ms: i64, scale: f64 },
    Manual(Arc<watch::Sender<i64>>),
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// Real time.
    pub fn system() -> Self {
        Self { kind: Kind::System }
    }

    /// Simulated time: equal to real time at `origin_ms`, then `scale` times faster.
    /// Processes given the same origin and scale agree on the time.
    pub fn scaled(origin_ms: i64, scale: f64) -> Self {
        if scale == 1.0 {
            return Self::system();
        }
        Self {
            kind: Kind::Scaled { origin_ms, scale },
        }
    }

    /// A clock that stands still until [`Clock::advance`] moves it.
    pub fn manual(start_ms: i64) -> Self {
        let (sender, _) = watch::channel(start_ms);
        Self {
            kind: Kind::Manual(Arc::new(sender)),
        }
    }

    /// Builds the clock from the `--time-scale` / `--time-origin-ms` flags every
    /// service shares. An origin of 0 means "now".
    pub fn from_flags(scale: f64, origin_ms: i64) -> Self {
        let origin = if origin_ms == 0 {
            real_now_ms()
        } else {
            origin_ms
        };
        Self::scaled(origin, scale)
    }

    /// Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        match &self.kind {
            Kind::System => real_now_ms(),
            Kind::Scaled { origin_ms, scale } => {
                let real = real_now_ms();
                origin_ms + ((real - origin_ms) as f64 * scale) as i64
            }
            Kind::Manual(sender) => *sender.borrow(),
        }
    }

    /// Moves a manual clock forward (and wakes whoever waits on it). No effect on
    /// other clocks.
    pub fn advance(&self, by: Duration) {
        if let Kind::Manual(sender) = &self.kind {
            sender.send_modify(|now| *now += by.as_millis() as i64);
        }
    }

    /// Waits until the clock reads at least `at_ms`.
    pub async fn sleep_until(&self, at_ms: i64) {
        match &self.kind {
            Kind::System => {
                let wait = at_ms - real_now_ms();
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                }
            }
            Kind::Scaled { scale, .. } => loop {
                let wait = at_ms - self.now_ms();
                if wait <= 0 {
                    return;
                }
                let real = (wait as f64 / scale).ceil().max(1.0);
                tokio::time::sleep(Duration::from_millis(real as u64)).await;
            },
            Kind::Manual(sender) => {
                let mut receiver = sender.subscribe();
                // The sender lives as long as this clock, so the wait ends only by time.
                let _ = receiver.wait_for(|now| *now >= at_ms).await;
            }
        }
    }

    /// Waits for `duration` of this clock's time.
    pub async fn sleep(&self, duration: Duration) {
        self.sleep_until(self.now_ms() + duration.as_millis() as i64)
            .await;
    }
}

fn real_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Unix milliseconds as a protobuf timestamp.
pub fn to_timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp as unix milliseconds.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> i64 {
    // Saturating: a hostile timestamp must not overflow (edges refuse them
    // with `validate::instant`; this keeps any other reader safe).
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos) / 1_000_000)
}

/// A unix-millisecond instant as RFC 3339 in UTC, for people to read.
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for ms in [0, 1, 999, 1_764_000_000_123, -1, -1001] {
            assert_eq!(from_timestamp(&to_timestamp(ms)), ms);
        }
    }

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_when_advanced() {
        let clock = Clock::manual(1_000);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(61_000).await }
        });
        clock.advance(Duration::from_secs(30));
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(30));
        sleeper.await.unwrap();
        assert_eq!(clock.now_ms(), 61_000);
    }

    #[test]
    fn scaled_clock_runs_faster_than_real_time() {
        let origin = real_now_ms() - 1_000;
        let clock = Clock::scaled(origin, 3600.0);
        // One real second after the origin is at least an hour of simulated time.
        assert!(clock.now_ms() - origin >= 3_600_000);
    }
}

/// The clock flags every service shares (`--time-scale`, `--time-origin-ms`).
#[derive(clap::Args, Clone, Debug)]
pub struct ClockArgs {
    /// How many times faster than real time the clock runs (1 = real time). A
    /// local run compresses hours of opening behaviour into seconds with e.g. 3600.
    #[arg(long, env = "CHUKEI_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,
    /// The real instant (unix ms) at which simulated and real time agree; give
    /// every process of one run the same value. 0 means the process start.
    #[arg(long, env = "CHUKEI_TIME_ORIGIN_MS", default_value_t = 0)]
    pub time_origin_ms: i64,
    /// A clock handed in by an embedding program (the test harness shares one
    /// manual clock between in-process services); never a flag.
    #[arg(skip)]
    pub injected: Option<Clock>,
}

impl Default for ClockArgs {
    fn default() -> Self {
        Self {
            time_scale: 1.0,
            time_origin_ms: 0,
            injected: None,
        }
    }
}

impl ClockArgs {
    /// Every service of an in-process run on the same `clock`.
    pub fn shared(clock: Clock) -> Self {
        Self {
            injected: Some(clock),
            ..Self::default()
        }
    }
}

impl ClockArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            anyhow::bail!("--time-scale: must be a positive number");
        }
        if self.time_origin_ms < 0 {
            anyhow::bail!("--time-origin-ms: must not be negative");
        }
        Ok(())
    }

    pub fn clock(&self) -> Clock {
        self.injected
            .clone()
            .unwrap_or_else(|| Clock::from_flags(self.time_scale, self.time_origin_ms))
    }
}
