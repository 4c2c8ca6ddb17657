//! The store's writers: the two groups its hot writers commit in
//! (`group.rs`), on SQLite the write turn every writer takes
//! (`write_turn.rs`) and the one connection every write transaction runs
//! on, and the little state the write paths share (whether a webhook
//! endpoint listens, the API keys looked up lately).

use std::panic::Location;
use std::sync::Arc;

use chukei_proto::metrics::Histogram;
use sqlx::Database;

use super::group::Group;
use super::write_turn::{Held, Turn, module_of};

/// Which group each hot writer joins: accepting messages (and the priority
/// lane's acked batches) and the delivery path (the bulk lane's acked
/// batches, receipts) commit apart, so a targeted message is not held
/// behind a campaign's hand-over of a thousand rows. On SQLite both take
/// the store's write turn, the accepts' group ahead of other writers waiting.
#[derive(Debug)]
pub struct Groups<DB: Database> {
    pub(crate) accepts: Arc<Group<DB>>,
    pub(crate) deliveries: Arc<Group<DB>>,
    /// Targeted messages waiting to be accepted in a batch (`accept_batch.rs`).
    pub(crate) batches: super::accept_batch::AcceptQueue,
    /// Whether some enterprise has an enabled webhook endpoint, as last
    /// looked up (`Store::refresh_webhooks_listening`).
    pub(crate) webhooks_listening: std::sync::atomic::AtomicBool,
    /// API keys looked up lately (`key_cache.rs`).
    pub(crate) keys: super::key_cache::KeyCache,
    /// Refs resolved lately for targeted messages (`ref_cache.rs`).
    pub(crate) refs: super::ref_cache::RefCache,
    /// The auction slots not yet ended, read lately (`slot_cache.rs`).
    pub(crate) slots: super::slot_cache::SlotCache,
    /// Where deliveries due at once go as they commit (`due_now.rs`).
    pub(crate) due_now: super::due_now::DueNowSlot,
    /// On SQLite, the write turn every write transaction takes, the groups'
    /// included; `None` on PostgreSQL, whose writers do not exclude each other.
    turn: Option<Arc<Turn>>,
    /// On SQLite, the one connection every write transaction runs on
    /// ([`Groups::writer_or`]); `None` on PostgreSQL.
    writer: Option<sqlx::Pool<DB>>,
}

impl<DB: Database> Groups<DB> {
    /// The two groups, and every writer, taking turns (SQLite), on
    /// `writer` when given.
    pub(crate) fn taking_turns(writer: Option<sqlx::Pool<DB>>) -> Self {
        let turn = Arc::new(Turn::default());
        Self {
            accepts: Arc::new(Group::taking_turn(
                turn.clone(),
                true,
                "accepts",
                writer.clone(),
            )),
            deliveries: Arc::new(Group::taking_turn(
                turn.clone(),
                false,
                "deliveries",
                writer.clone(),
            )),
            batches: Default::default(),
            webhooks_listening: Default::default(),
            keys: Default::default(),
            refs: Default::default(),
            slots: Default::default(),
            due_now: Default::default(),
            turn: Some(turn),
            writer,
        }
    }

    /// Accepts and the delivery path apart, taking no turns (PostgreSQL).
    pub(crate) fn apart() -> Self {
        Self {
            accepts: Arc::default(),
            deliveries: Arc::default(),
            batches: Default::default(),
            webhooks_listening: Default::default(),
            keys: Default::default(),
            refs: Default::default(),
            slots: Default::default(),
            due_now: Default::default(),
            turn: None,
            writer: None,
        }
    }

    /// Where a write transaction runs: the writer's connection when the
    /// store has one (SQLite), else `pool`. SQLite takes one writer at a
    /// time anyway (the turn), and a connection in WAL mode drops its whole
    /// page cache when it finds that another connection committed since
    /// its last transaction: writes spread over the pool's connections
    /// began every transaction with a cold cache, and the fold read each
    /// page of its indexes from the file again.
    pub(crate) fn writer_or<'a>(&'a self, pool: &'a sqlx::Pool<DB>) -> &'a sqlx::Pool<DB> {
        self.writer.as_ref().unwrap_or(pool)
    }

    /// Closes the writer's connection, when the store has one.
    pub(crate) async fn close_writer(&self) {
        if let Some(writer) = &self.writer {
            writer.close().await;
        }
    }

    /// Waits for this store's write turn (SQLite: one writer at a time,
    /// first come first served behind the accepts, a group's commit among
    /// them); held until the guard drops. Without it a writer waits for
    /// SQLite's lock in the busy handler, sleeping 1, 2, 5 … 100 ms between
    /// tries while other writers — a targeted message's group too — go
    /// first or wait behind it. The caller's module names the writer in
    /// the hold-time metric.
    #[track_caller]
    pub(crate) fn turn(&self) -> impl Future<Output = Option<Held>> + use<'_, DB> {
        let writer = module_of(Location::caller());
        async move {
            match &self.turn {
                Some(turn) => Some(turn.take(false, writer).await),
                None => None,
            }
        }
    }

    /// From now on, how long each writer holds the write turn goes to
    /// `held` (SQLite; PostgreSQL's writers take no turn).
    pub(crate) fn time_turns(&self, held: Histogram) {
        if let Some(turn) = &self.turn {
            let _ = turn.held.set(held);
        }
    }

    /// How many rows a bulk writer's next transaction should take, of the
    /// `full` it takes on an idle turn ([`Turn::slice`]); PostgreSQL's
    /// writers take no turn: `full`.
    pub(crate) fn slice(&self, full: u32) -> u32 {
        self.turn.as_ref().map_or(full, |turn| turn.slice(full))
    }

    /// Whether writers ahead of the bulk work (targeted accepts) came
    /// lately ([`chukei_proto::turn::Turn::ahead_lately`]; never on
    /// PostgreSQL, whose writers take no turn).
    pub(crate) fn ahead_lately(&self) -> bool {
        self.turn
            .as_ref()
            .is_some_and(|turn| turn.turn.ahead_lately())
    }
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::SqlitePoolOptions;

    use super::*;

    #[tokio::test]
    async fn a_group_writes_on_the_stores_writer_not_on_the_pool_it_is_given() {
        use sqlx::sqlite::SqliteConnectOptions;
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("db"))
            .create_if_missing(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&writer)
            .await
            .unwrap();
        // The pool the readers use cannot write at all.
        let readers = SqlitePoolOptions::new()
            .connect_with(options.read_only(true))
            .await
            .unwrap();
        let groups = Groups::<sqlx::Sqlite>::taking_turns(Some(writer.clone()));
        let mut member = groups.deliveries.join(&readers).await.unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut *member)
            .await
            .unwrap();
        member.commit().await.unwrap();
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&readers)
            .await
            .unwrap();
        assert_eq!(count, 1);
        // Without a writer the same group would have written on the readers.
        let apart = Groups::<sqlx::Sqlite>::taking_turns(None);
        let mut member = apart.deliveries.join(&readers).await;
        let refused = match &mut member {
            Ok(member) => sqlx::query("INSERT INTO t VALUES (2)")
                .execute(&mut **member)
                .await
                .is_err(),
            Err(_) => true,
        };
        assert!(refused, "a read-only connection wrote");
    }
}
