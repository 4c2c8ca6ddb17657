//! Opening the database: the pools, their settings (durability, caches)
//! and the migrations, for SQLite or PostgreSQL as the URL says.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::{Groups, Store, fold_log};

/// Warns when the server does not gather statistics by itself. The
/// relay's tables grow from empty to millions of rows in bursts (an import
/// of registrations, a campaign), and without `ANALYZE` the planner keeps
/// the plans it made while they were small: at 1M registrations with
/// autovacuum off, a targeted message took 40 s to accept
/// (`docs/benchmarks.md`).
async fn warn_without_autovacuum(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let autovacuum: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(pool)
        .await?;
    if autovacuum != "on" {
        tracing::warn!(
            autovacuum = %autovacuum,
            "PostgreSQL's autovacuum is off: run ANALYZE after bulk imports and regularly, or plans made on small tables stay in use (docs/operations.md)"
        );
    }
    Ok(())
}

impl Store {
    /// Opens the database at `url` (`sqlite://…` or `postgres://…`) and applies
    /// the embedded migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let store = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?.options([("synchronous_commit", "on")]);
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .after_connect(|connection, _| {
                    let create = fold_log::create_fold_rows(" ON COMMIT DELETE ROWS");
                    Box::pin(
                        async move { sqlx::raw_sql(create).execute(connection).await.map(drop) },
                    )
                })
                .connect_with(options)
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            warn_without_autovacuum(&pool).await?;
            Self::Postgres(pool, Arc::new(Groups::apart()))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // Accepted means durable: every commit reaches the disk before we answer.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                // Each reading connection keeps a page cache of 512 KiB: in
                // WAL mode a connection drops its cache whenever another one
                // committed since its last transaction, so a larger one
                // bought no CPU here (16 MiB, SQLite's default 2 MB and 512
                // KiB measured the same per recipient) and cost the relay
                // resident memory: at 1M registered, 71 MiB at its peak with
                // 2 MB against 61 MiB with 512 KiB (`docs/benchmarks.md`).
                // The writer's is larger ([`WRITER_CACHE_KIB`]). Negative: KiB.
                .pragma("cache_size", "-512")
                // Temporary tables (the fold's `fold_rows`) and the
                // savepoint journals of group commit's members stay in
                // memory instead of temporary files.
                .pragma("temp_store", "memory")
                // No connection checkpoints the WAL as it commits: a worker
                // does, beside the writer (`checkpoint.rs`).
                .pragma("wal_autocheckpoint", "0")
                // A prepared multi-row statement (1,000 rows of VALUES) holds
                // a large program, and each row count is a statement of its
                // own: sqlx's default of 100 per connection kept ~40 MiB of
                // them after a registration burst. The hot statements are few.
                .statement_cache_capacity(16);
            let pool = sqlite_pool(8, options.clone()).await?;
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
            // One connection for every write transaction (`Groups::writer_or`),
            // which keeps its page cache from one to the next.
            let writer = sqlite_pool(
                1,
                options
                    .pragma("cache_size", WRITER_CACHE_KIB)
                    .statement_cache_capacity(WRITER_STATEMENTS),
            )
            .await?;
            Self::Sqlite(pool, Arc::new(Groups::taking_turns(Some(writer))))
        } else {
            anyhow::bail!("database url: expected sqlite:… or postgres://…");
        };
        store.refresh_webhooks_listening().await?;
        Ok(store)
    }

    /// The default embedded database: a SQLite file in `data_dir`.
    pub fn sqlite_url_in(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("relay.db").display())
    }
}

/// The page cache of the SQLite connection that writes (KiB, negative):
/// the one cache that lasts from one transaction to the next, since no
/// other connection commits in between. With it the fold of a 100k
/// broadcast cost 29–32 µs of the relay's CPU per recipient instead of
/// 46–51, and the relay's peak was 44–45 MiB instead of 52–56
/// (`docs/benchmarks.md`).
const WRITER_CACHE_KIB: &str = "-2048";

/// Statements the writer keeps prepared (the readers keep 16). Every write
/// path runs on it: a batch of targeted accepts alone has ~25 statement
/// texts (three statements in power-of-two chunk sizes), the fold a dozen,
/// hand-over marks and receipts their own. With 16, the cache's LRU cycled
/// through them and prepared most of them again each time: under `bench
/// targeted`, `sqlite3Prepare` was 5.6 % of the hub's CPU, 4.1 % with 64
/// (the rest is the readers' and statements planned on every run). The
/// relay's resident memory did not move (`docs/benchmarks.md`).
const WRITER_STATEMENTS: usize = 64;

/// A pool of up to `connections` SQLite connections opened with `options`.
async fn sqlite_pool(
    connections: u32,
    options: SqliteConnectOptions,
) -> Result<SqlitePool, sqlx::Error> {
    SqlitePoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(10))
        // An embedded connection cannot be lost the way a server's can: no
        // ping on every acquire. Each ping is a round trip to the
        // connection's worker thread, and on an idle hub every round trip
        // wakes that thread and then the caller's (`docs/benchmarks.md`).
        .test_before_acquire(false)
        .after_connect(|connection, _| {
            let create = fold_log::create_fold_rows("");
            Box::pin(async move { sqlx::raw_sql(create).execute(connection).await.map(drop) })
        })
        .after_release(|connection, _| Box::pin(reusable(connection)))
        .connect_with(options)
        .await
}

/// Whether a connection given back to its pool may be handed out again. One
/// whose COMMIT failed (a full disk: SQLite rolls back itself) still counts
/// itself in a transaction, and every later BEGIN on it would fail: it is
/// closed rather than reused. One given back from a dropped transaction
/// counts itself in it until its queued ROLLBACK has run, which the ping
/// waits for. Every other connection (nearly all: a read, a committed
/// transaction) is reused without a round trip to its worker thread.
async fn reusable(connection: &mut sqlx::SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    if !connection.is_in_transaction() {
        return Ok(true);
    }
    connection.ping().await?;
    Ok(!connection.is_in_transaction())
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::sqlite::SqliteConnectOptions;

    use super::sqlite_pool;

    /// A transaction on `pool` that has inserted `x` into `t`.
    async fn begun_with(
        pool: &sqlx::SqlitePool,
        x: i64,
    ) -> sqlx::Transaction<'static, sqlx::Sqlite> {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO t VALUES ($1)")
            .bind(x)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    }

    /// The pool's one connection, given back in every state it can be in:
    /// after a read, a commit, and a transaction dropped without either.
    #[tokio::test]
    async fn a_connection_given_back_is_reused_only_out_of_a_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let options = SqliteConnectOptions::from_str(&url)
            .unwrap()
            .create_if_missing(true);
        let pool = sqlite_pool(1, options).await.unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&pool)
            .await
            .unwrap();
        begun_with(&pool, 1).await.commit().await.unwrap();
        // Dropped mid-transaction: its ROLLBACK runs before the connection
        // is handed out again, and the next BEGIN on it succeeds.
        drop(begun_with(&pool, 2).await);
        begun_with(&pool, 3).await.commit().await.unwrap();
        let rows: Vec<i64> = sqlx::query_scalar("SELECT x FROM t ORDER BY x")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(
            rows,
            [1, 3],
            "the dropped transaction's row was rolled back"
        );
        assert_eq!(pool.size(), 1, "the one connection was kept, not replaced");
    }
}
