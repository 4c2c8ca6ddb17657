//! The storage seam: one [`Store`] over SQLite (the embedded default) or
//! PostgreSQL (scale-out), chosen from the database URL.
//!
//! Every query is written once in the SQL both engines accept (`$n`
//! placeholders, `ON CONFLICT`, `RETURNING`, `CAST`) and runs on whichever pool
//! the store holds; the few places where the engines differ say so.
//!
//! A check that a batch's rows each have a match elsewhere is written as a
//! probe, `(SELECT 1 FROM … WHERE … LIMIT 1) IS NOT NULL`, never `EXISTS`:
//! PostgreSQL turns an `EXISTS` into a hash join (or a hashed subplan) over
//! a scan of the whole other table whenever the batch is large against
//! the table's statistics, once per statement — the fold's and the
//! receipts' checks read every contract, registration or delivery of a
//! carrier per batch that way, growing with the hub. A scalar subquery is
//! one index lookup per row on both engines. A per-row lookup of several
//! columns is [`Store::left_join_by_row`]. Migrations
//! are embedded per backend and applied at start. This module owns durability
//! settings (`synchronous=FULL` on SQLite, `synchronous_commit=on` on
//! PostgreSQL) and must never call out to the network inside a transaction.

mod accept_batch;
mod auction;
mod audience;
pub(crate) mod audit;
mod checkpoint;
mod control;
mod due_now;
mod expanding;
pub(crate) mod fold_log;
mod group;
mod key_cache;
mod message_rows;
mod messages;
mod open;
mod overview;
mod per_person;
pub(crate) mod planning;
pub(crate) mod pricing;
mod receipts;
mod ref_cache;
mod registry;
mod registry_steps;
mod slot_cache;
pub(crate) mod states;
pub(crate) mod stats;
mod tenants;
mod transfer;
pub mod webhooks;
mod write_turn;
mod writers;

use std::sync::Arc;

use sqlx::{PgPool, SqlitePool};

pub use auction::Closed;
pub use audit::{AuditEntry, AuditVerification};
pub use control::{Attempt, ExplainedEvent, Explanation, FollowThrough, Reconciled, Reconciling};
pub use due_now::DueNowSink;
pub use expanding::{Campaign, EXPANSION_CHUNK, Expansion, StatisticsWatch};
pub use messages::{MessageRow, StoredMessage};
pub use overview::{ChannelFunnel, MessageSummary};
pub use planning::MessagePlan;
pub use pricing::{LedgerDimension, LedgerSum, PriceTable};
pub use receipts::{CarrierCounts, MessageCounts};
pub use registry::RegistrationRow;
pub use states::DeliveryState;
pub use stats::{Cube, Reconciliation, SummedCells};
pub use tenants::ApiKeyRow;
pub use transfer::{DueDelivery, DueMessage, Lane};

use crate::error::Result;
use crate::receipts::MessageEventKind;
pub use group::Group;
pub use key_cache::KEY_CACHE_TTL;
pub use slot_cache::SLOT_CACHE_TTL;
pub use writers::Groups;

/// Rows per multi-row statement: well under SQLite's 32,766 and PostgreSQL's
/// 65,535 bind parameters for every statement that uses it.
///
/// Such a statement is not kept prepared (`persistent(false)`): each row
/// count is a text of its own and its program is large, so sqlx's per-
/// connection cache filled with them after a burst (tens of MiB of the
/// relay's memory), and preparing one per 1,000 rows costs little.
const ROWS_PER_STATEMENT: usize = 1_000;

/// Whether a statement planned for the rows at hand may stay prepared on
/// a connection of this backend. SQLite plans a statement once, whatever
/// its bound values (and prepares it again itself when the schema or its
/// statistics change), so a kept statement runs the plan a fresh one would
/// get, without preparing it again on every run. PostgreSQL switches a
/// prepared statement to a generic plan after five runs, and one made
/// while a table was small was kept once it was large (`transfer.rs`).
pub(crate) trait KeepsPlans {
    const KEEPS_PLANS: bool;
}

