//! The store's write turn on SQLite: one writer at a time, the accepts'
//! group ahead of the other writers waiting
//! ([`chukei_proto::turn::Turn`]), and how long each writer held it, by
//! writer (`chukei_relay_write_turn_seconds`). [`super::writers::Groups`]
//! holds the one turn every writer of a store takes.

use std::panic::Location;
use std::sync::OnceLock;
use std::time::Instant;

use chukei_proto::metrics::Histogram;
use tokio::sync::OwnedMutexGuard;

/// One writer at a time (SQLite's write lock, taken in the process; see
/// [`Groups::turn`](super::Groups::turn)), the accepts' group ahead of the others still waiting
/// ([`chukei_proto::turn::Turn`]), with how long each writer held it.
#[derive(Debug, Default)]
pub(crate) struct Turn {
    pub(crate) turn: chukei_proto::turn::Turn,
    /// How long each writer held the turn, once the relay reports it
    /// (`chukei_relay_write_turn_seconds`).
    pub(crate) held: OnceLock<Histogram>,
}

impl Turn {
    /// Waits for the turn; `writer` names who holds it, for the metric.
    pub(crate) async fn take(&self, ahead: bool, writer: &'static str) -> Held {
        self.held(self.turn.take(ahead).await, writer)
    }

    /// Waits for the turn ahead of the writers queued without slicing bulk
    /// work ([`chukei_proto::turn::Turn::take_ahead_unnoted`]): a lease
    /// renewal's.
    pub(crate) async fn take_for_control(&self, writer: &'static str) -> Held {
        self.held(self.turn.take_ahead_unnoted().await, writer)
    }

    fn held(&self, guard: OwnedMutexGuard<()>, writer: &'static str) -> Held {
        Held {
            _guard: guard,
            writer,
            since: Instant::now(),
            held: self.held.get().cloned(),
        }
    }
}

impl Turn {
    /// How many rows a bulk writer's next transaction should take, of the
    /// `full` it takes on an idle turn: an eighth while writers ahead (a
    /// targeted message's accept) came lately, so each of its transactions
    /// holds the turn a few milliseconds instead of tens. A targeted
    /// message waits for the transaction in progress: during a 1M
    /// broadcast a quarter left it p99 33 ms, an eighth 24 ms, a
    /// sixteenth 18–22 ms but the broadcast a quarter slower
    /// (`docs/benchmarks.md`).
    pub(crate) fn slice(&self, full: u32) -> u32 {
        if self.turn.ahead_lately() {
            (full / BULK_SLICES).max(1)
        } else {
            full
        }
    }
}

/// Into how many slices bulk work is cut while writers ahead are about.
const BULK_SLICES: u32 = 8;

/// The write turn, held until dropped; how long it was held goes to the
/// turn's histogram, labelled with the writer.
#[derive(Debug)]
pub(crate) struct Held {
    _guard: OwnedMutexGuard<()>,
    writer: &'static str,
    since: Instant,
    held: Option<Histogram>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            held.observe(
                &[("writer", self.writer)],
                self.since.elapsed().as_secs_f64(),
            );
        }
    }
}

/// The storage module a writer's code is in (`stats` for
/// `relay-svc/src/storage/stats.rs`): a name for the write turn's metric
/// that code, not data, decides.
pub(crate) fn module_of(location: &'static Location<'static>) -> &'static str {
    let file = location.file();
    let name = file.rsplit(['/', '\\']).next().unwrap_or(file);
    name.strip_suffix(".rs").unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::sqlite::SqlitePoolOptions;

    use super::super::writers::Groups;

    /// How long a writer held the turn is reported under its module's name
    /// (here `write_turn`, this file) once the relay asks for it.
    #[tokio::test]
    async fn the_time_a_writer_holds_the_turn_is_reported_by_module() {
        let groups = Groups::<sqlx::Sqlite>::taking_turns(None);
        let registry = chukei_proto::metrics::Registry::new();
        groups.time_turns(registry.histogram("turn_seconds", "held", &[0.001, 10.0]));
        let turn = groups.turn().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(turn);
        let rendered = registry.render();
        assert!(
            rendered.contains("turn_seconds_bucket{writer=\"write_turn\",le=\"0.001\"} 0")
                && rendered.contains("turn_seconds_bucket{writer=\"write_turn\",le=\"10\"} 1"),
            "{rendered}"
        );
    }

    #[tokio::test]
    async fn bulk_work_is_sliced_once_accepts_come() {
        let pool = SqlitePoolOptions::new()
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let groups = Groups::<sqlx::Sqlite>::taking_turns(None);
        assert_eq!(groups.slice(2_000), 2_000, "no accept yet");
        groups
            .accepts
            .join(&pool)
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
        assert_eq!(groups.slice(2_000), 250);
        assert_eq!(groups.slice(7), 1);
        assert_eq!(Groups::<sqlx::Postgres>::apart().slice(2_000), 2_000);
    }
}