impl KeepsPlans for sqlx::SqliteConnection {
    const KEEPS_PLANS: bool = true;
}

impl KeepsPlans for sqlx::PgConnection {
    const KEEPS_PLANS: bool = false;
}

/// The relay's database, SQLite or PostgreSQL, with the groups its hot
/// write paths commit in (`group.rs`).
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqlitePool, Arc<Groups<sqlx::Sqlite>>),
    Postgres(PgPool, Arc<Groups<sqlx::Postgres>>),
}

/// Runs `$body` with `$pool` bound to whichever pool the store holds. The body
/// is compiled once per backend, so it may only use what both drivers accept.
/// `on_pool!(store, pool, groups => …)` also binds the store's write groups.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::storage::Store::Sqlite($pool, _) => $body,
            $crate::storage::Store::Postgres($pool, _) => $body,
        }
    };
    ($store:expr, $pool:ident, $group:ident => $body:expr) => {
        match $store {
            $crate::storage::Store::Sqlite($pool, $group) => $body,
            $crate::storage::Store::Postgres($pool, $group) => $body,
        }
    };
}
pub(crate) use on_pool;

/// [`on_pool!`] for a body that writes outside a group (its own write
/// transaction, or a single statement): on SQLite it first takes the
/// store's write turn ([`Groups::turn`]), held until the body is done, so
/// writers queue in the process, first come first served, instead of in
/// SQLite's busy handler, whose sleeps (1, 2, 5 … 100 ms) outlast the
/// transaction they wait for. The body must not wait for another write.
macro_rules! on_write {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::storage::Store::Sqlite(pool, groups) => {
                let _turn = groups.turn().await;
                let $pool = groups.writer_or(pool);
                $body
            }
            $crate::storage::Store::Postgres($pool, _) => $body,
        }
    };
}
pub(crate) use on_write;

impl Store {
    /// From now on, how long each SQLite writer holds the write turn goes
    /// to `held`, labelled `writer` (`accepts`, `deliveries`, or the storage
    /// module the writer's code is in); nothing on PostgreSQL, whose
    /// writers take no turn.
    pub fn time_write_turns(&self, held: chukei_proto::metrics::Histogram) {
        on_pool!(self, _pool, groups => groups.time_turns(held))
    }

    /// The rows a bulk writer (an expansion step, a fold batch) should take
    /// in its next transaction, of `full`: fewer while targeted messages
    /// are being accepted, so none of them waits long for the write turn
    /// ([`Groups::slice`]; `full` on PostgreSQL, whose writers take no turn).
    pub fn bulk_slice(&self, full: u32) -> u32 {
        on_pool!(self, _pool, groups => groups.slice(full))
    }

    /// [`KeepsPlans`] for this store's backend.
    pub(crate) fn keeps_plans(&self) -> bool {
        match self {
            Self::Sqlite(..) => <sqlx::SqliteConnection as KeepsPlans>::KEEPS_PLANS,
            Self::Postgres(..) => <sqlx::PgConnection as KeepsPlans>::KEEPS_PLANS,
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(..) => "sqlite",
            Self::Postgres(..) => "postgres",
        }
    }

    pub async fn close(&self) {
        on_pool!(self, pool, groups => {
            groups.close_writer().await;
            pool.close().await;
        });
    }

    /// The pool's open connections and how many of them are idle.
    pub fn pool_connections(&self) -> (u32, usize) {
        on_pool!(self, pool => (pool.size(), pool.num_idle()))
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }
}

/// Opening a write transaction the way each engine needs: SQLite must take
/// the write lock up front (`BEGIN IMMEDIATE`), or a transaction that reads
/// before it writes fails with `SQLITE_BUSY_SNAPSHOT` when another writer
/// commits in between; PostgreSQL's plain `BEGIN` is right as it is.
pub(crate) trait WritePool {
    type Db: sqlx::Database;
    /// One writer at a time (SQLite's write lock): a write transaction cannot
    /// begin before the last one has ended.
    const SINGLE_WRITER: bool;
    /// The statement that begins a write transaction.
    const BEGIN: &'static str;

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>;
}

impl WritePool for SqlitePool {
    type Db = sqlx::Sqlite;
    const SINGLE_WRITER: bool = true;
    const BEGIN: &'static str = "BEGIN IMMEDIATE";

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error> {
        self.begin_with(Self::BEGIN).await
    }
}

impl WritePool for PgPool {
    type Db = sqlx::Postgres;
    const SINGLE_WRITER: bool = false;
    const BEGIN: &'static str = "BEGIN";

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error> {
        self.begin().await
    }
}

/// Declares a trait of steps that run inside a caller's transaction and
/// implements it for both backends' connections: each step is written once,
/// as a method with a signature (a `?` in it returns from the step, not from
/// its caller), and compiled for SQLite and for PostgreSQL. A transaction,
/// a group member or a pool connection derefs to the connection, so a
/// caller writes `tx.add_to_counts(added).await?` with the trait in scope.
macro_rules! transaction_steps {
    (
        $(#[$meta:meta])*
        $vis:vis trait $name:ident {
            $(
                $(#[$step_meta:meta])*
                async fn $step:ident(&mut $self:ident $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty $body:block
            )*
        }
    ) => {
        $(#[$meta])*
        $vis trait $name {
            $( $(#[$step_meta])* async fn $step(&mut $self $(, $arg: $ty)*) -> $ret; )*
        }
        impl $name for sqlx::SqliteConnection {
            $( $(#[$step_meta])* async fn $step(&mut $self $(, $arg: $ty)*) -> $ret $body )*
        }
        impl $name for sqlx::PgConnection {
            $( $(#[$step_meta])* async fn $step(&mut $self $(, $arg: $ty)*) -> $ret $body )*
        }
    };
}
pub(crate) use transaction_steps;

transaction_steps! {
    /// What every transaction that records events does beside them.
    pub(crate) trait CountSteps {
        /// Adds `((message_id, kind), added)` entries to `message_counts`:
        /// for what is counted but is not an event (deferrals, kind 8).
        /// Events count themselves: a trigger adds each one the log really
        /// adds, in the statement that adds it (migration 0016).
        async fn add_to_counts(
            &mut self,
            added: impl IntoIterator<Item = ((String, i64), i64)>,
        ) -> Result<()> {
            let added: Vec<((String, i64), i64)> = added.into_iter().filter(|(_, n)| *n > 0).collect();
            for chunk in added.chunks(ROWS_PER_STATEMENT) {
                let mut query = sqlx::QueryBuilder::new("INSERT INTO message_counts (message_id, kind, count) ");
                query.push_values(chunk, |mut row, ((message_id, kind), count)| {
                    row.push_bind(message_id).push_bind(*kind).push_bind(*count);
                });
                query.push(
                    " ON CONFLICT (message_id, kind) DO UPDATE SET count = message_counts.count + excluded.count",
                );
                query.build().execute(&mut *self).await?;
            }
            Ok(())
        }

        /// Records the message event `kind` (with the message's counts now)
        /// for each of `message_ids` that meets `only` (SQL over its row `m`),
        /// has not had it, and belongs to an enterprise with an enabled
        /// webhook endpoint for it — nobody else reads them — and counts it.
        /// Callers skip it while no endpoint at all is enabled
        /// (`Store::webhooks_listening`), so a hub without webhooks pays
        /// nothing on its hot paths.
        async fn record_message_events(
            &mut self,
            message_ids: &[&str],
            kind: MessageEventKind,
            only: &'static str,
            now: i64,
        ) -> Result<()> {
            for chunk in message_ids.chunks(ROWS_PER_STATEMENT) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO events (message_id, user_id, kind, at, carrier_id, channel, region, detail) SELECT m.id, '', ",
                );
                query.push_bind(kind.number()).push(", ").push_bind(now);
                query.push(format!(", '', 0, '', {MESSAGE_COUNTS_JSON} FROM messages m WHERE {only} AND "));
                query.push(
                    "EXISTS (SELECT 1 FROM webhook_endpoints w WHERE w.enterprise_id = m.enterprise_id AND w.state = 0
                             AND ((w.types >> CAST(",
                );
                query.push_bind(kind.number()).push(" AS INTEGER)) & 1) = 1) AND m.id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                // Counted by the database (migration 0016).
                query.push(") ON CONFLICT DO NOTHING");
                query.build().execute(&mut *self).await?;
            }
            Ok(())
        }
    }
}

/// A message's counts (`webhooks::Counts`) as JSON, in SQL over its row `m`.
const MESSAGE_COUNTS_JSON: &str = "'{\"matched\":' || COALESCE(m.matched, 0)
    || ',\"handed_over\":' || COALESCE((SELECT c.count FROM message_counts c WHERE c.message_id = m.id AND c.kind = 1), 0)
    || ',\"delivered\":' || COALESCE((SELECT c.count FROM message_counts c WHERE c.message_id = m.id AND c.kind = 2), 0)
    || ',\"opened\":' || COALESCE((SELECT c.count FROM message_counts c WHERE c.message_id = m.id AND c.kind = 3), 0)
    || ',\"failed\":' || COALESCE((SELECT c.count FROM message_counts c WHERE c.message_id = m.id AND c.kind = 4), 0)
    || ',\"expired\":' || COALESCE((SELECT c.count FROM message_counts c WHERE c.message_id = m.id AND c.kind = 5), 0)
    || ',\"unsupported\":' || COALESCE((SELECT c.count FROM message_counts c WHERE c.message_id = m.id AND c.kind = 6), 0)
    || ',\"skipped\":' || COALESCE((SELECT c.count FROM message_counts c WHERE c.message_id = m.id AND c.kind = 7), 0)
    || ',\"deferred\":' || COALESCE((SELECT c.count FROM message_counts c WHERE c.message_id = m.id AND c.kind = 8), 0)
    || '}'";

/// Row ids bound as one parameter — a JSON array read with `json_each` on
/// SQLite, an `int8[]` on PostgreSQL — so a batch of any size is one short
/// statement with one cached plan instead of a thousand placeholders.
#[derive(Clone, Debug)]
struct IdList<'a>(&'a [i64]);

impl sqlx::Type<sqlx::Sqlite> for IdList<'_> {
    fn type_info() -> sqlx::sqlite::SqliteTypeInfo {
        <String as sqlx::Type<sqlx::Sqlite>>::type_info()
    }
}

impl sqlx::Encode<'_, sqlx::Sqlite> for IdList<'_> {
    fn encode_by_ref(
        &self,
        buf: &mut <sqlx::Sqlite as sqlx::Database>::ArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        let mut json = String::with_capacity(self.0.len() * 8 + 2);
        json.push('[');
        for (index, id) in self.0.iter().enumerate() {
            if index > 0 {
                json.push(',');
            }
            json.push_str(&id.to_string());
        }
        json.push(']');
        <String as sqlx::Encode<sqlx::Sqlite>>::encode(json, buf)
    }
}

impl sqlx::Type<sqlx::Postgres> for IdList<'_> {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <Vec<i64> as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for IdList<'_> {
    fn encode_by_ref(
        &self,
        buf: &mut <sqlx::Postgres as sqlx::Database>::ArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&[i64] as sqlx::Encode<sqlx::Postgres>>::encode(self.0, buf)
    }
}

impl Store {
    /// An aggregate packing `expression` of a group's rows into one JSON
    /// array (as text), in this backend's SQL: a row per group crosses from
    /// the database instead of a row per element. Every such aggregate of a
    /// group sees its rows in the same order, so arrays line up.
    fn json_array_of(&self, expression: &str) -> String {
        match self {
            Self::Sqlite(..) => format!("json_group_array({expression})"),
            Self::Postgres(..) => format!("CAST(json_agg({expression}) AS TEXT)"),
        }
    }

    /// `LEFT JOIN {table} {alias} ON {on}` in this backend's SQL, looked up
    /// row by row through `on`'s index: on PostgreSQL a lateral subquery
    /// with a limit, which it cannot turn into a hash join over the whole
    /// table (it did for the fold's profiles, once per batch of events);
    /// SQLite joins by nested loops anyway.
    fn left_join_by_row(&self, table: &str, alias: &str, on: &str) -> String {
        match self {
            Self::Sqlite(..) => format!("LEFT JOIN {table} {alias} ON {on}"),
            Self::Postgres(..) => format!(
                "LEFT JOIN LATERAL (SELECT * FROM {table} {alias} WHERE {on} LIMIT 1) AS {alias} ON TRUE"
            ),
        }
    }

    /// `column IN <the IdList bound as parameter n>`, in this backend's SQL.
    fn in_id_list(&self, column: &str, param: usize) -> String {
        match self {
            Self::Sqlite(..) => format!("{column} IN (SELECT value FROM json_each(${param}))"),
            Self::Postgres(..) => format!("{column} = ANY(${param})"),
        }
    }

    /// The statement that fences the rollup fold from erasures, run first
    /// in either transaction: on PostgreSQL folds share an advisory lock and
    /// an erasure takes it alone, so a fold that saw a person still in the
    /// hub commits before the erasure deletes their per-person rows (and
    /// cannot write them back after); SQLite's one writer already does this.
    fn rollup_fence(&self, erasure: bool) -> Option<&'static str> {
        match (self, erasure) {
            (Self::Sqlite(..), _) => None,
            (Self::Postgres(..), false) => Some("SELECT pg_advisory_xact_lock_shared(7242)"),
            (Self::Postgres(..), true) => Some("SELECT pg_advisory_xact_lock(7242)"),
        }
    }

    /// What a `SELECT` of a row the transaction will update ends with: on
    /// PostgreSQL the row is locked until commit; on SQLite the write
    /// transaction already excludes every other writer.
    fn lock_row(&self) -> &'static str {
        match self {
            Self::Sqlite(..) => "",
            Self::Postgres(..) => " FOR UPDATE",
        }
    }

    /// How this backend reads the events log past the fold's cursor.
    fn event_log(&self) -> &'static fold_log::EventLog {
        match self {
            Self::Sqlite(..) => &fold_log::SQLITE_LOG,
            Self::Postgres(..) => &fold_log::POSTGRES_LOG,
        }
    }

    /// What a `SELECT` of rows to claim ends with: on PostgreSQL the rows are
    /// locked and rows another transaction holds are skipped; on SQLite the
    /// write transaction (`BEGIN IMMEDIATE`) already excludes every other writer.
    fn claim(&self) -> &'static str {
        match self {
            Self::Sqlite(..) => "",
            Self::Postgres(..) => " FOR UPDATE SKIP LOCKED",
        }
    }
}

/// A bind value for statements whose shape is built at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
    Bool(bool),
    /// An integer or SQL NULL.
    OptInt(Option<i64>),
    /// A text or SQL NULL.
    OptText(Option<String>),
}

impl Param {
    /// A held window's closing time, as [`stored_window_close`].
    pub(crate) fn window_close(close: i64) -> Self {
        Self::OptInt(stored_window_close(close))
    }
}

/// A held window's closing time as stored: `i64::MAX` (no window) is NULL.
pub(crate) fn stored_window_close(close: i64) -> Option<i64> {
    (close != i64::MAX).then_some(close)
}

/// A list stored as one text column, one item per line (regions,
/// occupations, suggested replies); empty or NULL is the empty list.
fn stored_list(text: Option<&str>) -> Vec<String> {
    text.unwrap_or_default()
        .split('\n')
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether a step failed on a unique-key violation ([`is_unique_violation`]).
fn is_unique_error(error: &crate::error::Error) -> bool {
    matches!(error, crate::error::Error::Internal(cause)
        if cause.downcast_ref::<sqlx::Error>().is_some_and(is_unique_violation))
}

/// Whether a database error is a unique-key violation (mapped by kind, not text).
fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}
